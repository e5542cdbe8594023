"""Reverse channel coding (diffcodec.channel): exact regeneration, cost tracks KL, sample quality."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffcodec import channel as ch
from diffcodec.errors import DecodeError
from diffcodec.rng import CANDIDATES, CounterStream, LaneReader, SeededStream


def _m_with_kl(n: int, kl_bits_per_dim: float, seed: int = 0, kind: str = "gauss") -> np.ndarray:
    """A normalised mean with the given average KL per dim (bits)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(n) if kind == "gauss" else np.sign(rng.standard_normal(n))
    return g / np.sqrt(np.mean(g * g)) * math.sqrt(2.0 * kl_bits_per_dim * math.log(2.0))


# -- shared randomness ---------------------------------------------------------------------------


def test_counter_stream_extends_seeded_stream_without_changing_it():
    """Lane 0 is SeededStream's raw stream; seeking reproduces the same words; lanes differ."""
    ref = SeededStream(5, CANDIDATES, 7, 3).raw(40)
    cs = CounterStream(5, CANDIDATES, 7, 3)
    assert np.array_equal(cs.raw_at(0, 40), ref)
    assert np.array_equal(cs.raw_at(13, 20), ref[13:33])
    assert not np.array_equal(CounterStream(5, CANDIDATES, 7, 3, lane=1).raw_at(0, 40), ref)
    with pytest.raises(ValueError):
        CounterStream(5, CANDIDATES, lane=2**64)


def test_lane_reader_reads_the_counter_stream_words():
    """One re-seated generator gives every lane's words exactly (random positions, huge lanes)."""
    reader = LaneReader(5, CANDIDATES, 7, 3)
    rng = np.random.default_rng(0)
    cases = [(0, 0, 40), (2**64 - 1, 2**62 + 3, 9), (1, 7, 0)]
    cases += [(int(rng.integers(0, 2**63)), int(rng.integers(0, 5000)), int(rng.integers(0, 30))) for _ in range(200)]
    for lane, start, count in cases:
        ref = CounterStream(5, CANDIDATES, 7, 3, lane=lane).raw_at(start, count)
        got = reader.raw_at(lane, start, count)
        assert got.dtype == np.uint64 and np.array_equal(got, ref), (lane, start, count)
    with pytest.raises(ValueError):
        reader.raw_at(2**64, 0, 1)
    with pytest.raises(ValueError):
        reader.raw_at(0, -1, 1)


def test_candidate_j_is_generated_without_its_predecessors():
    block = ch.candidates(3, 9, 4, 7, 0, 50)
    for j in (0, 1, 17, 49):
        assert np.array_equal(ch.candidates(3, 9, 4, 7, j, 1)[0], block[j])
    assert block.dtype == np.float64 and block.shape == (50, 7)


def test_candidates_are_standard_normal():
    x = ch.candidates(0, 0, 0, 64, 0, 2000)
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1.0) < 0.01
    assert abs(np.mean(x[:, 0] * x[:, 1])) < 0.05  # the two halves of a Box-Muller pair


def test_exact_elementary_functions_match_libm():
    """The platform-exact log / cos / sin agree with numpy to ~1 ulp."""
    rng = np.random.default_rng(0)
    u = np.concatenate([(rng.integers(0, 2**24, 100_000) + 1.0) * 2.0**-24, [2.0**-24, 0.5, 1.0, 0.7071067811865476]])
    assert np.max(np.abs(ch.exact_log(u) - np.log(u))) < 4e-15
    assert ch.exact_log(np.array([1.0]))[0] == 0.0
    t = np.concatenate([rng.integers(0, 2**24, 100_000) * 2.0**-24, np.arange(16) / 16.0])
    c, s = ch.exact_cos_sin(t)
    assert np.max(np.abs(c - np.cos(2 * np.pi * t))) < 1e-15
    assert np.max(np.abs(s - np.sin(2 * np.pi * t))) < 1e-15


