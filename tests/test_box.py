"""UQDM's channel-aware reconstruction (codecs/box.py): the box a step puts x in, the posterior mean of a
logistic inside it, and the reconstructions that use them."""

import numpy as np
import pytest

import diffcodec
from conftest import make_tiny, synthetic_image, under_threads
from diffcodec.codecs.box import StepBox, truncated_logistic_mean
from diffcodec.codecs.noise_basis import NoiseBasis
from diffcodec.codecs.uqdm import UNBOUNDED
from diffcodec.schedule import pixel_to_unit


def _quadrature_mean(mu: float, s: float, lo: float, hi: float) -> float:
    """E[X | lo <= X <= hi], X ~ Logistic(mu, s), by the trapezoid rule on a fine grid (in log-density
    relative to the box's maximum, so that far tails do not underflow)."""
    x = np.linspace(lo, hi, 400_001)
    t = (x - mu) / s
    logp = -t - 2.0 * np.logaddexp(0.0, -t)
    w = np.exp(logp - logp.max())
    return float(np.trapezoid(x * w, x) / np.trapezoid(w, x))


@pytest.mark.parametrize("mu,s,lo,hi", [
    (0.0, 1.0, -1.0, 2.0), (0.0, 1.0, 5.0, 6.0), (0.0, 1.0, -50.0, -40.0), (0.0, 1.0, 40.0, 45.0),
    (3.0, 2.0, -1.0, 0.5), (0.0, 1.0, -800.0, -790.0), (0.0, 1.0, 0.3, 0.30001), (0.1, 0.01, -1.0, 1.0),
    (0.0, 1.0, -31.0, -29.0), (0.0, 1.0, -0.5, 0.5), (-2.0, 0.5, -2.1, 40.0),
])
def test_truncated_logistic_mean_against_quadrature(mu, s, lo, hi):
    got = truncated_logistic_mean(np.array([mu]), np.array([s]), np.array([lo]), np.array([hi]))[0]
    assert lo <= got <= hi
    assert got == pytest.approx(_quadrature_mean(mu, s, lo, hi), abs=1e-6 * max(1.0, s, hi - lo))


def test_truncated_logistic_mean_limits():
    """A box far wider than the logistic around its mode gives the mode; a scale far larger than the box
    gives the box's centre; mirroring the problem mirrors the answer exactly."""
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=1000), np.exp(rng.normal(size=1000))
    lo, hi = mu - 200 * s - rng.uniform(size=1000), mu + 200 * s + rng.uniform(size=1000)
    assert np.allclose(truncated_logistic_mean(mu, s, lo, hi), mu, atol=1e-9 * 200 * s.max())
    lo = mu + rng.normal(size=1000)
    hi = lo + 0.1 + np.abs(rng.normal(size=1000))
    wide = truncated_logistic_mean(mu, 1e7 * s, lo, hi)
    assert np.allclose(wide, 0.5 * (lo + hi), atol=1e-6 * (hi - lo).max())
    a = truncated_logistic_mean(mu, s, lo, hi)
    b = truncated_logistic_mean(-mu, s, -hi, -lo)
    assert np.array_equal(a, -b)


@pytest.fixture(scope="module")
def dct_model():
    m = make_tiny("uqdm", noise_basis="opponent-dct4", final_basis="opponent", context="checkerboard",
                  scale_offsets=True)
    m.model_id, m.model_hash = "tiny-box", "0123456789abcdef"
    return m


def _states(model, img, seed=3):
    res = diffcodec.compress(img, model=model, lossless=True, seed=seed)
    cont = diffcodec.container.unpack(res.data)
    x = pixel_to_unit(img.transpose(2, 0, 1).astype(np.float64))[None]
    return res, list(model.iter_latents(x.shape, seed, cont.sections, **diffcodec.api._coding(cont.header))), x


