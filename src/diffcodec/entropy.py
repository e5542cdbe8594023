"""Entropy coding with ``constriction`` and exactly reproducible probability tables (DESIGN §4).

Why tables are built the way they are:

* Entropy decoding desynchronises if a single probability differs between encoder and decoder.
  Everything that feeds a table is therefore computed in float64 numpy from quantities that are
  *already exactly reproducible* (network outputs rounded to a fixed grid by
  :func:`quantize_to_grid`, schedule values in float64), with element-wise operations only — no
  reductions whose order could depend on threads.  ``constriction`` then turns the float64 table
  into fixed-point probabilities deterministically.
* Tables are built vectorised in blocks of at most ``MAX_TABLE_ENTRIES`` so that memory stays
  bounded on large images; blocks are coded in order into one range-coder stream.  Worker threads
  build the next blocks' tables while the coder consumes the current one (numpy releases the GIL);
  a table is a pure element-wise function of its block, so the thread count changes no bit.
* ``constriction``'s ``Categorical`` gives every symbol in the alphabet a non-zero probability,
  so any symbol can be coded even when the model is badly wrong (it just costs many bits).

The ideal code length reported to users is computed from the same float64 tables.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import constriction
import numpy as np

from .errors import DecodeError
from .threads import available_cpus, pool

MAX_TABLE_ENTRIES = 1 << 20  # float64 entries per block (8 MiB): enough blocks for every table thread
MIN_SPLIT_ENTRIES = 1 << 15  # a block is not split for the threads below this many entries
PROB_FLOOR = 1e-12


def quantize_to_grid(x: np.ndarray, bits: int) -> np.ndarray:
    """Round to multiples of 2**-bits in float64.

    Network outputs are computed in float64 and then rounded: two evaluations that differ by
    float64 rounding noise (different thread counts, batch layouts) agree after rounding except
    with probability ~1e-10 per element.
    """
    scale = float(2**bits)
    return np.round(np.asarray(x, dtype=np.float64) * scale) / scale


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def log_logistic_bin(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """log(sigmoid(hi) - sigmoid(lo)) for hi > lo, stable in both tails.

    Uses sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(b - a)).
    """
    return log_sigmoid(hi) + log_sigmoid(-lo) + np.log(-np.expm1(lo - hi))


def logistic_bin_probs(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``exp(log_logistic_bin(lo, hi))``, the same float64 values bit for bit, overwriting ``lo``.

    Why: tables are rebuilt for every coded step, and at a few symbols per element the time goes to
    allocating and filling the temporaries of the formula.  The same ufuncs run on the same
    operands in the same order (negation and sign-flipped arguments are exact), only into reused
    buffers; a test compares both on random and extreme inputs.
    """
    c = np.subtract(lo, hi)
    np.expm1(c, out=c)
    np.negative(c, out=c)
    np.log(c, out=c)  # log(-expm1(lo - hi))
    a = np.negative(hi)
    np.logaddexp(0.0, a, out=a)
    np.negative(a, out=a)  # log_sigmoid(hi)
    np.logaddexp(0.0, lo, out=lo)  # -log_sigmoid(-lo): -(-lo) is lo exactly
    np.negative(lo, out=lo)
    a += lo
    a += c
    return np.exp(a, out=lo)


