"""UQDM end to end on tiny models and images: sections, lossless, truncation, determinism."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import diffcodec
from conftest import make_tiny, make_tiny_uqdm, synthetic_image
from diffcodec.codecs.uqdm import UQDM
from diffcodec.errors import DecodeError, ModelError
from diffcodec.metrics import psnr
from diffcodec.models import save_model


def test_loss_is_finite_and_trains_gamma_min():
    m = make_tiny_uqdm()
    x = torch.from_numpy(synthetic_image(16, 16)).permute(2, 0, 1)[None].float() * (2 / 256) + (1 / 256 - 1)
    out = m(x.repeat(2, 1, 1, 1))
    out["bpd"].mean().backward()
    assert torch.isfinite(out["bpd"]).all()
    assert m.schedule.gamma_min.grad is not None and torch.isfinite(m.schedule.gamma_min.grad)
    exact = m(x, all_steps=True)
    assert exact["bpd"].shape == (1,) and float(exact["bpd"].detach()) > 0


def test_one_step_estimator_is_unbiased():
    """Mean of the one-random-step estimate ~= the all-steps code length (same forward chain law)."""
    m = make_tiny_uqdm()
    x = torch.from_numpy(synthetic_image(8, 8)).permute(2, 0, 1)[None].float() * (2 / 256) + (1 / 256 - 1)
    torch.manual_seed(0)
    with torch.no_grad():
        one = torch.cat([m(x.repeat(256, 1, 1, 1))["bpd"] for _ in range(4)])
        full = torch.cat([m(x.repeat(256, 1, 1, 1), all_steps=True)["bpd"] for _ in range(1)])
    se = float(one.std() / len(one) ** 0.5 + full.std() / len(full) ** 0.5)
    assert abs(float(one.mean() - full.mean())) < 4 * se + 1e-3


def test_step_weighted_loss(tiny_model):
    """step_weights: uniform weights give the code length itself; one-hot weights split it into the
    steps' code lengths (the last with the lossless term), in coding order: the first coding step's
    share is the first section's bits of a real file, not another step's."""
    m, T = tiny_model, tiny_model.num_steps
    img = synthetic_image(8, 8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].to(next(m.parameters()).dtype) * (2 / 256) + (1 / 256 - 1)
    xb = x.repeat(64, 1, 1, 1)
    with torch.no_grad():
        torch.manual_seed(0)
        plain = m(xb)["bpd"]
        torch.manual_seed(0)
        assert torch.allclose(m(xb, step_weights=torch.full((T,), 3.0))["loss"], plain)
        torch.manual_seed(1)
        exact = m(xb, all_steps=True)["bpd"].mean()
        shares = []
        for k in range(T):
            torch.manual_seed(1)
            shares.append(float(m(xb, all_steps=True, step_weights=torch.eye(T)[k])["loss"].mean()) / T)
    assert abs(sum(shares) - float(exact)) < 1e-4 * float(exact)
    sections = diffcodec.compress(img, model=m, lossless=True, keep=1).sections  # the loss codes every coordinate
    bits = [s["ideal_bits"] / x.numel() for s in sections]  # the steps, then the lossless section
    assert len(bits) == T + 1
    for k in range(T - 1):
        assert abs(shares[k] - bits[k]) < 0.2 * bits[k] + 0.05, (k, shares, bits)
    assert abs(shares[T - 1] - bits[T - 1] - bits[T]) < 0.2 * (bits[T - 1] + bits[T]), (shares, bits)
    for bad in (torch.ones(T + 1), -torch.ones(T), torch.zeros(T)):
        with pytest.raises(ValueError):
            m(x, step_weights=bad)


def test_loss_on_another_step_count_grid():
    """forward(num_steps=T') runs the chain on T' steps: all_steps then costs T' network calls (one per
    step), and the estimate is that grid's code length, not the model's own."""
    m = make_tiny_uqdm()
    x = torch.from_numpy(synthetic_image(8, 8)).permute(2, 0, 1)[None].float() * (2 / 256) + (1 / 256 - 1)
    calls = []
    hook = m.net.register_forward_hook(lambda mod, inp, out: calls.append(inp[1].detach().clone()))
    with torch.no_grad():
        torch.manual_seed(0)
        own = m(x, all_steps=True)["bpd"]
        n_own = len(calls)
        torch.manual_seed(0)
        other = m(x, all_steps=True, num_steps=3 * m.num_steps)["bpd"]
    hook.remove()
    assert n_own == m.num_steps and len(calls) - n_own == 3 * m.num_steps
    g = m.schedule(torch.arange(3 * m.num_steps + 1) / (3 * m.num_steps))
    assert torch.allclose(torch.cat(calls[n_own:]).flatten(), g[1:].detach())  # steps 1..3T, once each
    assert torch.isfinite(other).all() and float((other - own).abs()) > 1e-6


def test_lossless_roundtrip_and_ideal_bits(tiny_model, image):
    """The payload is the model's code length (the ideal bits) up to the range coder's overhead.  With every
    coordinate coded: an untrained model's prior draws for the coordinates a step does not code (the
    default) put the image so far in the tails that the coder's probability floor costs less than the model."""
    res = diffcodec.compress(image, model=tiny_model, lossless=True, keep=1)
    assert np.array_equal(diffcodec.decompress(res.data, model=tiny_model), image)
    assert res.steps == tiny_model.num_steps and res.sections[-1]["kind"] == "lossless"
    payload_bits = 8 * sum(s["payload_bytes"] for s in res.sections)
    assert res.ideal_bits_total <= payload_bits <= res.ideal_bits_total * 1.01 + 32 * len(res.sections)


