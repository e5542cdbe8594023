"""DiffC end to end on tiny models: exact regeneration of z, progressive files, errors."""

import numpy as np
import pytest
import torch

import diffcodec
from conftest import make_tiny, synthetic_image
from diffcodec import channel
from diffcodec.codecs.diffc import DiffC
from diffcodec.metrics import psnr
from diffcodec.models import load_model, save_model


def make_tiny_diffc(seed: int = 0) -> DiffC:
    return make_tiny("diffc", seed, num_steps=4, c_max=8)


@pytest.fixture(scope="module")
def diffc_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny-diffc.safetensors"
    save_model(make_tiny_diffc(), path, card={"default_steps": 2})
    return load_model(str(path))


def test_vdm_loss_trains():
    m = make_tiny_diffc()
    x = torch.from_numpy(synthetic_image(16, 16)).permute(2, 0, 1)[None].float() * (2 / 256) + (1 / 256 - 1)
    out = m(x.repeat(4, 1, 1, 1))
    out["bpd"].mean().backward()
    assert torch.isfinite(out["bpd"]).all() and m.schedule.gamma_min.grad is not None


def test_decoder_regenerates_encoder_latents(diffc_model):
    img = synthetic_image(16, 20)
    pixels = np.pad(img, ((0, 0), (0, 0), (0, 0))).transpose(2, 0, 1)
    enc_z = []
    orig = channel.encode_step

    def spy(*a, **k):
        r = orig(*a, **k)
        enc_z.append(r[0].copy())
        return r

    channel.encode_step = spy
    try:
        secs = diffc_model.encode(np.ascontiguousarray(pixels), seed=3, num_steps=4, lossless=False)
    finally:
        channel.encode_step = orig
    dec = []
    orig_d = channel.decode_step

    def spy_d(*a, **k):
        r = orig_d(*a, **k)
        dec.append(r.copy())
        return r

    channel.decode_step = spy_d
    try:
        diffc_model.decode_latent((1, 3, 16, 20), 3, secs)
    finally:
        channel.decode_step = orig_d
    assert len(enc_z) == len(dec) == 4
    for a, b in zip(enc_z, dec):
        assert np.array_equal(a.reshape(-1), b.reshape(-1))


def test_progressive_cut_files_and_json(diffc_model):
    img = synthetic_image(16, 24, seed=2)
    full = diffcodec.compress(img, model=diffc_model, steps=4)
    kl = sum(s["ideal_bits"] for s in full.sections)
    assert full.ideal_bits_total == pytest.approx(kl)
    assert full.codec == "diffc"
    meta = diffcodec.info(full.data)
    assert meta["codec"] == "diffc" and meta["total_steps"] == 4
    for sec in meta["sections"]:
        cut = full.data[: sec["offset"] + sec["bytes"]]
        for method in ("denoise", "flow"):
            a = diffcodec.decompress(cut, model=diffc_model, method=method)
            b = diffcodec.decompress(full.data, model=diffc_model, steps=sec["step"], method=method)
            assert np.array_equal(a, b)
    y1 = diffcodec.decompress(full.data, model=diffc_model, steps=1)
    y4 = diffcodec.decompress(full.data, model=diffc_model)
    assert psnr(img, y4) > psnr(img, y1)


def test_lossless_and_flow_nfe(diffc_model):
    img = synthetic_image(12, 12, seed=4)
    res = diffcodec.compress(img, model=diffc_model, lossless=True)
    assert np.array_equal(diffcodec.decompress(res.data, model=diffc_model), img)
    a = diffcodec.decompress(res.data, model=diffc_model, steps=2, method="flow", nfe=1)
    b = diffcodec.decompress(res.data, model=diffc_model, steps=2, method="flow", nfe=4)
    assert a.shape == b.shape == img.shape


def test_corrupt_diffc_file(diffc_model):
    img = synthetic_image(16, 16)
    data = bytearray(diffcodec.compress(img, model=diffc_model, steps=3).data)
    data[-3] ^= 0x40
    with pytest.raises(diffcodec.FormatError, match="checksum"):
        diffcodec.decompress(bytes(data), model=diffc_model)


def test_codec_mismatch_refused(diffc_model, tiny_model):
    img = synthetic_image(8, 8)
    with pytest.raises(diffcodec.ModelError):
        diffcodec.compress(img, model=diffc_model, codec="uqdm")
    res = diffcodec.compress(img, model=diffc_model, steps=1)
    with pytest.raises(diffcodec.ModelError):
        diffcodec.decompress(res.data, model=tiny_model)


def test_c_max_is_an_encoder_choice(diffc_model):
    img = synthetic_image(16, 16, seed=5)
    outs = []
    for c_max in (6, 10):
        res = diffcodec.compress(img, model=diffc_model, steps=3, c_max=c_max)
        outs.append(res.data)
        assert diffcodec.decompress(res.data, model=diffc_model).shape == img.shape
    assert outs[0] != outs[1]
    with pytest.raises(ValueError):
        diffcodec.compress(img, model=diffc_model, steps=1, c_max=40)


