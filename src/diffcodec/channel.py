"""Reverse channel coding of Gaussian samples by the chunked Poisson functional representation.

This is the coding step of DiffC (DESIGN §1b; Theis et al. 2022, practical coder after Vonderfecht
& Liu, ICLR 2025).  Per diffusion step the target is q = N(mu_Q, beta^2 I) and the prior/proposal
is p = N(mu_P, beta^2 I); after normalising, m = (mu_Q - mu_P) / beta, the sender must transmit a
*sample* X ~ N(m, I) (so that z = mu_P + beta X ~ q) using about KL(q||p) = |m|^2 / 2 nats.

How (and why) it is done here:

* **Chunks.** PFR needs about 2^KL candidates, so a step's dims are split into chunks of at most
  ``c_max - pad`` bits of KL each, every chunk is coded independently with N = 2^log2N <= 2^c_max
  candidates, and the truncation is what makes the sample inexact (the ``pad`` bits of slack keep
  it close).  Dims are assigned to chunks after a random permutation keyed by (seed, step), so
  spatially clustered KL spreads evenly; chunks are contiguous runs of the permuted dims whose
  sizes differ by at most one.  The decoder needs only :class:`StepLayout` (number of chunks,
  total KL in 1/16 bit, log2 N): a few bytes, no table tied to the image size.
* **Candidates.** Candidate j of chunk c is a fixed function of the words of one Philox lane
  (:class:`diffcodec.rng.CounterStream`, lane = chunk) starting at word ``j * P``, P = ceil(d/2):
  each 64-bit word gives one Box-Muller pair from two 24-bit uniforms.  So the receiver generates
  only X_{j*} (one counter seek), and the sender can stream candidates in large blocks.
* **Two precisions.** The sender's search is dominated by ~N*n normals, so it uses numpy's SIMD
  float32 log/cos (~15x faster than float64).  Those differ in the last bit between CPUs, which
  would be fatal for the *transmitted* sample (z_0 feeds the lossless section's tables; the codec
  checks a CRC of every decoded sample), so the sample itself is computed in float64 from the
  same uniforms with IEEE-exact operations only (:func:`exact_log`, :func:`exact_cos_sin`): it is
  bit-identical on every platform, and the encoder returns exactly what the decoder will compute.
* **Search.** The sender only needs the projections m.X_j: with X = r (cos t, sin t) per pair,
  m.X = sum r rho cos(t - phi) (rho, phi = polar form of the pair of m), one cosine per pair.  The
  exponential arrival times T_j are sender-private but seeded (own lane), so encoding is
  deterministic.
* **Index coding.** Indices are range coded with ``constriction`` under a truncated Zipf model
  P(j) ∝ (j+1)^-s over 0..N-1.  Li & El Gamal's exponent 1 + 1/(KL + 1.53) is a bound-driven
  choice; the exponent used here is interpolated from a table fitted by simulation to the actual
  index distribution of (truncated) PFR as a function of the chunk KL and of log2 N - KL.  The
  j* distribution depends only on |m| (projection), so the fit does not depend on the dimension.
  (The fitting simulation was run offline and is not in the repository; the end-to-end rate it
  gives is what ``benchmarks/channel_cmax.py`` measures.)  The range coder's final flush costs
  up to a word per stream; :func:`encode_indices` shortens the stream to the shortest prefix
  (rounded up) that still decodes to the same indices when the decoder pads with zero bytes, so a
  step's overhead is a few bits (``tests/test_channel.py`` checks < 8 on average) — it matters
  because DiffC codes many small steps.

Measured (``benchmarks/channel_cmax.py``, n = 73728 dims, Gaussian-shaped m, pad 2, 2 loaded
cores): payload bits / KL falls from ~1.05-1.09 at c_max 8 to ~0.92-0.94 at c_max 16 (the truncated
search favours small indices, so the coded size can sit below the KL); the projection efficiency
E[X.m]/|m|^2 is 0.78-0.83 at c_max 8 and 0.84-0.86 at c_max 16 (Vonderfecht & Liu: ~0.86 at 2^16),
0.89 with pad 4; the search costs ~10 ns per Box-Muller pair, i.e. n/2 * 2^c_max * 10 ns per step
(c_max 12: ~1.5-2 s, c_max 16: ~26-36 s for this n); decoding takes 0.01-0.15 s.
"""

from __future__ import annotations

import bisect
import math
import zlib
from concurrent.futures import wait
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import constriction
import numpy as np

from .errors import DecodeError
from .rng import CANDIDATES, CounterStream, LaneReader
from .threads import available_cpus, pool
from .varint import put_varint

KL_UNITS_PER_BIT = 16
"""The step's total KL is sent in units of 1/16 bit: fine enough for the index model, ~2 bytes."""

DEFAULT_PAD = 2.0
"""Bits of slack below log2 N per chunk (see :func:`choose_layout`); files made with other values
decode the same way, the layout is in the file."""

MAX_LOG2_CANDIDATES = 20
"""Hard limit on log2 N accepted from a file (a 2^20 float64 table is 8 MiB)."""

LOG2_CANDIDATES_MIN = 8
LOG2_CANDIDATES_EXTRA = 6
"""Steps whose chunks carry little KL use N = 2^max(8, ceil(KL)+6) <= 2^c_max candidates: the
search costs n * N normals, so a low-KL step should not pay for 2^c_max; 6 bits of headroom keep
the projection efficiency at 0.95-1.0 in simulation (vs ~0.85 at the usual 2 bits)."""

DEFAULT_MIN_KL_BITS = 0.125
"""Below this total KL a step sends no index at all: the receiver uses a prior draw (0 bits)."""

_SUB_CANDIDATES = 1
_SUB_PERMUTATION = 2
_SUB_SENDER = 3