def blocks(n: int, alphabet: int, parts: int = 1) -> Iterator[slice]:
    """Slices covering range(n), of at most MAX_TABLE_ENTRIES // alphabet elements each, and at least
    ``parts`` of them when every part still gets MIN_SPLIT_ENTRIES table entries (so that small images
    also keep every table thread busy)."""
    alphabet = max(1, alphabet)
    even = -(-n // max(1, parts))
    step = max(1, min(MAX_TABLE_ENTRIES // alphabet, max(even, MIN_SPLIT_ENTRIES // alphabet)))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


TableFn = Callable[[slice], np.ndarray]
"""Returns the (n, K) float64 probability table for the elements in a slice."""

TABLE_WORKERS: int | None = None
"""Threads building tables ahead of the coder (None: the CPUs this process may use, at most 4)."""


def _table_workers() -> int:
    return max(1, TABLE_WORKERS) if TABLE_WORKERS is not None else max(1, min(4, available_cpus()))


def table_blocks(n: int, alphabet: int, build: Callable[[slice], Any]) -> Iterator[tuple[slice, Any]]:
    """(slice, build(slice)) for every block in order; up to ``workers`` blocks are built ahead in
    threads, so at most workers + 1 results are alive at once (memory stays bounded)."""
    workers = _table_workers()
    slices = list(blocks(n, alphabet, parts=workers))
    workers = min(workers, len(slices))
    if workers <= 1:
        for sl in slices:
            yield sl, build(sl)
        return
    workers_pool = pool("tables", workers)
    todo = iter(slices)
    pending = deque((sl, workers_pool.submit(build, sl)) for sl in [next(todo) for _ in range(workers)])
    try:
        while pending:
            sl, fut = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, workers_pool.submit(build, nxt)))
            yield sl, fut.result()
    finally:  # an abandoned or failed iteration: queued blocks are not built for nothing
        for _, fut in pending:
            fut.cancel()


def _categorical() -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(perfect=False)


# constriction scales a table by (2^24 - K) / its total mass: a row whose mass is below about 2^24 / f64::MAX
# (~1e-301: a prior hundreds of scales away from every symbol it may code) overflows that scale, and the coder
# panics (a BaseException) or refuses the row.  Such rows are coded under the uniform table instead; both sides
# test the same float64 values.  The margin (16x) leaves every row constriction took before as it was.
MIN_ROW_MASS = 16.0 * 2.0**24 / np.finfo(np.float64).max


def codable(probs: np.ndarray) -> np.ndarray:
    """``probs`` (n, K) with every row constriction cannot normalise replaced by the uniform table."""
    return _codable(probs)[0]


def _codable(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`codable` and the rows' masses after it (the encoder's ideal bits divide by them)."""
    total = probs.sum(axis=1)
    bad = ~(total >= MIN_ROW_MASS)  # NaN sums too
    if bad.any():
        probs = probs.copy()
        probs[bad] = 1.0
        total = np.where(bad, float(probs.shape[1]), total)
    return probs, total


class CategoricalEncoder:
    """Range-codes sequences of symbols under per-element tables into one stream, in order.

    Several ``encode`` calls make one payload that a :class:`CategoricalDecoder` reads back with the
    same calls in the same order: a later sequence's tables may depend on the earlier symbols (UQDM's
    two-pass context).  ``ideal`` is the code length in bits under the float64 tables."""

    def __init__(self) -> None:
        self._enc = constriction.stream.queue.RangeEncoder()
        self._model = _categorical()
        self.ideal = 0.0

    def encode(self, symbols: np.ndarray, alphabet: int, table: TableFn) -> None:
        """Code ``symbols`` (ints in [0, alphabet)); ``table(slice)`` gives their (n, K) tables."""
        symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
        if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
            raise ValueError("symbol outside the alphabet")

        def build(sl: slice) -> tuple[np.ndarray, float]:  # in a worker: the table and its ideal bits
            probs, total = _codable(np.ascontiguousarray(table(sl), dtype=np.float64))
            sym = symbols[sl]
            p = probs[np.arange(sym.size), sym] / total
            return probs, float(-np.log2(np.maximum(p, PROB_FLOOR)).sum())

        for sl, (probs, bits) in table_blocks(symbols.size, alphabet, build):
            self.ideal += bits
            self._enc.encode(symbols[sl], self._model, probs)

    def finish(self) -> bytes:
        return self._enc.get_compressed().astype("<u4").tobytes()


class CategoricalDecoder:
    """Inverse of :class:`CategoricalEncoder`: ``decode`` calls mirror its ``encode`` calls."""

    def __init__(self, payload: bytes) -> None:
        if len(payload) % 4:
            raise DecodeError("entropy-coded section length is not a multiple of 4 bytes")
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        try:
            self._dec = constriction.stream.queue.RangeDecoder(words)
        except Exception as e:  # pragma: no cover - constriction validates lazily
            raise DecodeError(f"corrupt entropy-coded data: {e}") from None
        self._model = _categorical()

    def decode(self, n: int, alphabet: int, table: TableFn) -> np.ndarray:
        """The next ``n`` symbols; ``table`` must produce the encoder's tables."""
        out = np.empty(n, dtype=np.int32)
        for sl, probs in table_blocks(n, alphabet,
                                      lambda sl: codable(np.ascontiguousarray(table(sl), dtype=np.float64))):
            try:
                out[sl] = self._dec.decode(self._model, probs)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # constriction's Rust panics are BaseExceptions
                raise DecodeError(f"corrupt entropy-coded data: {e}") from None
        return out


def encode_categorical(symbols: np.ndarray, alphabet: int, table: TableFn) -> tuple[bytes, float]:
    """Range-code ``symbols`` (ints in [0, alphabet)) under per-element tables.

    Returns the payload bytes and the ideal code length in bits under the float64 tables.
    """
    enc = CategoricalEncoder()
    enc.encode(symbols, alphabet, table)
    return enc.finish(), enc.ideal


def decode_categorical(payload: bytes, n: int, alphabet: int, table: TableFn) -> np.ndarray:
    """Inverse of :func:`encode_categorical`; ``table`` must produce identical tables."""
    return CategoricalDecoder(payload).decode(n, alphabet, table)


def symbols_crc(symbols: np.ndarray) -> int:
    """CRC32 of decoded symbols, stored per section to detect encoder/decoder desync."""
    return zlib.crc32(np.ascontiguousarray(symbols, dtype="<i4").tobytes()) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------------
# Gaussian conditional with a scale table (hyperprior codecs)
# --------------------------------------------------------------------------------------------------