def test_every_step_box_holds_the_image(dct_model):
    img = synthetic_image(24, 32, seed=2)
    _, states, x = _states(dct_model, img)
    T = dct_model.num_steps
    assert [s.box is None for s in states] == [False] * (T - 1) + [True]  # z_0 needs no network
    prev = None
    for st in states[:-1]:
        b = st.box
        mx = b.basis.forward(x)
        assert np.all(np.abs(mx - b.center) <= b.half_width * (1 + 1e-9) + 1e-12)
        assert np.all(b.half_width >= 0) and b.gamma_next < st.gamma
        if prev is not None:  # each step's box lies within the boxes before it (where those bound x at all:
            pw, bw = (np.broadcast_to(v.half_width, v.center.shape) for v in (prev, b))
            bounded = pw < UNBOUNDED / 2  # a coordinate no step has coded yet is unbounded)
            assert np.all((b.center - bw >= prev.center - pw - 1e-12)[bounded])
            assert np.all((b.center + bw <= prev.center + pw + 1e-12)[bounded])
        prev = b


def test_a_box_within_an_earlier_one():
    """StepBox.within: the intersection of two boxes in the same basis; another basis (or none) leaves the
    box as it is."""
    basis, other = NoiseBasis("opponent-dct4"), NoiseBasis("opponent")
    late = StepBox(basis, np.array([0.0, 1.0, -2.0]), 0.5, -3.0, True)
    early = StepBox(basis, np.array([0.2, 0.0, -2.0]), np.array([2.0, 0.75, 1.0]), -1.0, True)
    box = late.within(early)
    assert np.allclose(box.center - box.half_width, [-0.5, 0.5, -2.5])
    assert np.allclose(box.center + box.half_width, [0.5, 0.75, -1.5])
    assert box.gamma_next == -3.0 and box.basis is basis
    assert late.within(None) is late
    assert late.within(StepBox(other, early.center, early.half_width, -1.0, True)) is late


def test_box_reconstructions(dct_model):
    """denoise with the box is the posterior mean inside it (closer to x than x_hat on this image); flow and
    ancestral results are projected onto it, which never moves them away from x."""
    img = synthetic_image(24, 32, seed=2)
    res, states, x = _states(dct_model, img)
    st = states[1]
    for method in ("denoise", "flow", "ancestral"):
        rng = lambda: diffcodec.rng.SeededStream(3, diffcodec.rng.ANCESTRAL)  # noqa: E731
        plain = dct_model.reconstruct_unit(st.z, st.gamma, method, rng=rng())
        boxed = dct_model.reconstruct_unit(st.z, st.gamma, method, rng=rng(), box=st.box)
        assert not np.array_equal(plain, boxed)
        err_plain, err_boxed = np.sum((np.clip(plain, -1, 1) - x) ** 2), np.sum((boxed - x) ** 2)
        assert err_boxed <= err_plain * (1 + 1e-12), method
    # the API: channel_aware=False is x_hat of the received latent; the default uses the box
    aware = diffcodec.decompress(res.data, model=dct_model, steps=2)
    unaware = diffcodec.decompress(res.data, model=dct_model, steps=2, channel_aware=False)
    assert np.array_equal(unaware, dct_model.reconstruct(st.z, st.gamma)[0].transpose(1, 2, 0))
    z, gamma = st.latent(True, "denoise")  # a kept step's prior mean (test_keep)
    assert np.array_equal(aware, dct_model.reconstruct(z, gamma, box=st.box)[0].transpose(1, 2, 0))
    assert not np.array_equal(aware, unaware)


def test_box_reconstruction_is_thread_count_independent(dct_model):
    img = synthetic_image(24, 32, seed=6)
    res = diffcodec.compress(img, model=dct_model, steps=2, seed=1)
    outs = under_threads(lambda: [diffcodec.decompress(res.data, model=dct_model, method=m)
                                  for m in ("denoise", "flow")])
    assert all(np.array_equal(a, b) for a, b in zip(*outs))