def test_truncated_file_equals_fewer_steps(tiny_model, image):
    full = diffcodec.compress(image, model=tiny_model, lossless=True)
    meta = diffcodec.info(full.data)
    for sec in meta["sections"][:-1]:
        k = sec["step"]
        cut = full.data[: sec["offset"] + sec["bytes"]]
        direct = diffcodec.compress(image, model=tiny_model, steps=k)
        assert direct.data[-sec["bytes"] :] == cut[-sec["bytes"] :]  # same section bytes
        for method in ("denoise", "flow", "ancestral"):
            a = diffcodec.decompress(cut, model=tiny_model, method=method)
            b = diffcodec.decompress(direct.data, model=tiny_model, method=method)
            c = diffcodec.decompress(full.data, model=tiny_model, steps=k, method=method)
            assert np.array_equal(a, b) and np.array_equal(a, c)
    # a cut inside a section decodes the complete sections before it
    mid = full.data[: meta["sections"][1]["offset"] + 3]
    assert np.array_equal(diffcodec.decompress(mid, model=tiny_model),
                          diffcodec.decompress(full.data, model=tiny_model, steps=1))


def test_psnr_non_decreasing_with_steps(tiny_model):
    img = synthetic_image(24, 32, seed=3)
    res = diffcodec.compress(img, model=tiny_model, lossless=True)
    vals = [psnr(img, diffcodec.decompress(res.data, model=tiny_model, steps=k)) for k in range(1, 5)]
    assert all(b >= a - 0.05 for a, b in zip(vals, vals[1:])), vals
    assert vals[-1] > vals[0] + 3