SCALE_MIN, SCALE_MAX, NUM_SCALES = 0.11, 256.0, 64
"""Scales (in units of the quantisation step) of the Gaussian conditional.

As in CompressAI, per-element scales are snapped to one of NUM_SCALES log-spaced levels.  The level
index is an integer computed from grid-rounded network outputs with one subtraction and one
rounding, so encoder and decoder agree on it exactly, and the levels themselves are rounded to a
2^-20 grid so that every platform feeds the coder the same float64 values.  Levels are 13% apart,
so a snapped scale is within about 6.5% of the network's (the model is trained with unsnapped
scales; the ideal bits reported by the encoder are those of the snapped tables actually used)."""
_LOG_STEP = (math.log(SCALE_MAX) - math.log(SCALE_MIN)) / (NUM_SCALES - 1)
SCALES = np.array([round(math.exp(math.log(SCALE_MIN) + _LOG_STEP * i) * 2**20) / 2**20 for i in range(NUM_SCALES)])


def scale_index(log_scale: np.ndarray) -> np.ndarray:
    """Table index (int64 in [0, NUM_SCALES)) of natural-log scales given in quantisation steps."""
    idx = np.round((np.asarray(log_scale, dtype=np.float64) - math.log(SCALE_MIN)) / _LOG_STEP)
    return np.clip(idx, 0, NUM_SCALES - 1).astype(np.int64)


def gaussian_scale_tables(half_width: int) -> np.ndarray:
    """(NUM_SCALES, 2R+1) float64 tables of P(k) = Phi((k+1/2)/s) - Phi((k-1/2)/s), k = -R..R.

    Used for the ideal code length reported by the encoder (the coder itself uses constriction's
    quantised Gaussian, whose cost does not grow with R).  Computed with ``math.erfc`` on the upper
    tail (|k|), stable far into the tails.
    """
    ks = np.arange(half_width + 1, dtype=np.float64)
    out = np.empty((NUM_SCALES, half_width + 1), dtype=np.float64)
    for i, s in enumerate(SCALES):
        c = 1.0 / (s * math.sqrt(2.0))
        upper = np.array([0.5 * math.erfc((k - 0.5) * c) for k in ks])
        lower = np.array([0.5 * math.erfc((k + 0.5) * c) for k in ks])
        out[i] = np.maximum(upper - lower, 0.0)
        out[i, 0] = 1.0 - 2.0 * lower[0]
    return np.concatenate([out[:, :0:-1], out], axis=1)


def encode_gaussian(symbols: np.ndarray, scale_idx: np.ndarray, half_width: int) -> tuple[bytes, float]:
    """Range-code integers in [-R, R] under zero-mean quantised Gaussians with scales SCALES[idx].

    Returns the payload and the ideal code length (bits) under the float64 tables.
    """
    symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    idx = np.asarray(scale_idx).reshape(-1)
    if symbols.size and np.abs(symbols).max() > half_width:
        raise ValueError("symbol outside the range")
    tabs = gaussian_scale_tables(half_width)
    p = tabs[idx, symbols + half_width]
    ideal = float(-np.log2(np.maximum(p, PROB_FLOOR)).sum())
    enc = constriction.stream.queue.RangeEncoder()
    model = constriction.stream.model.QuantizedGaussian(-half_width, half_width)
    enc.encode(symbols, model, np.zeros(symbols.size), np.ascontiguousarray(SCALES[idx]))
    return enc.get_compressed().astype("<u4").tobytes(), ideal


def decode_gaussian(payload: bytes, scale_idx: np.ndarray, half_width: int) -> np.ndarray:
    """Inverse of :func:`encode_gaussian` (int32 symbols); its cost does not depend on ``half_width``."""
    if len(payload) % 4:
        raise DecodeError("entropy-coded section length is not a multiple of 4 bytes")
    idx = np.asarray(scale_idx).reshape(-1)
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    model = constriction.stream.model.QuantizedGaussian(-half_width, half_width)
    try:
        dec = constriction.stream.queue.RangeDecoder(words)
        return np.asarray(dec.decode(model, np.zeros(idx.size), np.ascontiguousarray(SCALES[idx])), dtype=np.int32)
    except Exception as e:
        raise DecodeError(f"corrupt entropy-coded data: {e}") from None


def logistic_tables(mu: np.ndarray, log_s: np.ndarray, half_width: int) -> np.ndarray:
    """(n, 2R+1) tables of a discretised logistic(mu, exp(log_s)) on integer bins k = -R..R."""
    ks = np.arange(-half_width, half_width + 1, dtype=np.float64)
    inv = np.exp(-np.asarray(log_s, dtype=np.float64))[None, :]
    centre = ks[:, None] - np.asarray(mu, dtype=np.float64)[None, :]
    # computed as (K, n), returned as an (n, K) view: long contiguous rows, same values (element-wise)
    return logistic_bin_probs((centre - 0.5) * inv, (centre + 0.5) * inv).T