_MAX_SEED = 2**64
_MAX_STEP = 2**32
_MAX_CHUNKS = 2**40
_MAX_KL_UNITS = 2**56
_BLOCK_WORDS = 1 << 15  # Philox words per search block (~1 MiB of temporaries): fastest measured
_BATCH_WORDS = 1 << 17  # words per batch of small chunks searched together
_SHORTEN_TAIL_BYTES = 12  # the range coder's flush adds at most two 32-bit words past the data

_F32_2_POW_M24 = np.float32(2.0**-24)
_F32_TWO_PI_2_POW_M24 = np.float32(2.0 * math.pi * 2.0**-24)
_F32_MINUS_TWO = np.float32(-2.0)
_F32_ONE = np.float32(1.0)
_MASK24 = np.uint64(0xFFFFFF)
_SHIFT8 = np.uint64(8)
_SHIFT40 = np.uint64(40)
_SHIFT11 = np.uint64(11)

# Zipf exponent fitted by simulation: for each chunk KL (bits, rows) and padding log2N - KL (bits,
# columns), the exponent s minimising the mean code length of PFR indices under P(j) ∝ (j+1)^-s on
# 0..N-1 (800-20000 simulated searches per cell; cells marked * extrapolated along the row).
_KAPPA_GRID = (0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 11.0, 14.0)
_PAD_GRID = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
_EXPONENT_TABLE = (
    (3.17, 3.27, 3.50, 3.63, 3.64, 3.63, 3.62),
    (2.71, 2.76, 3.03, 3.16, 3.20, 3.21, 3.22),
    (2.27, 2.27, 2.59, 2.74, 2.79, 2.85, 2.86),
    (1.84, 1.89, 2.21, 2.34, 2.41, 2.46, 2.46),
    (1.56, 1.64, 1.82, 1.92, 2.01, 2.09, 2.12),
    (1.19, 1.34, 1.49, 1.57, 1.65, 1.75, 1.79),
    (1.07, 1.20, 1.30, 1.41, 1.47, 1.55, 1.59),
    (1.02, 1.12, 1.22, 1.27, 1.33, 1.44, 1.47),
    (0.95, 1.04, 1.10, 1.14, 1.19, 1.27, 1.33),
    (0.91, 0.97, 1.01, 1.06, 1.10, 1.17, 1.21),
    (0.86, 0.90, 0.93, 0.97, 1.00, 1.06, 1.12),
    (0.82, 0.85, 0.89, 0.92, 0.95, 1.01, 1.04),
    (0.81, 0.83, 0.85, 0.86, 0.91, 0.96, 0.99),  # 6, 8: *
    (0.82, 0.82, 0.83, 0.85, 0.87, 0.92, 0.95),  # 3..8: *
)
_EXPONENT_GRID = 256  # exponents are rounded to 1/256 so that tables come from a small discrete set

# Projection efficiency E[X.m] / |m|^2 of the sample truncated PFR returns, for each chunk KL (bits,
# rows) and padding log2 N - KL (bits, columns): 1 for an exact sample, less when N is too small.
# Simulated by ``scripts/fit_projection_efficiency.py`` (standard error ~0.005 per cell; cells marked *
# are simulated with N = 2^18).
_EFFICIENCY_TABLE = (
    (0.005, 0.788, 0.973, 0.999, 1.002, 1.005, 1.004),
    (0.004, 0.740, 0.967, 1.000, 1.002, 1.002, 0.996),
    (0.002, 0.661, 0.928, 0.988, 0.991, 1.004, 1.003),
    (-0.004, 0.578, 0.917, 0.982, 0.996, 0.998, 1.001),
    (0.002, 0.668, 0.867, 0.969, 0.993, 1.003, 1.000),
    (0.386, 0.654, 0.818, 0.918, 0.975, 0.997, 1.005),
    (0.484, 0.678, 0.809, 0.903, 0.954, 0.993, 0.995),
    (0.522, 0.687, 0.811, 0.888, 0.941, 0.984, 0.997),
    (0.600, 0.716, 0.811, 0.870, 0.919, 0.981, 0.999),
    (0.656, 0.747, 0.815, 0.872, 0.919, 0.958, 0.988),
    (0.716, 0.778, 0.832, 0.870, 0.898, 0.949, 0.974),
    (0.756, 0.804, 0.840, 0.875, 0.903, 0.939, 0.980),
    (0.792, 0.822, 0.860, 0.885, 0.902, 0.940, 0.955),  # 8: *
    (0.814, 0.840, 0.866, 0.893, 0.908, 0.906, 0.906),  # 6, 8: *
)


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------


def _get_varint(data: bytes, pos: int, limit: int, what: str) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError(f"step layout truncated while reading {what}")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if value >= limit:
            raise DecodeError(f"step layout: {what} out of range")
        if not b & 0x80:
            return value, pos
        shift += 7


