import numpy as np
import pytest

from diffcodec import entropy
from diffcodec.errors import DecodeError


def _tables(n, k, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(n, k))
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def test_roundtrip_and_near_ideal_rate(monkeypatch):
    monkeypatch.setattr(entropy, "MAX_TABLE_ENTRIES", 5000)  # force several blocks
    n, k = 20000, 9
    probs = _tables(n, k)
    rng = np.random.default_rng(1)
    sym = np.array([rng.choice(k, p=p) for p in probs[:n]])
    payload, ideal = entropy.encode_categorical(sym, k, lambda sl: probs[sl])
    assert len(payload) * 8 <= ideal * 1.01 + 64
    out = entropy.decode_categorical(payload, n, k, lambda sl: probs[sl])
    assert np.array_equal(out, sym)


def test_table_threads_change_no_bit(monkeypatch):
    """Tables built ahead in 1 or 3 threads, in blocks of any size: the same stream and symbols."""
    n, k = 6000, 7
    probs = _tables(n, k, seed=3)
    sym = np.random.default_rng(4).integers(0, k, n)
    streams = set()
    for workers, entries, split in [(1, 1 << 22, 1 << 15), (1, 700, 1 << 15), (3, 700, 1 << 15), (3, 7, 1 << 15),
                                    (2, 1 << 22, 1000), (3, 1 << 22, 1000)]:
        monkeypatch.setattr(entropy, "TABLE_WORKERS", workers)
        monkeypatch.setattr(entropy, "MAX_TABLE_ENTRIES", entries)
        monkeypatch.setattr(entropy, "MIN_SPLIT_ENTRIES", split)
        payload, _ = entropy.encode_categorical(sym, k, lambda sl: probs[sl])
        streams.add(payload)
        assert np.array_equal(entropy.decode_categorical(payload, n, k, lambda sl: probs[sl]), sym)
    assert len(streams) == 1


def test_blocks_cover_the_range_and_feed_every_thread():
    for n, alphabet, parts in [(73728, 5, 2), (1000, 5, 2), (1179648, 3, 2), (5, 7, 4), (0, 3, 2)]:
        sl = list(entropy.blocks(n, alphabet, parts))
        assert [s.start for s in sl] == [0] + [s.stop for s in sl[:-1]] and sl[-1].stop == n if n else sl == []
        assert all((s.stop - s.start) * alphabet <= max(alphabet, entropy.MAX_TABLE_ENTRIES) for s in sl)
        if n * alphabet >= parts * entropy.MIN_SPLIT_ENTRIES:
            assert len(sl) >= parts


def test_improbable_symbols_still_code():
    probs = np.zeros((10, 5))
    probs[:, 0] = 1.0
    sym = np.full(10, 4)
    payload, _ = entropy.encode_categorical(sym, 5, lambda sl: probs[sl])
    assert np.array_equal(entropy.decode_categorical(payload, 10, 5, lambda sl: probs[sl]), sym)


def test_symbol_outside_alphabet_rejected():
    with pytest.raises(ValueError):
        entropy.encode_categorical(np.array([5]), 5, lambda sl: np.ones((1, 5)))


def test_bad_payload_length():
    with pytest.raises(DecodeError):
        entropy.decode_categorical(b"abc", 3, 2, lambda sl: np.ones((sl.stop - sl.start, 2)))


def test_log_logistic_bin_matches_naive_and_is_stable():
    lo = np.array([-3.0, 0.0, 2.0, 40.0, -60.0])
    hi = lo + np.array([1.0, 0.5, 3.0, 1.0, 1e-3])
    with np.errstate(divide="ignore", over="ignore"):
        naive = np.log(1 / (1 + np.exp(-hi)) - 1 / (1 + np.exp(-lo)))
    got = entropy.log_logistic_bin(lo, hi)
    np.testing.assert_allclose(got[:3], naive[:3], rtol=1e-10)
    assert np.all(np.isfinite(got))  # naive underflows in the tails


def test_quantize_to_grid():
    x = np.array([0.1, -0.3, 1 / 3])
    q = entropy.quantize_to_grid(x, 8)
    assert np.all(q * 256 == np.round(q * 256)) and np.max(np.abs(q - x)) <= 2**-9


@pytest.mark.parametrize("half_width", [1, 2, 7])
def test_logistic_tables_equal_the_row_per_element_formula(half_width):
    """The (K, n)-layout tables hold exactly the values of the plain (n, K) broadcast formula."""
    rng = np.random.default_rng(half_width)
    mu, log_s = rng.normal(0, 2, 5000), rng.normal(0, 1.5, 5000)
    ks = np.arange(-half_width, half_width + 1, dtype=np.float64)
    inv = np.exp(-log_s)[:, None]
    centre = ks[None, :] - mu[:, None]
    ref = np.exp(entropy.log_logistic_bin((centre - 0.5) * inv, (centre + 0.5) * inv))
    got = entropy.logistic_tables(mu, log_s, half_width)
    assert got.shape == ref.shape and np.array_equal(got.view(np.uint64), ref.view(np.uint64))


def test_logistic_bin_probs_equal_the_formula_bit_for_bit():
    """The in-place version computes exactly exp(log_logistic_bin(lo, hi)), tails and signed zeros too."""
    rng = np.random.default_rng(7)
    lo = np.concatenate([rng.normal(0, 3, 20000), rng.uniform(-800, 800, 2000), [0.0, -0.0, -1e-300, 36.0]])
    gap = np.concatenate([rng.uniform(1e-9, 4, 22000), [0.5, 0.5, 1e-300, 1e-17]])
    hi = lo + gap
    with np.errstate(divide="ignore", over="ignore", under="ignore"):
        ref = np.exp(entropy.log_logistic_bin(lo, hi))
        got = entropy.logistic_bin_probs(lo.copy(), hi)
    assert np.array_equal(got.view(np.uint64), ref.view(np.uint64))


def test_rows_of_vanishing_mass_code_under_the_uniform_table():
    """A table row whose mass constriction cannot normalise (a prior hundreds of scales off every symbol:
    below ~1e-301 it panicked, below ~2e-308 it refused) is coded under the uniform table, on both sides;
    rows it took before are untouched."""
    rows = np.array([[0.5e-316, 0.5e-316, 0.0], [0.5e-303, 0.5e-303, 0.0], [0.0, 0.0, 0.0],
                     [0.2, 0.3, 0.5], [1e-250, 0.0, 1e-250]])
    fixed = entropy.codable(rows)
    assert np.array_equal(fixed[:3], np.ones((3, 3))) and np.array_equal(fixed[3:], rows[3:])
    sym = np.array([1, 0, 2, 2, 0], dtype=np.int32)
    payload, ideal = entropy.encode_categorical(sym, 3, lambda sl: rows[sl])
    assert np.array_equal(entropy.decode_categorical(payload, sym.size, 3, lambda sl: rows[sl]), sym)
    assert ideal == pytest.approx(3 * np.log2(3) + -np.log2(0.5) + 1.0, rel=1e-9)