def test_steps_bpp_and_defaults(tiny_model, image):
    sizes = [len(diffcodec.compress(image, model=tiny_model, steps=k).data) for k in range(1, 5)]
    assert sizes == sorted(sizes)
    bpp3 = 8 * sizes[2] / (image.shape[0] * image.shape[1])
    res = diffcodec.compress(image, model=tiny_model, bpp=bpp3 + 1e-9, parts="none")  # whole steps only
    assert res.steps == 3 and res.bpp <= bpp3 + 1e-9
    res = diffcodec.compress(image, model=tiny_model, bpp=bpp3 + 1e-9)  # default: may end inside step 3
    assert res.steps >= 2 and res.bpp <= bpp3 + 1e-9
    assert diffcodec.compress(image, model=tiny_model).steps == 2  # the card's default_steps
    with pytest.raises(diffcodec.DiffcodecError, match="cannot reach"):
        diffcodec.compress(image, model=tiny_model, bpp=0.01)
    with pytest.raises(diffcodec.DiffcodecError):
        diffcodec.compress(image, model=tiny_model, steps=5)


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 3, 3), (17, 9, 1), (9, 31)])
def test_odd_sizes_and_grayscale(tiny_model, shape):
    img = synthetic_image(shape[0], shape[1], shape[2] if len(shape) == 3 else 1)
    if len(shape) == 2:
        img = img[:, :, 0]
    res = diffcodec.compress(img, model=tiny_model, lossless=True)
    out = diffcodec.decompress(res.data, model=tiny_model)
    expect = img if img.ndim == 3 else img[:, :, None]
    assert np.array_equal(out, expect)
    lossy = diffcodec.decompress(res.data, model=tiny_model, steps=2)
    assert lossy.shape == expect.shape
    assert diffcodec.info(res.data)["channels"] == expect.shape[2]


def test_wrong_model_is_refused(tiny_model, other_model_path, image):
    res = diffcodec.compress(image, model=tiny_model, steps=1)
    with pytest.raises(ModelError, match="tiny-uqdm"):
        diffcodec.decompress(res.data, model=str(other_model_path))


def test_symbol_checksum_catches_desync(tiny_model, other_model_path, image):
    """Force decoding with different weights but the same hash: the symbol CRC must catch it."""
    res = diffcodec.compress(image, model=tiny_model, steps=2)
    other = diffcodec.load_model(str(other_model_path))
    other.model_hash, other.model_id = tiny_model.model_hash, tiny_model.model_id
    with pytest.raises(DecodeError):
        diffcodec.decompress(res.data, model=other)


def _tables(threads: int, model: UQDM, z: np.ndarray):
    torch.set_num_threads(threads)
    st, eps, aux = model._step(z, -4.0, 1.0, 2)
    u = np.linspace(-0.5, 0.5, z.size, endpoint=False)
    return eps, aux, model._table(st.scale, st.delta, u, 8)(slice(0, z.size))


@pytest.mark.parametrize("half_width", [1, 3])
def test_step_table_equals_the_row_per_element_formula(half_width):
    """The step table (built (K, n), in place) holds exactly the values of the plain formula
    P(k) = sigmoid((y_k + D/2 - mu_P)/s) - sigmoid((y_k - D/2 - mu_P)/s), y_k = mu_P + (k - u) D."""
    from diffcodec.entropy import log_logistic_bin

    rng = np.random.default_rng(half_width)
    n, delta = 4000, 0.37
    scale, u = np.exp(rng.normal(-2, 1, n)), rng.uniform(-0.5, 0.5, n)
    ks = np.arange(-half_width, half_width + 1, dtype=np.float64)
    y = (ks[None, :] - u[:, None]) * delta
    ref = np.exp(log_logistic_bin((y - 0.5 * delta) / scale[:, None], (y + 0.5 * delta) / scale[:, None]))
    got = UQDM._table(scale, delta, u, half_width)(slice(0, n))
    assert got.shape == ref.shape and np.array_equal(got.view(np.uint64), ref.view(np.uint64))


def test_pipelined_encoding_writes_the_same_sections(tiny_model, monkeypatch):
    """Entropy coding overlapped with the next step's network (the default) or in step: same sections,
    and progress is reported once per section."""
    from diffcodec import diffusion

    img = synthetic_image(24, 20, seed=2)
    pix = np.ascontiguousarray(img.transpose(2, 0, 1))
    calls: list[int] = []
    a = tiny_model.encode(pix, 3, 4, lossless=True, progress=calls.append)
    assert len(calls) == 4 and len(a) == 5
    monkeypatch.setattr(diffusion, "PIPELINE_MAX_ELEMENTS", 0)
    b = tiny_model.encode(pix, 3, 4, lossless=True)
    assert [(s.kind, s.index, s.params, s.payload, s.symbols_crc) for s in a] == \
        [(s.kind, s.index, s.params, s.payload, s.symbols_crc) for s in b]


