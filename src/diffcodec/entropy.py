"""Entropy coding with ``constriction`` and exactly reproducible probability tables (DESIGN §4).

Why tables are built the way they are:

* Entropy decoding desynchronises if a single probability differs between encoder and decoder.
  Everything that feeds a table is therefore computed in float64 numpy from quantities that are
  *already exactly reproducible* (network outputs rounded to a fixed grid by
  :func:`quantize_to_grid`, schedule values in float64), with element-wise operations only — no
  reductions whose order could depend on threads.  ``constriction`` then turns the float64 table
  into fixed-point probabilities deterministically.
* Tables are built vectorised in blocks of at most ``MAX_TABLE_ENTRIES`` so that memory stays
  bounded on large images; blocks are coded in order into one range-coder stream.
* ``constriction``'s ``Categorical`` gives every symbol in the alphabet a non-zero probability,
  so any symbol can be coded even when the model is badly wrong (it just costs many bits).

The ideal code length reported to users is computed from the same float64 tables.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import constriction
import numpy as np

from .errors import DecodeError

MAX_TABLE_ENTRIES = 1 << 22  # float64 entries per block (32 MiB)
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


def blocks(n: int, alphabet: int) -> Iterator[slice]:
    """Slices of at most MAX_TABLE_ENTRIES // alphabet elements covering range(n)."""
    step = max(1, MAX_TABLE_ENTRIES // max(1, alphabet))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


TableFn = Callable[[slice], np.ndarray]
"""Returns the (n, K) float64 probability table for the elements in a slice."""


def _categorical() -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(perfect=False)


def encode_categorical(symbols: np.ndarray, alphabet: int, table: TableFn) -> tuple[bytes, float]:
    """Range-code ``symbols`` (ints in [0, alphabet)) under per-element tables.

    Returns the payload bytes and the ideal code length in bits under the float64 tables.
    """
    symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise ValueError("symbol outside the alphabet")
    enc = constriction.stream.queue.RangeEncoder()
    model = _categorical()
    ideal = 0.0
    for sl in blocks(symbols.size, alphabet):
        probs = table(sl)
        sym = symbols[sl]
        p = probs[np.arange(sym.size), sym] / probs.sum(axis=1)
        ideal += float(-np.log2(np.maximum(p, PROB_FLOOR)).sum())
        enc.encode(sym, model, np.ascontiguousarray(probs, dtype=np.float64))
    return enc.get_compressed().astype("<u4").tobytes(), ideal


def decode_categorical(payload: bytes, n: int, alphabet: int, table: TableFn) -> np.ndarray:
    """Inverse of :func:`encode_categorical`; ``table`` must produce identical tables."""
    if len(payload) % 4:
        raise DecodeError("entropy-coded section length is not a multiple of 4 bytes")
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    try:
        dec = constriction.stream.queue.RangeDecoder(words)
    except Exception as e:  # pragma: no cover - constriction validates lazily
        raise DecodeError(f"corrupt entropy-coded data: {e}") from None
    model = _categorical()
    out = np.empty(n, dtype=np.int32)
    for sl in blocks(n, alphabet):
        probs = np.ascontiguousarray(table(sl), dtype=np.float64)
        try:
            out[sl] = dec.decode(model, probs)
        except Exception as e:
            raise DecodeError(f"corrupt entropy-coded data: {e}") from None
    return out


def symbols_crc(symbols: np.ndarray) -> int:
    """CRC32 of decoded symbols, stored per section to detect encoder/decoder desync."""
    return zlib.crc32(np.ascontiguousarray(symbols, dtype="<i4").tobytes()) & 0xFFFFFFFF
