"""Counter-based, versioned random streams shared by encoder and decoder.

Encoder and decoder must draw *identical* noise (z_T, dither, channel-coding candidates) in any
process, on any thread count.  We use numpy's Philox counter-based generator keyed by
(seed, purpose, index) and convert its raw 64-bit outputs to floats ourselves, because numpy only
guarantees the raw bit stream — not ``Generator.normal`` — to be stable across numpy versions.
Python's ``hash()`` (salted per process) is never involved.
"""

from __future__ import annotations

import numpy as np
from numpy.random import Philox  # numpy >= 2 loads numpy.random lazily: at import, not in the first encode

# purposes: distinct streams for distinct uses of randomness
Z_T = 1
DITHER = 2
ANCESTRAL = 3
CANDIDATES = 4
TRAIN = 5
KEPT = 6  # UQDM steps that keep part of their coordinates: the prior draws of the others

_TWO_PI = 2.0 * np.pi


class SeededStream:
    """A reproducible stream for one (seed, purpose, index) key."""

    def __init__(self, seed: int, purpose: int, index: int = 0, sub: int = 0):
        if not (0 <= seed < 2**64 and 0 <= purpose < 2**16 and 0 <= index < 2**32 and 0 <= sub < 2**16):
            raise ValueError("random stream key out of range")
        key = np.array([seed, (purpose << 48) | (sub << 32) | index], dtype=np.uint64)
        self._bg = Philox(key=key)

    def raw(self, n: int) -> np.ndarray:
        return self._bg.random_raw(n).astype(np.uint64)

    def uniform(self, shape) -> np.ndarray:
        """U[0, 1) float64 with 53 random bits."""
        n = int(np.prod(shape))
        return ((self.raw(n) >> np.uint64(11)).astype(np.float64) * (2.0**-53)).reshape(shape)

    def normal(self, shape) -> np.ndarray:
        """Standard normal float64 by Box-Muller on our own uniforms."""
        n = int(np.prod(shape))
        m = (n + 1) // 2
        u1 = 1.0 - self.uniform((m,))  # (0, 1]
        u2 = self.uniform((m,))
        r = np.sqrt(-2.0 * np.log(u1))
        out = np.concatenate([r * np.cos(_TWO_PI * u2), r * np.sin(_TWO_PI * u2)])[:n]
        return out.reshape(shape)

    def logistic(self, shape) -> np.ndarray:
        u = np.clip(self.uniform(shape), 1e-300, 1.0 - 2.0**-53)
        return np.log(u) - np.log1p(-u)


class CounterStream:
    """Random access into a Philox stream keyed like :class:`SeededStream`, plus a 64-bit *lane*.

    Why it exists: reverse channel coding (:mod:`diffcodec.channel`) needs candidate ``j`` of chunk
    ``c`` of step ``t`` without generating candidates ``0..j-1``, and (step, chunk) does not fit in
    :class:`SeededStream`'s 32-bit ``index`` and 16-bit ``sub`` fields.  Philox is counter-based:
    each 256-bit counter value ``[w0, w1, w2, w3]`` yields four 64-bit words and the stream only
    increments ``w0`` (carrying into ``w1`` after 2**64 blocks, i.e. never in practice).  So

    * seeking to word ``r`` means starting the counter at ``w0 = r // 4`` (and dropping ``r % 4``
      words), which costs one Philox construction instead of ``r`` draws;
    * putting the lane in ``w3`` gives 2**64 disjoint streams per (seed, purpose, index, sub) key.

    Lane 0 read from word 0 is exactly :class:`SeededStream`'s raw stream for the same key (a test
    pins this), so this class is purely additive: no existing stream changes.
    """

    def __init__(self, seed: int, purpose: int, index: int = 0, sub: int = 0, lane: int = 0):
        if not 0 <= lane < 2**64:
            raise ValueError("random stream lane out of range")
        self._key = _philox_key(seed, purpose, index, sub)
        self._lane = int(lane)

    def raw_at(self, start: int, count: int) -> np.ndarray:
        """``count`` raw 64-bit words starting at word ``start`` of this lane (uint64 array)."""
        block, skip = _position(start, count)
        counter = np.array([block, 0, 0, self._lane], dtype=np.uint64)
        bg = Philox(key=self._key, counter=counter)
        out = bg.random_raw(int(count) + skip).astype(np.uint64, copy=False)
        return out[skip:] if skip else out


class LaneReader:
    """Reads :class:`CounterStream` words of *many* lanes of one key through a single generator.

    Why: constructing ``np.random.Philox`` is slow (it draws OS entropy for a seed sequence it then
    ignores), which dominated reverse channel coding with many small chunks (one lane each).
    Re-seating one generator's counter through its ``state`` setter is several times cheaper and
    yields the same words: ``LaneReader(key).raw_at(lane, s, n) == CounterStream(key, lane).raw_at(s, n)``
    (a test pins this).  Not thread-safe: use one reader per thread.
    """

    def __init__(self, seed: int, purpose: int, index: int = 0, sub: int = 0):
        key = _philox_key(seed, purpose, index, sub)
        self._bg = Philox(key=key)
        # plain lists: the state setter reads them element by element, faster from lists than arrays
        self._counter = [0, 0, 0, 0]
        self._state = {"bit_generator": "Philox", "state": {"counter": self._counter, "key": [int(k) for k in key]},
                       "buffer": [0, 0, 0, 0], "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}

    def raw_at(self, lane: int, start: int, count: int) -> np.ndarray:
        """``count`` raw words of ``lane`` from word ``start`` (uint64 array)."""
        if not 0 <= lane < 2**64:
            raise ValueError("random stream lane out of range")
        block, skip = _position(start, count)
        self._counter[0] = block
        self._counter[3] = int(lane)
        # buffer_pos 4 = empty buffer: the next draw increments the counter first, as a fresh Philox does
        self._bg.state = self._state
        out = self._bg.random_raw(int(count) + skip)
        return out[skip:] if skip else out


def _philox_key(seed: int, purpose: int, index: int, sub: int) -> np.ndarray:
    if not (0 <= seed < 2**64 and 0 <= purpose < 2**16 and 0 <= index < 2**32 and 0 <= sub < 2**16):
        raise ValueError("random stream key out of range")
    return np.array([seed, (purpose << 48) | (sub << 32) | index], dtype=np.uint64)


def _position(start: int, count: int) -> tuple[int, int]:
    """(Philox block, words to skip in it) of word ``start``; checks the range."""
    if start < 0 or count < 0 or (start + count) // 4 >= 2**64:
        raise ValueError("random stream position out of range")
    return divmod(int(start), 4)