def test_pipelined_encoding_error_is_raised(tiny_model, monkeypatch):
    """A failure in the coder thread reaches the caller."""
    from diffcodec.codecs import uqdm

    class Broken(uqdm.CategoricalEncoder):
        def encode(self, *args, **kw):
            raise RuntimeError("coder failed")

    monkeypatch.setattr(uqdm, "CategoricalEncoder", Broken)
    pix = np.ascontiguousarray(synthetic_image(16, 16, seed=1).transpose(2, 0, 1))
    with pytest.raises(RuntimeError, match="coder failed"):
        tiny_model.encode(pix, 0, 2, lossless=False)


def test_tables_identical_under_1_and_2_threads(tiny_model):
    before = torch.get_num_threads()
    z = np.random.default_rng(0).normal(size=(1, 3, 64, 48))
    try:
        a = _tables(1, tiny_model, z)
        b = _tables(2, tiny_model, z)
    finally:
        torch.set_num_threads(before)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


_ENC = """
import sys, numpy as np, torch, diffcodec
torch.set_num_threads({threads})
img = np.load(sys.argv[2])
res = diffcodec.compress(img, model=sys.argv[1], lossless=True)
open(sys.argv[3], 'wb').write(res.data)
"""
_DEC = """
import sys, numpy as np, torch, diffcodec
torch.set_num_threads({threads})
data = open(sys.argv[2], 'rb').read()
np.save(sys.argv[3], diffcodec.decompress(data, model=sys.argv[1], steps=3, method='flow'))
np.save(sys.argv[4], diffcodec.decompress(data, model=sys.argv[1]))
"""


@pytest.mark.parametrize("basis", ["rgb", "opponent-dct4", "opponent-dct4+opponent"])
def test_cross_process_thread_count_determinism(tiny_model_path, tmp_path, basis):
    """Encode with 1 thread, decode in another process with 2 (every noise basis: its transforms too;
    "+opponent": the last step in the opponent basis and the lossless section's box enumeration)."""
    path = tiny_model_path
    if basis != "rgb":
        path = tmp_path / f"tiny-{basis}.safetensors"
        noise, _, final = basis.partition("+")
        save_model(make_tiny("uqdm", noise_basis=noise, final_basis=final or None), path)
    img = synthetic_image(40, 36, seed=5)
    np.save(tmp_path / "img.npy", img)
    subprocess.run([sys.executable, "-c", _ENC.format(threads=1), str(path), str(tmp_path / "img.npy"),
                    str(tmp_path / "a.dfc")], check=True)
    subprocess.run([sys.executable, "-c", _DEC.format(threads=2), str(path), str(tmp_path / "a.dfc"),
                    str(tmp_path / "lossy.npy"), str(tmp_path / "full.npy")], check=True)
    assert np.array_equal(np.load(tmp_path / "full.npy"), img)
    here = diffcodec.decompress((tmp_path / "a.dfc").read_bytes(), model=str(path), steps=3, method="flow")
    assert np.array_equal(np.load(tmp_path / "lossy.npy"), here)


def test_tiled_evaluation_matches_structure(tiny_model, monkeypatch):
    """Tiles bound memory; the result is deterministic and close to the untiled evaluation."""
    from diffcodec import diffusion

    z = np.random.default_rng(0).normal(size=(1, 3, 40, 56))
    full_eps, _ = tiny_model.eval_f64(z, 0.0)
    monkeypatch.setattr(diffusion, "TILE", 16)
    monkeypatch.setattr(diffusion, "HALO", 8)
    a, _ = tiny_model.eval_f64(z, 0.0)
    b, _ = tiny_model.eval_f64(z, 0.0)
    assert np.array_equal(a, b)
    assert np.abs(a - full_eps).max() < 0.05  # the tiny model's receptive field is mostly inside the halo
    img = synthetic_image(40, 56)
    res = diffcodec.compress(img, model=tiny_model, lossless=True)
    assert np.array_equal(diffcodec.decompress(res.data, model=tiny_model), img)