def test_candidate_values_are_pinned():
    """Files encoded today must decode to the same samples with future versions of the code."""
    x = ch.candidates(1, 2, 3, 5, 7, 1)[0]
    assert x.tolist() == [
        -0.8241856299643511,
        1.6860260847234678,
        0.9655768689079047,
        -0.16106098316114095,
        0.8590805984795162,
    ]


def test_permutation_and_chunks():
    p = ch.permutation(1000, 1, 2)
    assert np.array_equal(np.sort(p), np.arange(1000))
    assert np.array_equal(p, ch.permutation(1000, 1, 2))
    assert not np.array_equal(p, ch.permutation(1000, 1, 3))
    b = ch.chunk_bounds(10, 4)
    assert b.tolist() == [0, 3, 6, 8, 10]
    assert set(np.diff(ch.chunk_bounds(1001, 7)).tolist()) <= {143, 144}


# -- layout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [ch.StepLayout(0), ch.StepLayout(1, 3, 8), ch.StepLayout(4096, 987654, 16)])
def test_layout_round_trip(layout):
    data = layout.to_bytes()
    assert ch.StepLayout.from_bytes(data) == layout
    assert len(data) <= 7
    assert ch.StepLayout.read(b"xy" + data + b"z", 2) == (layout, 2 + len(data))


def test_layout_rejects_garbage():
    with pytest.raises(DecodeError):
        ch.StepLayout.from_bytes(b"")
    with pytest.raises(DecodeError):
        ch.StepLayout.from_bytes(b"\x05\x30\x01")  # log2 N = 48 > limit
    with pytest.raises(DecodeError):
        ch.StepLayout.from_bytes(b"\x00\x00")  # trailing byte
    with pytest.raises(DecodeError):
        ch.StepLayout.from_bytes(b"\xff" * 12)  # absurd varint
    with pytest.raises(ValueError):
        ch.StepLayout(0, 5, 0)


def test_layout_keeps_chunks_near_budget():
    m = _m_with_kl(20_000, 0.1, kind="const")
    layout = ch.choose_layout(m, 0, 1, c_max=10, pad=2.0)
    assert layout.n_chunks == math.ceil(layout.kl_bits / 8.0)
    assert layout.log2_candidates == 10
    assert np.max(ch.chunk_kl_bits(m, layout, 0, 1)) <= 8.0 + 1e-9
    # heterogeneous m: max_growth adds chunks until none carries more than c_max - pad/2 bits
    g = _m_with_kl(20_000, 0.1)
    base = ch.choose_layout(g, 0, 1, c_max=10)
    grown = ch.choose_layout(g, 0, 1, c_max=10, max_growth=2.0)
    assert base.n_chunks < grown.n_chunks <= 2 * base.n_chunks
    assert np.max(ch.chunk_kl_bits(g, grown, 0, 1)) <= 9.0 < np.max(ch.chunk_kl_bits(g, base, 0, 1))


# -- one step ------------------------------------------------------------------------------------


def test_decoder_regenerates_encoder_sample_bit_exactly():
    m = _m_with_kl(3000, 0.2, seed=1).reshape(30, 100)
    e = ch.encode_step(m, seed=11, step=4, c_max=8)
    assert e.layout.n_chunks > 1 and e.x.shape == m.shape and e.x.dtype == np.float64
    layout = ch.StepLayout.from_bytes(e.layout.to_bytes())
    x = ch.decode_step(e.payload, layout, m.shape, 11, 4)
    assert np.array_equal(x, e.x)
    assert ch.sample_crc(x) == ch.sample_crc(e.x)
    assert ch.decode_indices(e.payload, layout).shape == (layout.n_chunks,)
    assert np.array_equal(ch.decode_step(e.payload, layout, m.size, 11, 4), e.x.reshape(-1))


def test_encoding_is_deterministic_and_keyed():
    m = _m_with_kl(1500, 0.3, seed=2)
    a = ch.encode_step(m, seed=5, step=1, c_max=8)
    b = ch.encode_step(m, seed=5, step=1, c_max=8)
    assert a.payload == b.payload and np.array_equal(a.x, b.x) and a.layout == b.layout
    c = ch.encode_step(m, seed=5, step=2, c_max=8)
    assert not np.array_equal(a.x, c.x)