@dataclass(frozen=True)
class StepLayout:
    """Everything the decoder needs besides (payload, n, seed, step) to rebuild a step's chunks.

    n_chunks: number of chunks (0: no index sent, the sample is a prior draw)
    kl_units: the step's total KL in 1/16 bit; the index model uses KL / n_chunks per chunk
    log2_candidates: log2 of the candidates searched per chunk (N); the index alphabet size
    """

    n_chunks: int
    kl_units: int = 0
    log2_candidates: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.n_chunks < _MAX_CHUNKS and 0 <= self.kl_units < _MAX_KL_UNITS):
            raise ValueError("step layout out of range")
        if self.n_chunks == 0:
            if self.kl_units or self.log2_candidates:
                raise ValueError("a step without chunks carries no KL or candidate count")
        elif not 0 <= self.log2_candidates <= MAX_LOG2_CANDIDATES:
            raise ValueError("log2_candidates out of range")

    @property
    def num_candidates(self) -> int:
        return 1 << self.log2_candidates if self.n_chunks else 0

    @property
    def kl_bits(self) -> float:
        """The quantized total KL of the step in bits."""
        return self.kl_units / KL_UNITS_PER_BIT

    @property
    def chunk_kl_bits(self) -> float:
        """Expected KL per chunk (bits) as both sides compute it; 0 without chunks."""
        return self.kl_units / KL_UNITS_PER_BIT / self.n_chunks if self.n_chunks else 0.0

    def to_bytes(self) -> bytes:
        """varint n_chunks, then (only if n_chunks > 0) varint log2_candidates, varint kl_units."""
        if not self.n_chunks:
            return b"\x00"
        return put_varint(self.n_chunks) + put_varint(self.log2_candidates) + put_varint(self.kl_units)

    @classmethod
    def read(cls, data: bytes, pos: int = 0) -> tuple[StepLayout, int]:
        """Parse a layout at ``pos``; returns it and the position after it (for embedding)."""
        n_chunks, pos = _get_varint(data, pos, _MAX_CHUNKS, "n_chunks")
        if not n_chunks:
            return cls(0), pos
        log2n, pos = _get_varint(data, pos, MAX_LOG2_CANDIDATES + 1, "log2_candidates")
        kl_units, pos = _get_varint(data, pos, _MAX_KL_UNITS, "kl")
        return cls(n_chunks, kl_units, log2n), pos

    @classmethod
    def from_bytes(cls, data: bytes) -> StepLayout:
        layout, pos = cls.read(bytes(data))
        if pos != len(data):
            raise DecodeError("step layout has trailing bytes")
        return layout


# --------------------------------------------------------------------------------------------------
# Shared randomness: permutation, chunks, candidates
# --------------------------------------------------------------------------------------------------


def _check_key(seed: int, step: int) -> None:
    if not (0 <= seed < _MAX_SEED and 0 <= step < _MAX_STEP):
        raise ValueError("seed must be in [0, 2^64) and step in [0, 2^32)")


def permutation(n: int, seed: int, step: int) -> np.ndarray:
    """The step's random order of the n dims (int64), identical on both sides.

    argsort of raw Philox words rather than ``Generator.permutation``: numpy promises stable raw
    bit streams across versions, not stable ``Generator`` methods.  A stable sort makes even a
    (2^-64-likely) tie deterministic.
    """
    _check_key(seed, step)
    words = CounterStream(seed, CANDIDATES, step, _SUB_PERMUTATION).raw_at(0, n)
    return np.argsort(words, kind="stable")


def chunk_bounds(n: int, n_chunks: int) -> np.ndarray:
    """Start offsets (length n_chunks + 1) of the chunks in permuted order.

    The first ``n % n_chunks`` chunks have one dim more than the others, so sizes never differ by
    more than one (a "ceil-size, short last chunk" rule could leave the last chunk empty).
    """
    if not 0 < n_chunks <= n:
        raise ValueError("need 0 < n_chunks <= n")
    q, r = divmod(n, n_chunks)
    c = np.arange(n_chunks + 1, dtype=np.int64)
    return c * q + np.minimum(c, r)