def test_huge_image_refused_before_work(tiny_model):
    big = np.zeros((6000, 5000, 3), np.uint8)  # 30 MP: above api.MAX_CODE_PIXELS (25 MP)
    with pytest.raises(diffcodec.ImageError, match="too large"):
        diffcodec.compress(big, model=tiny_model)


def test_decode_steps_equals_cut_files(tiny_model):
    img = synthetic_image(20, 24, seed=7)
    res = diffcodec.compress(img, model=tiny_model, lossless=True)
    seen = []
    for k, recs in diffcodec.decode_steps(res.data, model=tiny_model, methods=("denoise", "ancestral"), nfe=2):
        seen.append(k)
        for method, y in recs.items():
            assert np.array_equal(y, diffcodec.decompress(res.data, model=tiny_model, steps=k, method=method, nfe=2))
    assert seen == [1, 2, 3, 4]
    assert [k for k, _ in diffcodec.decode_steps(res.data, model=tiny_model, at={2})] == [2]


def test_decode_steps_reuses_the_evaluation_it_shows(tiny_model, monkeypatch):
    """x_hat(z_k) and step k+1's prior share one network evaluation; outputs are unchanged.  A kept step after
    the first is reconstructed from its prior mean, not from the chain latent: one evaluation more."""
    img = synthetic_image(20, 24, seed=8)
    real = tiny_model.evaluate_network
    for keep, evaluations in ((1, 4), (None, 6)):  # priors at z_4..z_1; x_hat(z_3..z_1) reused them, or not
        data = diffcodec.compress(img, model=tiny_model, steps=4, keep=keep).data  # for kept steps 2 and 3
        calls: list[float] = []
        monkeypatch.setattr(tiny_model, "evaluate_network", lambda z, g, calls=calls: calls.append(g) or real(z, g))
        got = {k: recs["denoise"] for k, recs in diffcodec.decode_steps(data, model=tiny_model)}
        assert len(calls) == evaluations  # z_0 needs no network
        assert tiny_model._eval_memo is None  # the memo lives only inside decode_steps
        monkeypatch.undo()
        for k, y in got.items():
            assert np.array_equal(y, diffcodec.decompress(data, model=tiny_model, steps=k))


def test_fewer_steps_encode_the_same_prefix(tiny_model):
    """A k-step file is the T-step file cut after step k but for the header's section count (what the
    evaluation harness relies on when it encodes only the steps it measures)."""
    img = synthetic_image(20, 24, seed=9)
    full = diffcodec.compress(img, model=tiny_model, steps=4).data
    for k in (1, 3):
        part = diffcodec.compress(img, model=tiny_model, steps=k).data
        end = [s["offset"] + s["bytes"] for s in diffcodec.info(full)["sections"]][k - 1]
        assert len(part) == end
        secs = diffcodec.info(part)["sections"]
        start = secs[0]["offset"]
        assert part[start:] == full[start:end] and secs == diffcodec.info(full)["sections"][:k]


def test_grayscale_lossless_codes_one_channel(tiny_model):
    gray = synthetic_image(16, 16, c=1)
    rgb = np.repeat(gray, 3, axis=2)
    a = diffcodec.compress(gray, model=tiny_model, lossless=True)
    b = diffcodec.compress(rgb, model=tiny_model, lossless=True)
    assert a.sections[-1]["payload_bytes"] < b.sections[-1]["payload_bytes"]
    assert np.array_equal(diffcodec.decompress(a.data, model=tiny_model), gray)