def test_search_threads_do_not_change_the_choice():
    m = _m_with_kl(3000, 0.3, seed=3)
    layout = ch.choose_layout(m, seed=7, step=2, c_max=8)
    assert layout.n_chunks > 3
    one = ch.select_indices(m, layout, 7, 2, workers=1)
    for w in (2, 3, layout.n_chunks + 5):
        assert np.array_equal(ch.select_indices(m, layout, 7, 2, workers=w), one)


@pytest.mark.parametrize("d,num", [(1, 64), (2, 256), (5, 256), (9, 1024), (40, 512)])
def test_batched_search_equals_the_per_chunk_search(d, num):
    """Small chunks searched together pick exactly the per-chunk choices (same float32 scores)."""
    rng = np.random.default_rng(d)
    m = rng.standard_normal((13, d)) * rng.gamma(1.0, 1.0, (13, 1))
    batched = ch._search_small_chunks(m, 20, num, ch._readers(3, 6))
    assert np.array_equal(batched, [ch._search_chunk(m[i], 3, 6, 20 + i, num) for i in range(13)])


def test_batch_size_does_not_change_the_choice(monkeypatch):
    """Mixed chunk sizes, batches split anywhere, a chunk bigger than a search block: same result."""
    m = _m_with_kl(4001, 0.5, seed=4)
    layout = ch.choose_layout(m, seed=3, step=1, c_max=8)
    assert 4001 % layout.n_chunks and layout.n_chunks > 100
    ref = ch.select_indices(m, layout, 3, 1, workers=1)
    for batch, block in ((1, 1 << 15), (3000, 1 << 15), (1 << 17, 64)):
        monkeypatch.setattr(ch, "_BATCH_WORDS", batch)
        monkeypatch.setattr(ch, "_BLOCK_WORDS", block)
        assert np.array_equal(ch.select_indices(m, layout, 3, 1, workers=2), ref)


def test_zero_kl_costs_nothing():
    n = 5000
    for m in (np.zeros(n), _m_with_kl(n, 1e-6)):
        e = ch.encode_step(m, seed=3, step=0, c_max=8)
        assert e.layout.n_chunks == 0 and e.payload == b"" and e.ideal_bits == 0.0
        assert e.layout.to_bytes() == b"\x00"
        x = ch.decode_step(b"", e.layout, n, 3, 0)
        assert np.array_equal(x, e.x)
        assert abs(x.mean()) < 0.05 and abs(x.std() - 1.0) < 0.05  # a prior draw
    with pytest.raises(DecodeError):
        ch.decode_step(b"\x01", ch.StepLayout(0), n, 3, 0)


def test_small_kl_step_costs_little():
    """One chunk with ~0.5 bit of KL: a few bits, often an empty payload."""
    bits = []
    for step in range(20):
        e = ch.encode_step(_m_with_kl(400, 0.5 / 400, seed=step), seed=1, step=step, c_max=8)
        assert e.layout.n_chunks == 1
        bits.append(8 * len(e.payload))
    assert np.mean(bits) <= 6.0 and max(bits) <= 16


@pytest.mark.parametrize("kl_per_dim", [0.05, 0.5])
def test_coded_bits_track_kl(kl_per_dim):
    m = _m_with_kl(6000, kl_per_dim, seed=3, kind="const")
    e = ch.encode_step(m, seed=2, step=7, c_max=10)
    bits = 8 * len(e.payload)
    k = e.layout.n_chunks
    assert abs(e.kl_bits - e.layout.kl_bits) <= 1.0 / 32
    assert bits <= e.kl_bits + 3 * k + 8  # KL + a few bits per chunk
    assert bits >= 0.7 * e.kl_bits  # truncation makes it a little cheaper, not free
    assert abs(bits - e.ideal_bits) <= 10  # the range coder is near its ideal length