def test_pad_is_an_encoder_choice(diffc_model):
    """The chunk slack changes the file but not the decoder (which checks every step's sample
    against the encoder's CRC, so a mismatch would raise)."""
    img = synthetic_image(16, 16, seed=6)
    sizes = {}
    for pad in (0.0, 2.0, 5.0):
        res = diffcodec.compress(img, model=diffc_model, steps=3, c_max=8, pad=pad)
        assert diffcodec.decompress(res.data, model=diffc_model).shape == img.shape
        sizes[pad] = res.data
    assert len({*sizes.values()}) == 3
    assert diffcodec.compress(img, model=diffc_model, steps=3, c_max=8).data == sizes[2.0]  # the default
    with pytest.raises(ValueError):
        diffcodec.compress(img, model=diffc_model, steps=1, c_max=8, pad=8.0)


def test_cli_pad_option(tmp_path, diffc_model):
    from PIL import Image

    from diffcodec.cli import main

    src = tmp_path / "in.png"
    Image.fromarray(synthetic_image(16, 16, seed=6)).save(src)
    model = tmp_path / "m.safetensors"
    save_model(diffc_model, model)
    outs = []
    for pad in ("0", "3"):
        out = tmp_path / f"p{pad}.dfc"
        assert main(["compress", str(src), "-o", str(out), "--model", str(model), "--steps", "3", "--pad", pad]) == 0
        assert main(["decompress", str(out), "-o", str(tmp_path / f"p{pad}.png"), "--model", str(model)]) == 0
        outs.append(out.read_bytes())
    assert outs[0] != outs[1]
    raw = tmp_path / "raw.png"
    assert main(["decompress", str(tmp_path / "p0.dfc"), "-o", str(raw), "--model", str(model),
                 "--no-channel-aware"]) == 0
    expect = diffcodec.decompress(outs[0], model=str(model), channel_aware=False)
    assert np.array_equal(np.array(Image.open(raw).convert("RGB")), expect)
    assert not np.array_equal(np.array(Image.open(tmp_path / "p0.png").convert("RGB")), expect)


def test_undo_shortfall_is_identity_for_an_exact_sample():
    from diffcodec.codecs.diffc import undo_shortfall
    rng = np.random.default_rng(0)
    mu_p, X = rng.normal(size=(1, 3, 4, 4)), rng.normal(size=(1, 3, 4, 4))
    beta, gamma_s = 0.3, -2.0
    z_view, g = undo_shortfall(mu_p, X, beta, 1.0, gamma_s)
    assert g == pytest.approx(gamma_s, abs=1e-12)
    assert np.allclose(z_view, mu_p + beta * X, atol=1e-12)


def test_undo_shortfall_gives_a_latent_of_the_model():
    """A shortfall sample X = eff m + N(0, I) of q(z_s | z_t, x) becomes alpha' x + sigma' eps with
    alpha'^2 + sigma'^2 = 1 at gamma' = log(sigma'^2 / alpha'^2): unbiased, and noisier than z_s."""
    from diffcodec.codecs.diffc import undo_shortfall
    from diffcodec.schedule import alpha_sigma, posterior_coefficients
    rng = np.random.default_rng(1)
    n = 400_000
    gamma_s, gamma_t, eff = -4.0, -1.0, 0.8
    a, b, beta = (float(v) for v in posterior_coefficients(np.float64(gamma_s), np.float64(gamma_t)))
    alpha_t, sigma_t = alpha_sigma(np.float64(gamma_t))
    x = rng.uniform(-1, 1, n)
    z_t = alpha_t * x + sigma_t * rng.normal(size=n)
    x_hat = 0.5 * x  # any predictor of x from z_t: the shortfall is along x - x_hat
    mu_p = a * z_t + b * x_hat
    m = ((a * z_t + b * x) - mu_p) / beta
    X = eff * m + rng.normal(size=n)
    z_view, g = undo_shortfall(mu_p, X, beta, eff, gamma_s)
    alpha_v, sigma_v = alpha_sigma(np.float64(g))
    assert g > gamma_s
    resid = z_view - alpha_v * x
    assert abs(np.polyfit(x, resid, 1)[0]) < 0.01  # no signal left in the residual: unbiased
    assert np.std(resid) == pytest.approx(sigma_v, rel=0.01)
    # the received z_s itself is biased towards x_hat (its slope on x is short of alpha_s)
    alpha_s, _ = alpha_sigma(np.float64(gamma_s))
    z_s = mu_p + beta * X
    assert np.polyfit(x, z_s, 1)[0] < alpha_s - 0.02


def test_channel_aware_reconstruction(diffc_model):
    """Every method reconstructs from the channel-aware latent by default, from the received one with
    channel_aware=False; the lossless finish and the chain are unaffected."""
    img = synthetic_image(16, 16, seed=5)
    res = diffcodec.compress(img, model=diffc_model, lossless=True)
    for method in ("denoise", "flow", "ancestral"):
        aware = diffcodec.decompress(res.data, model=diffc_model, steps=3, method=method)
        raw = diffcodec.decompress(res.data, model=diffc_model, steps=3, method=method, channel_aware=False)
        assert aware.shape == raw.shape == img.shape
        assert not np.array_equal(aware, raw)
        again = diffcodec.decompress(res.data, model=diffc_model, steps=3, method=method)
        assert np.array_equal(aware, again)
    assert np.array_equal(diffcodec.decompress(res.data, model=diffc_model), img)
    steps = dict(diffcodec.decode_steps(res.data, model=diffc_model, methods=("denoise",), channel_aware=False))
    assert np.array_equal(steps[3]["denoise"],
                          diffcodec.decompress(res.data, model=diffc_model, steps=3, channel_aware=False))