# ------------------------------------------------------------------ box priors (the uqdm format since 2026-12-07)
@pytest.mark.parametrize("kind", ["dct", "rgb"])
def test_box_prior_codes_the_same_steps_in_fewer_bits(kind, dct_model):
    """The same symbols, latents and reconstructions as the whole prior, fewer ideal bits at every step after
    the first (whose prior has no earlier box), a lossless finish either way; the header says which."""
    model = dct_model if kind == "dct" else make_tiny("uqdm")
    if kind == "rgb":
        model.model_id, model.model_hash = "tiny-box-rgb", "0123456789abcdef"
    img = synthetic_image(24, 32, seed=4)
    new = diffcodec.compress(img, model=model, lossless=True, seed=2, keep=1)  # the same coordinates as old
    old = diffcodec.compress(img, model=model, lossless=True, seed=2, box_prior=False)
    assert diffcodec.info(new.data)["box_prior"] is True and diffcodec.info(old.data)["box_prior"] is False
    for data in (new.data, old.data):
        assert np.array_equal(diffcodec.decompress(data, model=model), img)
    a = [s["ideal_bits"] for s in new.sections]
    b = [s["ideal_bits"] for s in old.sections]
    assert a[0] == b[0]  # step 1: no box before it
    T = model.num_steps
    last_truncated = T if kind == "rgb" else T - 1  # a final basis is not the earlier boxes' basis
    assert all(x < y for x, y in zip(a[1:last_truncated], b[1:last_truncated]))
    assert a[last_truncated:] == b[last_truncated:]
    for k in range(1, T):
        assert np.array_equal(diffcodec.decompress(new.data, model=model, steps=k),
                              diffcodec.decompress(old.data, model=model, steps=k))


def test_box_prior_bounds_hold_the_symbols_and_tables_vanish_outside(dct_model):
    """_k_bounds keeps every true symbol; the table is zero outside the bounds and the whole prior inside."""
    from diffcodec.codecs.uqdm import UQDM

    m = dct_model
    img = synthetic_image(16, 16, seed=5)
    x = pixel_to_unit(img.transpose(2, 0, 1).astype(np.float64))[None]
    gam = m.gamma_grid(m.num_steps)
    z, box, T = m.initial_latent(x.shape, 1), None, m.num_steps
    for i in range(T, 1, -1):
        st, k, u, z_s, bounds = m._encode_symbols(z, x, i, gam, 1, box)
        assert (bounds is None) == (i == T)
        if bounds is not None:
            assert np.all((k >= bounds[0]) & (k <= bounds[1]))
            assert np.all(bounds[1] - bounds[0] > 1.0)  # an earlier box is wider than a step's
            R = int(np.abs(k).max()) + 3
            cut = UQDM._table(st.scale, st.delta, u, R, bounds=bounds)(slice(None))
            whole = UQDM._table(st.scale, st.delta, u, R)(slice(None))
            ks = np.arange(-R, R + 1)[None]
            inside = (ks >= bounds[0][:, None]) & (ks <= bounds[1][:, None])
            assert np.array_equal(cut[inside], whole[inside]) and np.all(cut[~inside] == 0.0)
            assert (~inside).any()
        box = m.step_box(z, z_s, i, gam, box)
        z = z_s


def test_uqdm_header_flags():
    m = make_tiny("uqdm")
    assert m.header_params() == bytes([m.num_steps, 1]) and m.header_params(box_prior=False) == bytes([m.num_steps])
    assert m.check_header_params(bytes([m.num_steps]))["box_prior"] is False
    with pytest.raises(diffcodec.errors.FormatError, match="newer"):
        m.check_header_params(bytes([m.num_steps, 4]))
    with pytest.raises(diffcodec.errors.FormatError, match="malformed"):  # kept shares announced, not given
        m.check_header_params(bytes([m.num_steps, 3]))
    with pytest.raises(diffcodec.errors.FormatError):
        m.check_header_params(bytes([m.num_steps + 1, 1]))
    with pytest.raises(diffcodec.errors.DiffcodecError, match="uqdm"):
        diffcodec.compress(synthetic_image(16, 16), model=make_tiny("diffc"), steps=1, box_prior=False)


def test_box_prior_keeps_the_whole_prior_where_every_possible_symbol_underflows():
    """A prior hundreds of scales away from the box: the restricted row would be all zeros, which no coder can
    use; the whole prior is kept for that element (both sides see the same float64 values)."""
    from diffcodec.codecs.uqdm import UQDM

    scale, u = np.array([1.0, 1e-3]), np.zeros(2)
    bounds = (np.array([-1.0, 2.5]), np.array([1.0, 3.5]))  # element 2: only k = 3, 3000 scales from the mean
    cut = UQDM._table(scale, 1.0, u, 3, bounds=bounds)(slice(None))
    whole = UQDM._table(scale, 1.0, u, 3)(slice(None))
    assert np.all(cut[0, [0, 1, 5, 6]] == 0.0) and np.array_equal(cut[0, 2:5], whole[0, 2:5])
    assert np.array_equal(cut[1], whole[1]) and whole[1, 6] == 0.0