def test_sample_moves_to_target():
    """Constant m: the sample mean approaches m (efficiency ~0.85 at 2 bits of padding) while the
    spread around it stays ~1; more padding brings it closer to an exact sample."""
    a = math.sqrt(2 * 0.5 * math.log(2))  # 0.5 bit per dim
    m = np.full(6000, a)
    e = ch.encode_step(m, seed=4, step=1, c_max=10, pad=2.0)
    eff = float(e.x.mean() / a)
    assert 0.75 < eff < 1.05
    assert abs(float(e.x.std()) - 1.0) < 0.1
    prior = ch.encode_step(np.zeros_like(m), seed=4, step=1)
    assert abs(float(prior.x.mean())) < 0.05
    padded = ch.encode_step(m, seed=4, step=1, c_max=10, pad=6.0)
    assert float(padded.x.mean() / a) > max(0.9, eff - 0.02)


def test_tiny_and_degenerate_sizes():
    e = ch.encode_step(np.zeros(0), seed=0, step=0)
    assert e.x.shape == (0,) and e.payload == b"" and e.layout.n_chunks == 0
    assert ch.decode_step(b"", e.layout, 0, 0, 0).shape == (0,)
    # a single dim with 72 bits of KL: one overfull chunk still works (a poorer sample)
    m = np.array([10.0])
    e = ch.encode_step(m, seed=0, step=3, c_max=8)
    assert e.layout.n_chunks == 1 and e.kl_bits > 70
    assert np.array_equal(ch.decode_step(e.payload, e.layout, 1, 0, 3), e.x)
    assert e.x[0] > 2.0  # pulled far towards 10 by the best of 256 candidates
    for n in (2, 3, 5):
        m = _m_with_kl(n, 4.0, seed=n)
        e = ch.encode_step(m, seed=1, step=n, c_max=8)
        assert 1 <= e.layout.n_chunks <= n
        assert np.array_equal(ch.decode_step(e.payload, e.layout, n, 1, n), e.x)