def _search_radius_angle(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fast float32 Box-Muller radius and angle of each word, for the sender's search only.

    Same uniforms as :func:`_normals` (bits 8..31 -> u1 in (0, 1], bits 40..63 -> angle), but
    numpy's SIMD float32 log/cos, ~15x faster than float64 and not reproducible across CPUs; the
    search only ranks candidates, so 1e-7 relative errors in the scores do not matter.
    """
    r = ((words >> _SHIFT8) & _MASK24).astype(np.float32)
    r += _F32_ONE
    r *= _F32_2_POW_M24
    np.log(r, out=r)
    r *= _F32_MINUS_TWO
    np.sqrt(r, out=r)
    theta = (words >> _SHIFT40).astype(np.float32)
    theta *= _F32_TWO_PI_2_POW_M24
    return r, theta


# Platform-exact elementary functions.  Transmitted samples must be bit-identical on every machine:
# z_0 feeds the lossless section's tables and the codec checks a CRC of each decoded sample.  numpy's
# log/cos/sin differ in the last bit between SIMD and libm code paths, so the samples use only
# IEEE-exact operations (+ - * / sqrt, frexp, floor) with a fixed evaluation order.
_LOG_COEFFS = tuple(1.0 / (2 * k + 1) for k in range(9))  # 2 atanh(s) = 2 s sum s^2k / (2k+1)
_SIN_COEFFS = tuple((-1.0) ** k / math.factorial(2 * k + 1) for k in range(7))  # up to phi^13
_COS_COEFFS = tuple((-1.0) ** k / math.factorial(2 * k) for k in range(8))  # up to phi^14
_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476
_OCTANT_COS = np.array([1.0, _SQRT_HALF, 0.0, -_SQRT_HALF, -1.0, -_SQRT_HALF, 0.0, _SQRT_HALF])
_OCTANT_SIN = np.array([0.0, _SQRT_HALF, 1.0, _SQRT_HALF, 0.0, -_SQRT_HALF, -1.0, -_SQRT_HALF])


def _horner(x: np.ndarray, coeffs: tuple[float, ...]) -> np.ndarray:
    out = np.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out *= x
        out += c
    return out


def exact_log(u: np.ndarray) -> np.ndarray:
    """log(u) for positive float64 u, bit-reproducible on any IEEE-754 platform (error < 2e-15)."""
    f, e = np.frexp(u)  # u = f 2^e, f in [0.5, 1), exact
    low = f < _SQRT_HALF
    f = np.where(low, f * 2.0, f)  # f in [0.707, 1.414), exact
    e = (e - low).astype(np.float64)
    s = (f - 1.0) / (f + 1.0)  # |s| <= 0.1716
    return e * _LN2 + 2.0 * s * _horner(s * s, _LOG_COEFFS)


def exact_cos_sin(turns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of 2 pi ``turns`` (float64 with at most 49 fractional bits), bit-reproducible.

    Octant reduction is exact (t * 8 and its nearest integer are exact); the remainder angle
    |phi| <= pi/8 goes through Taylor polynomials accurate to ~1e-16.
    """
    t8 = turns * 8.0
    k = np.floor(t8 + 0.5)
    phi = (t8 - k) * (math.pi / 4.0)
    p2 = phi * phi
    sin_phi = phi * _horner(p2, _SIN_COEFFS)
    cos_phi = _horner(p2, _COS_COEFFS)
    octant = k.astype(np.int64) & 7
    ck, sk = _OCTANT_COS[octant], _OCTANT_SIN[octant]
    return ck * cos_phi - sk * sin_phi, sk * cos_phi + ck * sin_phi


def _normals(words: np.ndarray, d: int) -> np.ndarray:
    """Candidates from their words: (..., P) uint64 -> (..., d) float64, P = ceil(d / 2).

    Box-Muller on 24-bit uniforms (u1 = (a + 1) / 2^24 in (0, 1], angle = b / 2^24 turns), so the
    radius is capped at 5.8 sigma (probability 6e-8 per pair), immaterial for a diffusion latent.
    """
    u1 = ((words >> _SHIFT8) & _MASK24).astype(np.int64).astype(np.float64)
    u1 += 1.0
    u1 *= 2.0**-24
    r = np.sqrt(-2.0 * exact_log(u1))
    cos_t, sin_t = exact_cos_sin((words >> _SHIFT40).astype(np.int64).astype(np.float64) * 2.0**-24)
    out = np.empty(words.shape + (2,), dtype=np.float64)
    np.multiply(r, cos_t, out=out[..., 0])
    np.multiply(r, sin_t, out=out[..., 1])
    return out.reshape(words.shape[:-1] + (2 * words.shape[-1],))[..., :d]


def _candidate_stream(seed: int, step: int, chunk: int) -> CounterStream:
    return CounterStream(seed, CANDIDATES, step, _SUB_CANDIDATES, lane=chunk)


def candidates(seed: int, step: int, chunk: int, d: int, start: int, count: int) -> np.ndarray:
    """Candidates ``start .. start+count-1`` of a chunk with ``d`` dims, as a (count, d) float64 array.

    Candidate j occupies words [j P, (j+1) P) of the chunk's lane, so any j is reachable directly.
    """
    _check_key(seed, step)
    p = (d + 1) // 2
    words = _candidate_stream(seed, step, chunk).raw_at(start * p, count * p).reshape(count, p)
    return _normals(words, d)


def sample(indices: np.ndarray, layout: StepLayout, n: int | tuple[int, ...], seed: int, step: int) -> np.ndarray:
    """The receiver's sample X (float64, shape ``n``) from the chunk indices.

    Without chunks X is candidate 0 of lane 0 over all dims: an exact N(0, I) draw, the right
    answer when the target equals the prior.
    """
    shape = (n,) if isinstance(n, (int, np.integer)) else tuple(n)
    size = math.prod(shape)
    _check_key(seed, step)
    k = layout.n_chunks
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size != k:
        raise ValueError(f"expected {k} indices, got {indices.size}")
    if k == 0:
        return candidates(seed, step, 0, size, 0, 1).reshape(shape)
    if k > size:
        raise DecodeError(f"step layout has {k} chunks for {size} dims")
    if indices.min() < 0 or indices.max() >= layout.num_candidates:
        raise ValueError("chunk index outside the candidate range")
    bounds = chunk_bounds(size, k)
    sizes = np.diff(bounds)
    x_perm = np.empty(size, dtype=np.float64)
    reader = LaneReader(seed, CANDIDATES, step, _SUB_CANDIDATES)
    # chunks of one size are contiguous in permuted order: gather their words, convert in one call
    for d in np.unique(sizes):
        d = int(d)
        p = (d + 1) // 2
        members = np.flatnonzero(sizes == d)
        words = np.empty((members.size, p), dtype=np.uint64)
        for row, (c, j) in enumerate(zip(members.tolist(), indices[members].tolist())):
            words[row] = reader.raw_at(c, j * p, p)
        lo = int(bounds[members[0]])
        x_perm[lo : lo + members.size * d] = _normals(words, d).reshape(-1)
    x = np.empty(size, dtype=np.float64)
    x[permutation(size, seed, step)] = x_perm
    return x.reshape(shape)


# --------------------------------------------------------------------------------------------------
# Encoder: layout choice and PFR search
# --------------------------------------------------------------------------------------------------


def kl_bits_per_dim(m: np.ndarray) -> np.ndarray:
    """KL(N(m_i, 1) || N(0, 1)) = m_i^2 / 2 nats, in bits."""
    m = np.asarray(m, dtype=np.float64).reshape(-1)
    return m * m * (0.5 / math.log(2.0))


def _max_chunk_kl(cum: np.ndarray, n: int, k: int) -> float:
    b = chunk_bounds(n, k)
    return float(np.max(cum[b[1:]] - cum[b[:-1]]))


def check_pad(pad: float, c_max: int) -> None:
    """The chunk slack must leave a chunk some KL: 0 <= pad < c_max (also rejects nan)."""
    if not 0.0 <= pad < c_max:
        raise ValueError(f"pad must be in [0, c_max = {c_max})")


def choose_layout(
    m: np.ndarray,
    seed: int,
    step: int,
    c_max: int = 12,
    pad: float = DEFAULT_PAD,
    min_kl_bits: float = DEFAULT_MIN_KL_BITS,
    max_growth: float = 1.0,
) -> StepLayout:
    """The encoder's chunking decision for one step.

    k = ceil(KL / (c_max - pad)) chunks, so the *average* chunk keeps ``pad`` bits of slack below
    log2 N.  With heterogeneous m some chunks carry more (the chunk KL of d dims fluctuates by
    ~sqrt(2/d) relatively); ``max_growth > 1`` lets k grow up to that factor until no chunk exceeds
    c_max - pad/2 (else the k with the smallest worst chunk).  Measured on Gaussian and Laplacian m
    (n = 12000, c_max = 10): doubling k raises the projection efficiency by ~0.1 but costs ~40-50%
    more bits, a worse trade than a larger ``pad``, hence the default 1.0.

    End to end (``benchmarks/diffc_pad.py``, diffc-small2, 4 Kodak images at 192x128, 12 steps,
    ``benchmarks/results/diffc_pad_diffc-small2.json``) the pad hardly matters at c_max 10: BD-rate
    against pad 2 is -0.9% at pad 1 and -0.2% at pad 0 (a lower pad saves bits per step but each
    step moves the latent less, so later steps cost more); c_max 12 saves 2.4% (pad 2) / 3.4%
    (pad 0) for ~3x the channel-coding time.  More slack costs bits: pad 4 +5.8%, pad 6 +15.5%
    (``--configs 10:2,10:4,10:6``, ``diffc_pad_diffc-small2_pad4-6.json``), so the better sample is
    not worth its price.
    """
    if not 1 <= c_max <= MAX_LOG2_CANDIDATES:
        raise ValueError(f"c_max must be in [1, {MAX_LOG2_CANDIDATES}]")
    check_pad(pad, c_max)
    if not max_growth >= 1.0:
        raise ValueError("max_growth must be >= 1")
    _check_key(seed, step)
    kl = kl_bits_per_dim(m)
    n = kl.size
    if not np.all(np.isfinite(kl)):
        raise ValueError("m must be finite")
    total = float(kl.sum())
    if n == 0 or total < min_kl_bits:
        return StepLayout(0)
    k0 = min(n, max(1, math.ceil(total / (c_max - pad))))
    k = k0
    k_stop = min(n, int(k0 * max_growth))
    if k_stop > k0:
        limit = c_max - pad / 2.0
        cum = np.concatenate([[0.0], np.cumsum(kl[permutation(n, seed, step)])])
        best = (math.inf, k0)
        while True:
            worst = _max_chunk_kl(cum, n, k)
            if worst <= limit:
                break
            best = min(best, (worst, k))
            if k >= k_stop:
                k = best[1]
                break
            k = min(k_stop, max(k + 1, int(k * 1.02)))
    kl_units = int(round(total * KL_UNITS_PER_BIT))
    kappa = kl_units / KL_UNITS_PER_BIT / k
    log2n = min(c_max, max(LOG2_CANDIDATES_MIN, math.ceil(kappa) + LOG2_CANDIDATES_EXTRA))
    return StepLayout(k, kl_units, log2n)


def chunk_kl_bits(m: np.ndarray, layout: StepLayout, seed: int, step: int) -> np.ndarray:
    """Actual KL (bits) of each chunk of a layout: a diagnostic for the encoder and benchmarks."""
    kl = kl_bits_per_dim(m)
    if layout.n_chunks == 0:
        return np.zeros(0)
    cum = np.concatenate([[0.0], np.cumsum(kl[permutation(kl.size, seed, step)])])
    b = chunk_bounds(kl.size, layout.n_chunks)
    return cum[b[1:]] - cum[b[:-1]]


def _pairs_polar(m: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Polar form (rho, phi) as float32 of the dim pairs of chunks: m is (..., d) float64."""
    p = (d + 1) // 2
    pairs = np.zeros(m.shape[:-1] + (2 * p,), dtype=np.float64)
    pairs[..., :d] = m
    pairs = pairs.reshape(m.shape[:-1] + (p, 2))
    rho = np.hypot(pairs[..., 0], pairs[..., 1]).astype(np.float32)
    phi = np.arctan2(pairs[..., 1], pairs[..., 0]).astype(np.float32)
    return rho, phi


def _log_arrival_times(raw: np.ndarray) -> np.ndarray:
    """log T_j of the sender's arrival times T_j = E_0 + ... + E_j (along the last axis), E ~ Exp(1)
    from uniforms in (0, 1]."""
    u = ((raw >> _SHIFT11).astype(np.int64) + 1).astype(np.float64) * 2.0**-53
    return np.log(np.cumsum(-np.log(u), axis=-1))


class _Readers(NamedTuple):
    candidates: LaneReader
    sender: LaneReader


def _readers(seed: int, step: int) -> _Readers:
    return _Readers(LaneReader(seed, CANDIDATES, step, _SUB_CANDIDATES),
                    LaneReader(seed, CANDIDATES, step, _SUB_SENDER))


def _search_chunk(m_c: np.ndarray, seed: int, step: int, chunk: int, num: int,
                  readers: _Readers | None = None) -> int:
    """Truncated PFR: argmin_j log T_j - m.X_j over the first ``num`` candidates of a chunk.

    (-|m|^2/2 of the log density ratio is the same for every j and dropped.)  Strict ``<`` across
    blocks keeps the first of equal scores, as a single argmin would.
    """
    readers = readers or _readers(seed, step)
    d = m_c.size
    p = (d + 1) // 2
    rho, phi = _pairs_polar(m_c, d)
    log_t = _log_arrival_times(readers.sender.raw_at(chunk, 0, num))
    block = max(1, _BLOCK_WORDS // p)
    best_score, best_j = math.inf, 0
    for j0 in range(0, num, block):
        b = min(block, num - j0)
        r, theta = _search_radius_angle(readers.candidates.raw_at(chunk, j0 * p, b * p).reshape(b, p))
        theta -= phi
        np.cos(theta, out=theta)
        theta *= r
        score = log_t[j0 : j0 + b] - (theta @ rho)
        i = int(np.argmin(score))
        if score[i] < best_score:
            best_score, best_j = float(score[i]), j0 + i
    return best_j


def _search_small_chunks(m: np.ndarray, first: int, num: int, readers: _Readers) -> np.ndarray:
    """:func:`_search_chunk` for consecutive chunks ``first, first+1, ...`` of equal size whose
    ``num`` candidates fit in one search block, vectorised across chunks.

    m is (chunks, d).  Why: with small chunks (high-KL-per-dim steps, large images) the per-chunk
    numpy calls cost far more than the candidates.  Every operation is elementwise except the
    projections ``theta @ rho``: numpy's stacked matmul runs the same BLAS kernel on each chunk's
    (num, p) slice as :func:`_search_chunk`'s single call, so both return the same indices bit for
    bit (``tests/test_channel.py`` compares them).
    """
    g, d = m.shape
    p = (d + 1) // 2
    rho, phi = _pairs_polar(m, d)
    cand = np.empty((g, num * p), dtype=np.uint64)
    sender = np.empty((g, num), dtype=np.uint64)
    for i in range(g):
        cand[i] = readers.candidates.raw_at(first + i, 0, num * p)
        sender[i] = readers.sender.raw_at(first + i, 0, num)
    r, theta = _search_radius_angle(cand.reshape(g, num, p))
    theta -= phi[:, None, :]
    np.cos(theta, out=theta)
    theta *= r
    proj = np.matmul(theta, rho[:, :, None])[:, :, 0]
    return np.argmin(_log_arrival_times(sender) - proj, axis=1)


def default_workers() -> int:
    """Threads for the sender's search: the CPUs this process may use, at most 8."""
    return max(1, min(8, available_cpus()))


def select_indices(
    m: np.ndarray, layout: StepLayout, seed: int, step: int, workers: int | None = None
) -> np.ndarray:
    """The sender's PFR choice j* for every chunk of ``layout`` (int64 array of n_chunks).

    Chunks are searched independently, so ``workers`` threads (default :func:`default_workers`)
    split them into contiguous ranges; numpy's Philox and ufuncs release the GIL.  Every chunk's
    result depends only on (m, seed, step, chunk), never on the thread count or on how chunks are
    batched: small chunks go through :func:`_search_small_chunks` in batches of about
    ``_BATCH_WORDS`` candidate words, large ones through :func:`_search_chunk`.
    """
    _check_key(seed, step)
    m = np.asarray(m, dtype=np.float64).reshape(-1)
    k = layout.n_chunks
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    m_perm = m[permutation(m.size, seed, step)]
    bounds = chunk_bounds(m.size, k)
    num = layout.num_candidates
    out = np.empty(k, dtype=np.int64)
    big = m.size % k  # chunks 0..big-1 have one dim more than the others (chunk_bounds)

    def search(lo: int, hi: int) -> None:
        readers = _readers(seed, step)
        c = lo
        while c < hi:
            d = int(bounds[c + 1] - bounds[c])
            p = (d + 1) // 2
            if num * p > _BLOCK_WORDS:
                out[c] = _search_chunk(m_perm[bounds[c] : bounds[c + 1]], seed, step, c, num, readers)
                c += 1
                continue
            end = min(hi, big if c < big else k, c + max(1, _BATCH_WORDS // (num * (p + 1))))
            rows = m_perm[bounds[c] : bounds[end]].reshape(end - c, d)
            out[c:end] = _search_small_chunks(rows, c, num, readers)
            c = end

    workers = min(k, workers or default_workers())
    if workers <= 1:
        search(0, k)
        return out
    cuts = [k * i // workers for i in range(workers + 1)]
    searchers = pool("channel", workers)
    futures = [searchers.submit(search, cuts[i], cuts[i + 1]) for i in range(workers)]
    wait(futures)  # every range done (or failed) before ``out`` is used or an error is raised
    for f in futures:
        f.result()
    return out


# --------------------------------------------------------------------------------------------------
# Index model and entropy coding
# --------------------------------------------------------------------------------------------------


def _interp_index(grid: tuple[float, ...], x: float) -> tuple[int, float]:
    if x <= grid[0]:
        return 0, 0.0
    if x >= grid[-1]:
        return len(grid) - 2, 1.0
    i = bisect.bisect_right(grid, x) - 1
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])


def zipf_exponent(chunk_kl_bits: float, log2_candidates: int) -> float:
    """Exponent s of the index model for a chunk KL and candidate count (clamped to the table).

    Bilinear interpolation in pure Python floats (IEEE arithmetic only, so both sides agree bit
    for bit), rounded to 1/256.
    """
    s = _bilinear(_EXPONENT_TABLE, chunk_kl_bits, log2_candidates)
    return round(s * _EXPONENT_GRID) / _EXPONENT_GRID


def _bilinear(table: tuple[tuple[float, ...], ...], chunk_kl_bits: float, log2_candidates: int) -> float:
    i, a = _interp_index(_KAPPA_GRID, chunk_kl_bits)
    j, b = _interp_index(_PAD_GRID, log2_candidates - chunk_kl_bits)
    t = table
    return (1 - a) * ((1 - b) * t[i][j] + b * t[i][j + 1]) + a * ((1 - b) * t[i + 1][j] + b * t[i + 1][j + 1])


def projection_efficiency(layout: StepLayout) -> float:
    """Expected E[X.m] / |m|^2 of a step's sample from its layout alone (0 without chunks).

    Truncated PFR returns X ~ eff * m + N(0, I) rather than N(m, I): the sample falls short of the
    target by (1 - eff) m (Vonderfecht & Liu measure ~0.86 at 2^16 candidates).  This is the
    simulated value for the layout's mean chunk KL and candidate count; chunks whose KL exceeds the
    mean have a lower efficiency, so on steps of many small chunks the actual value is lower (0.72
    against 0.84 on diffc-small4's last step, ~4 dims per chunk: ``benchmarks/diffc_kodak.py
    --efficiency``, ``benchmarks/results/diffc-small4_channel-aware_rd.json``): see
    :func:`estimate_efficiency`.
    Pure Python floats, so the value is the same on every platform.
    """
    if layout.n_chunks == 0:
        return 0.0
    kappa = layout.kl_units / KL_UNITS_PER_BIT / layout.n_chunks
    return max(0.0, min(1.0, _bilinear(_EFFICIENCY_TABLE, kappa, layout.log2_candidates)))


EFFICIENCY_PRIOR_STD = 0.1
"""Spread of the actual eff^2 around the layout's simulated value (see :func:`estimate_efficiency`)."""
EFFICIENCY_GRID = 4096
"""Estimated efficiencies are rounded to 1/4096: a sum's last bits may depend on the platform's SIMD
width, a value on this grid does not (barring a tie within ~1e-13 of a grid boundary)."""
EFFICIENCY_MIN = math.ceil(math.sqrt(0.5) * EFFICIENCY_GRID) / EFFICIENCY_GRID
"""The smallest estimate: 1/sqrt(2) rounded up onto the grid (see :func:`estimate_efficiency`)."""


def estimate_efficiency(x: np.ndarray, layout: StepLayout) -> float:
    """The receiver's estimate of a step's projection efficiency, from its sample ``x`` and layout.

    With X = eff m + N(0, I) over n dims, E|X|^2 = eff^2 |m|^2 + n, and |m|^2 = 2 ln 2 KL is in the
    layout, so (|X|^2 - n) / |m|^2 estimates eff^2 with variance ~2n / |m|^4: precise on the large
    steps where the sample's shortfall matters (a standard error of ~0.02 at 8600 bits over 74k dims),
    noisy on small ones.  It is combined with the layout's simulated value
    (:func:`projection_efficiency`, prior standard deviation :data:`EFFICIENCY_PRIOR_STD` on eff^2) by
    inverse-variance weighting.  Returns 0 for a step without chunks (no information was sent), else
    a value in [1/sqrt(2), 1] on a 1/:data:`EFFICIENCY_GRID` grid (below 1/sqrt(2) the rescaled step of
    :func:`diffcodec.codecs.diffc.undo_shortfall` could hold less information than z_t alone).
    Measured on diffc-small4's files (4 kodak-small images, same JSON as above): within 0.03 of the
    encoder's E[X.m] / |m|^2 from step 8 of 16 (6000 bits) on, within 0.012 on steps 12-16.
    """
    if layout.n_chunks == 0:
        return 0.0
    norm2 = 2.0 * math.log(2.0) * layout.kl_units / KL_UNITS_PER_BIT
    prior = projection_efficiency(layout) ** 2
    if norm2 <= 0.0:
        return max(EFFICIENCY_MIN, round(math.sqrt(min(1.0, prior)) * EFFICIENCY_GRID) / EFFICIENCY_GRID)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    block = 1 << 20  # a fixed summation order (numpy's pairwise sum per block), bounded temporaries
    sq = sum(float(np.sum(np.square(x[i : i + block]))) for i in range(0, x.size, block))
    measured = (sq - x.size) / norm2
    var_measured = 2.0 * x.size / norm2**2
    var_prior = EFFICIENCY_PRIOR_STD**2
    eff2 = (measured * var_prior + prior * var_measured) / (var_prior + var_measured)
    eff = math.sqrt(min(1.0, max(0.0, eff2)))
    return max(EFFICIENCY_MIN, round(eff * EFFICIENCY_GRID) / EFFICIENCY_GRID)


@lru_cache(maxsize=32)
def _index_model(exponent_units: int, log2n: int) -> tuple[np.ndarray, constriction.stream.model.Categorical]:
    """log2 probabilities and the constriction model of the truncated Zipf law (cached per step kind).

    Built in float64 from (integer exponent units, log2 N) only: constriction quantizes the floats
    to 24-bit fixed point, so both sides agree unless pow() differs in the last bit across
    platforms *and* that moves an entry across a quantization boundary (~1e-8 per table).
    """
    w = np.power(np.arange(1, (1 << log2n) + 1, dtype=np.float64), -exponent_units / _EXPONENT_GRID)
    probs = w / w.sum()
    model = constriction.stream.model.Categorical(probs, perfect=False)
    return np.log2(probs), model


def index_model(layout: StepLayout) -> tuple[np.ndarray, constriction.stream.model.Categorical]:
    """(log2 P(j) for j < N, constriction model) of a layout's chunk indices."""
    if layout.n_chunks == 0:
        raise ValueError("a step without chunks has no index model")
    s = zipf_exponent(layout.chunk_kl_bits, layout.log2_candidates)
    return _index_model(int(round(s * _EXPONENT_GRID)), layout.log2_candidates)


def _decode_words(payload: bytes, k: int, model: constriction.stream.model.Categorical) -> np.ndarray:
    """Decode ``k`` indices; the payload is big-endian 32-bit words with trailing zero bytes cut.

    No end-of-stream check (``maybe_exhausted``): demanding it would forbid the shortened
    termination and cost ~10 bits per step.  Corruption is the container's job (section CRC and
    CRC of the decoded symbols); here only undecodable data and the length bound are caught.
    """
    data = bytes(payload) + b"\x00" * (-len(payload) % 4)
    words = np.frombuffer(data, dtype=">u4").astype(np.uint32)
    try:
        out = np.asarray(constriction.stream.queue.RangeDecoder(words).decode(model, k), dtype=np.int64)
    except Exception as e:
        raise DecodeError(f"corrupt channel-coded indices: {e}") from None
    return out


def _max_payload_bits(ideal_bits: float, k: int) -> float:
    """Upper bound on an honest payload: ideal bits, constriction's 24-bit quantization of the
    probabilities (< 0.25 bit per symbol), and the range coder's flush (< 3 words)."""
    return ideal_bits + 0.25 * k + 96.0


def _decodes_to(payload: bytes, indices: np.ndarray, model: constriction.stream.model.Categorical) -> bool:
    try:
        return bool(np.array_equal(_decode_words(payload, indices.size, model), indices))
    except DecodeError:
        return False


def encode_indices(indices: np.ndarray, layout: StepLayout) -> tuple[bytes, float]:
    """Range-code chunk indices; returns (payload, ideal bits = sum of -log2 P(j*)).

    The payload is then shortened: for each length L among the last few bytes, the first L bytes
    rounded *up* (the smallest L-byte value >= the coder's value, which lies in the final coding
    interval if any L-byte value does) followed by implicit zeros; the shortest one that provably
    decodes to the same indices (trial decoding with the decoder's own function) is kept.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size != layout.n_chunks:
        raise ValueError(f"expected {layout.n_chunks} indices, got {indices.size}")
    if layout.n_chunks == 0:
        return b"", 0.0
    if indices.min() < 0 or indices.max() >= layout.num_candidates:
        raise ValueError("chunk index outside the candidate range")
    log2p, model = index_model(layout)
    ideal = float(-log2p[indices].sum())
    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(indices.astype(np.int32), model)
    full = enc.get_compressed().astype(">u4").tobytes()
    best = full.rstrip(b"\x00")
    if not _decodes_to(best, indices, model) or 8 * len(best) > _max_payload_bits(ideal, indices.size):
        raise RuntimeError("range coder round trip failed")  # pragma: no cover - constriction bug
    for length in range(len(full) - 1, max(-1, len(full) - 1 - _SHORTEN_TAIL_BYTES), -1):
        head = full[:length]
        if any(full[length:]):
            v = int.from_bytes(head, "big") + 1
            if v >> (8 * length):
                continue
            head = v.to_bytes(length, "big")
        head = head.rstrip(b"\x00")
        if len(head) < len(best) and _decodes_to(head, indices, model):
            best = head
    return best, ideal


def decode_indices(payload: bytes, layout: StepLayout) -> np.ndarray:
    """Inverse of :func:`encode_indices`; raises :class:`DecodeError` on detectably corrupt data."""
    if layout.n_chunks == 0:
        if payload:
            raise DecodeError("payload present for a step without chunks")
        return np.zeros(0, dtype=np.int64)
    log2p, model = index_model(layout)
    indices = _decode_words(payload, layout.n_chunks, model)
    if 8 * len(payload) > _max_payload_bits(float(-log2p[indices].sum()), indices.size):
        raise DecodeError("corrupt channel-coded indices: payload longer than its indices need")
    return indices


# --------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------


class EncodedStep(NamedTuple):
    """Result of :func:`encode_step`.

    x: the transmitted sample (float64, shape of m), bit-identical to :func:`decode_step`'s
    payload: range-coded chunk indices (may be empty)
    layout: what the decoder needs besides the payload (store ``layout.to_bytes()``)
    ideal_bits: sum over chunks of -log2 P(j*) under the index model
    kl_bits: the exact step KL |m|^2 / (2 ln 2)

    (The chunk indices, if wanted, are ``decode_indices(payload, layout)``.)
    """

    x: np.ndarray
    payload: bytes
    layout: StepLayout
    ideal_bits: float
    kl_bits: float


def encode_step(
    m: np.ndarray,
    seed: int,
    step: int,
    c_max: int = 12,
    pad: float = DEFAULT_PAD,
    min_kl_bits: float = DEFAULT_MIN_KL_BITS,
    max_growth: float = 1.0,
    workers: int | None = None,
) -> EncodedStep:
    """Send a sample of N(m, I) against the shared proposal N(0, I).

    m = (mu_Q - mu_P) / beta of one diffusion step (any shape; float64 recommended).  The caller
    forms z = mu_P + beta * x.  ``seed`` and ``step`` key all shared randomness, so every step of a
    file must use a distinct ``step``.  Cost: n/2 * 2^c_max float32 Box-Muller pairs (~10 ns each
    on one core); c_max trades speed for sample quality and rate (see the module notes).
    """
    m = np.asarray(m, dtype=np.float64)
    layout = choose_layout(m, seed, step, c_max=c_max, pad=pad, min_kl_bits=min_kl_bits, max_growth=max_growth)
    indices = select_indices(m, layout, seed, step, workers)
    payload, ideal = encode_indices(indices, layout)
    x = sample(indices, layout, m.shape, seed, step)
    return EncodedStep(x, payload, layout, ideal, float(kl_bits_per_dim(m).sum()))


def decode_step(payload: bytes, layout: StepLayout, n: int | tuple[int, ...], seed: int, step: int) -> np.ndarray:
    """The receiver's sample X (float64 of shape ``n``, an int or a shape tuple)."""
    shape = (n,) if isinstance(n, (int, np.integer)) else tuple(n)
    if layout.n_chunks > math.prod(shape):
        raise DecodeError(f"step layout has {layout.n_chunks} chunks for {math.prod(shape)} dims")
    return sample(decode_indices(payload, layout), layout, shape, seed, step)


def sample_crc(x: np.ndarray) -> int:
    """CRC32 of a sample's float64 little-endian bytes: detects a decoder that rebuilt a different
    sample (wrong model, corrupt payload).  Samples are platform-exact, so this holds across
    machines."""
    return zlib.crc32(np.ascontiguousarray(x, dtype="<f8").tobytes()) & 0xFFFFFFFF