def test_corrupt_payload_is_rejected_or_visibly_wrong():
    n = 3000
    m = _m_with_kl(n, 0.2, seed=5)
    e = ch.encode_step(m, seed=6, step=2, c_max=8)
    assert len(e.payload) > 8
    rng = np.random.default_rng(0)
    for _ in range(20):
        bad = bytearray(e.payload)
        bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
        try:
            x = ch.decode_step(bytes(bad), e.layout, n, 6, 2)
        except DecodeError:
            continue
        assert not np.array_equal(x, e.x)
    with pytest.raises(DecodeError):
        ch.decode_step(e.payload + bytes(rng.integers(0, 256, 64, dtype=np.uint8)), e.layout, n, 6, 2)
    with pytest.raises(DecodeError):
        ch.decode_step(e.payload, ch.StepLayout(n + 1, 100, 8), n, 6, 2)
    x = ch.decode_step(e.payload[: len(e.payload) // 2], e.layout, n, 6, 2)
    assert not np.array_equal(x, e.x)


def test_index_model_and_exponent():
    assert ch.zipf_exponent(0.1, 8) > ch.zipf_exponent(1.0, 8) > ch.zipf_exponent(10.0, 12)
    assert ch.zipf_exponent(100.0, 20) == ch.zipf_exponent(1000.0, 20)  # clamped
    assert ch.zipf_exponent(0.0, 8) * 256 == int(ch.zipf_exponent(0.0, 8) * 256)
    log2p, _ = ch.index_model(ch.StepLayout(10, 16 * 80, 12))
    assert log2p.shape == (4096,) and abs(np.exp2(log2p).sum() - 1.0) < 1e-12
    assert np.all(np.diff(log2p) < 0)


def test_index_coding_round_trip_and_overhead():
    rng = np.random.default_rng(1)
    layout = ch.StepLayout(40, 16 * 40 * 8, 10)
    log2p, _ = ch.index_model(layout)
    over = []
    for _ in range(10):
        idx = np.minimum(rng.pareto(0.9, 40).astype(np.int64), 1023)
        payload, ideal = ch.encode_indices(idx, layout)
        assert np.array_equal(ch.decode_indices(payload, layout), idx)
        assert ideal == pytest.approx(float(-log2p[idx].sum()))
        over.append(8 * len(payload) - ideal)
    assert np.mean(over) < 8  # shortened termination: a few bits per stream, not ~15
    payload, _ = ch.encode_indices(np.zeros(3, dtype=np.int64), ch.StepLayout(3, 3, 8))
    assert len(payload) <= 1
    with pytest.raises(ValueError):
        ch.encode_indices(np.array([1024]), ch.StepLayout(1, 16, 10))


def test_fast_search_picks_the_exact_pfr_argmin():
    """The float32 search ranks candidates like the exact float64 samples it stands for."""
    rng = np.random.default_rng(2)
    for chunk in range(5):
        m_c = rng.standard_normal(9) * 0.9
        j = ch._search_chunk(m_c, 1, 2, chunk, 256)
        raw = CounterStream(1, CANDIDATES, 2, ch._SUB_SENDER, lane=chunk).raw_at(0, 256)
        u = ((raw >> np.uint64(11)).astype(np.int64) + 1) * 2.0**-53
        score = np.log(np.cumsum(-np.log(u))) - ch.candidates(1, 2, chunk, 9, 0, 256) @ m_c
        assert j == int(np.argmin(score))


def test_projection_efficiency_of_layouts():
    """The simulated table: ~0.84 at the coder's usual 8 bits per chunk with 2 bits of padding, close to 1
    with 6 bits, 0 without chunks."""
    assert ch.projection_efficiency(ch.StepLayout(0)) == 0.0
    usual = ch.projection_efficiency(ch.StepLayout(10, 10 * 8 * ch.KL_UNITS_PER_BIT, 10))
    assert 0.8 < usual < 0.88
    padded = ch.projection_efficiency(ch.StepLayout(10, 10 * 2 * ch.KL_UNITS_PER_BIT, 8))
    assert padded > 0.97
    assert padded > usual


def test_estimate_efficiency_recovers_the_shortfall():
    rng = np.random.default_rng(0)
    n = 60_000
    m = rng.normal(size=n) * 1.2
    kl_bits = float(np.sum(m * m) / 2 / np.log(2))
    layout = ch.StepLayout(int(kl_bits // 8), round(kl_bits * ch.KL_UNITS_PER_BIT), 10)
    for eff in (0.75, 0.9):
        X = eff * m + rng.normal(size=n)
        est = ch.estimate_efficiency(X, layout)
        assert est == pytest.approx(eff, abs=0.02)
        assert est * ch.EFFICIENCY_GRID == int(est * ch.EFFICIENCY_GRID)  # on the grid
    # a step of little KL relies on the layout's simulated value; the estimate is clamped to [1/sqrt 2, 1]
    tiny = ch.StepLayout(1, 4 * ch.KL_UNITS_PER_BIT, 10)
    assert ch.estimate_efficiency(rng.normal(size=n), tiny) == pytest.approx(
        ch.projection_efficiency(tiny), abs=0.02)
    assert ch.estimate_efficiency(np.zeros(n), layout) == pytest.approx(np.sqrt(0.5), abs=1e-3)
    assert ch.estimate_efficiency(3 * rng.normal(size=n), layout) == 1.0
    assert ch.estimate_efficiency(rng.normal(size=n), ch.StepLayout(0)) == 0.0


def test_estimate_efficiency_is_blockwise_deterministic():
    """The same value whatever the array's memory layout (the sum runs over fixed blocks)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3, 700, 800))
    layout = ch.StepLayout(1000, 1000 * 8 * ch.KL_UNITS_PER_BIT, 10)
    a = ch.estimate_efficiency(X, layout)
    b = ch.estimate_efficiency(np.asfortranarray(X), layout)
    assert a == b
