"""RVGC: rate-variable latent coding with a few-step diffusion decoder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import diffcodec
from conftest import make_image_folder, make_tiny, synthetic_image
from diffcodec import container
from diffcodec.cli import main
from diffcodec.codecs.rvgc import RVGC
from diffcodec.entropy import NUM_SCALES, gaussian_scale_tables, scale_index
from diffcodec.errors import DiffcodecError
from diffcodec.models import load_model, save_model
from diffcodec.rng import ANCESTRAL, SeededStream


def make_tiny_rvgc(seed: int = 0) -> RVGC:
    return make_tiny("rvgc", seed)


@pytest.fixture(scope="module")
def rvgc_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-rvgc.safetensors"
    save_model(make_tiny_rvgc(), path, card={"default_q": 2.0})
    return path


@pytest.fixture(scope="module")
def rvgc(rvgc_path):
    return load_model(str(rvgc_path))


def test_training_loss_is_finite_and_differentiable():
    m = make_tiny_rvgc()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = m(x)
    for k in ("loss", "bpp", "mse", "den"):
        assert out[k].shape == (2,) and torch.isfinite(out[k]).all()
    out["loss"].mean().backward()
    assert all(p.grad is not None for p in m.g_a.parameters())
    assert all(p.grad is not None for p in m.den.parameters())


def test_scale_tables():
    tabs = gaussian_scale_tables(40)
    assert tabs.shape == (NUM_SCALES, 81)
    scales = np.exp(np.linspace(np.log(0.11), np.log(256.0), NUM_SCALES))
    sums = tabs.sum(1)
    assert np.all(sums <= 1 + 1e-12)
    assert np.allclose(sums[scales < 5], 1.0, atol=1e-9)  # wider scales have mass beyond +-40
    assert np.array_equal(tabs, tabs[:, ::-1])
    assert scale_index(np.array([-100.0, 100.0])).tolist() == [0, NUM_SCALES - 1]


def test_round_trip_and_rate_monotone_in_q(rvgc):
    img = synthetic_image(40, 56, seed=1)
    bits = []
    for q in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        res = diffcodec.compress(img, model=rvgc, q=q)
        assert res.q == q and res.codec == "rvgc"
        assert diffcodec.info(res.data)["q"] == q
        for kw in ({}, {"deterministic": True}, {"sampler_steps": 3, "eta": 0.5}):
            out = diffcodec.decompress(res.data, model=rvgc, **kw)
            assert out.shape == img.shape and out.dtype == np.uint8
        bits.append(res.sections[1]["ideal_bits"])
    assert all(a > b for a, b in zip(bits, bits[1:])), bits


def test_sampler_max_q_decodes_plainly_above_it(tmp_path):
    """A model's sampler_max_q: above it the default decoder is the plain synthesis; an explicit
    sampler_steps is still honoured; the setting survives saving (and is absent when unset)."""
    m = make_tiny_rvgc()
    m.sampler_max_q = 3.0
    path = tmp_path / "m.safetensors"
    save_model(m, path)
    m = load_model(str(path))
    assert m.sampler_max_q == 3.0 and "sampler_max_q" not in make_tiny_rvgc().config_dict()
    img = synthetic_image(32, 48, seed=3)
    for q, plain in ((2.0, False), (4.0, True)):
        data = diffcodec.compress(img, model=m, q=q).data
        default = diffcodec.decompress(data, model=m)
        det = diffcodec.decompress(data, model=m, deterministic=True)
        sampled = diffcodec.decompress(data, model=m, sampler_steps=m.sampler_steps)
        assert np.array_equal(default, det) == plain and np.array_equal(default, sampled) != plain
        assert not np.array_equal(sampled, det)


def test_sampler_max_q_by_pixels_lets_larger_images_sample_to_a_higher_q(tmp_path):
    """sampler_max_q_by_pixels: images of at least so many pixels sample up to a higher q (the
    decoder knows the size from the header); smaller ones keep sampler_max_q; it survives saving."""
    m = make_tiny_rvgc()
    m.sampler_max_q, m.sampler_max_q_by_pixels = 3.0, ((2000, 5.0),)
    path = tmp_path / "m.safetensors"
    save_model(m, path)
    m = load_model(str(path))
    assert m.sampler_max_q_by_pixels == ((2000, 5.0),)
    assert [m.sampler_max_q_for(px) for px in (None, 1999, 2000)] == [3.0, 3.0, 5.0]
    assert m.default_sampler_steps(4.0, 1999) == 0 and m.default_sampler_steps(4.0, 2000) == m.sampler_steps
    for (h, w), sampled in (((32, 48), False), ((48, 48), True)):  # 1536 and 2304 pixels, both at q 4
        data = diffcodec.compress(synthetic_image(h, w, seed=4), model=m, q=4.0).data
        default = diffcodec.decompress(data, model=m)
        det = diffcodec.decompress(data, model=m, deterministic=True)
        assert np.array_equal(default, det) != sampled
        if sampled:
            assert np.array_equal(default, diffcodec.decompress(data, model=m, sampler_steps=m.sampler_steps))
    with pytest.raises(ValueError, match="sampler_max_q"):
        type(m).from_config({**make_tiny_rvgc().config_dict(), "sampler_max_q_by_pixels": [[2000, 5.0]]})


def test_decoded_latent_matches_encoder(rvgc):
    px = synthetic_image(32, 48, seed=2).transpose(2, 0, 1).copy()
    y = rvgc.analyse(px)
    secs, y_hat = rvgc.encode_latent(y, 3.0)
    assert np.array_equal(rvgc.decode_latent_rvgc(secs, 3.0, y.shape), y_hat)
    assert np.abs(y_hat - y).max() <= 1.5 + 1e-9  # |error| <= q/2
    # the sampler is seeded: same stream, same sample; steps=0 is the plain synthesis
    a = rvgc.reconstruct_rvgc(y_hat, 3.0, rng=SeededStream(0, ANCESTRAL))
    b = rvgc.reconstruct_rvgc(y_hat, 3.0, rng=SeededStream(0, ANCESTRAL))
    assert np.array_equal(a, b)
    assert np.array_equal(rvgc.reconstruct_rvgc(y_hat, 3.0, sampler_steps=0),
                          rvgc.reconstruct_rvgc(y_hat, 3.0, deterministic=True))


def test_bpp_search_honours_budget(rvgc):
    img = synthetic_image(64, 64, seed=3)
    lo = diffcodec.compress(img, model=rvgc, q=rvgc.q_range[1]).bpp
    hi = diffcodec.compress(img, model=rvgc, q=rvgc.q_range[0]).bpp
    target = 0.5 * (lo + hi)
    res = diffcodec.compress(img, model=rvgc, bpp=target)
    assert lo <= res.bpp <= target and rvgc.q_range[0] < res.q < rvgc.q_range[1]
    with pytest.raises(DiffcodecError, match="cannot reach"):
        diffcodec.compress(img, model=rvgc, bpp=0.5 * lo)


def test_bad_requests(rvgc):
    img = synthetic_image(16, 16)
    with pytest.raises(DiffcodecError, match="outside the range"):
        diffcodec.compress(img, model=rvgc, q=100.0)
    with pytest.raises(DiffcodecError, match="no steps"):
        diffcodec.compress(img, model=rvgc, steps=1)
    data = diffcodec.compress(img, model=rvgc, q=2.0).data
    with pytest.raises(DiffcodecError, match="rvgc"):
        diffcodec.decompress(data, model=rvgc, steps=1)


def test_file_cut_after_hyper_latent_decodes_a_preview(rvgc):
    img = synthetic_image(32, 32, seed=4)
    data = diffcodec.compress(img, model=rvgc, q=2.0).data
    cut = data[: diffcodec.info(data)["sections"][1]["offset"]]
    meta = diffcodec.info(cut)
    assert not meta["complete"] and meta["sections_in_file"] == 1
    assert diffcodec.decompress(cut, model=rvgc, deterministic=True).shape == img.shape


def test_q_out_of_range_in_a_file_is_refused(rvgc):
    img = synthetic_image(16, 16)
    data = diffcodec.compress(img, model=rvgc, q=2.0).data
    cont = container.unpack(data)
    cont.header.params = rvgc.header_params(1000.0)
    with pytest.raises(DiffcodecError, match="outside the range"):
        diffcodec.decompress(container.pack(cont.header, cont.sections), model=rvgc)


def test_cli_round_trip_json_and_errors(rvgc_path, tmp_path, capsys):
    png = tmp_path / "a.png"
    Image.fromarray(synthetic_image(48, 40, seed=5)).save(png)
    dfc, out = tmp_path / "a.dfc", tmp_path / "out.png"
    assert main(["compress", str(png), "-o", str(dfc), "--model", str(rvgc_path), "--q", "3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["q"] == 3.0 and rep["codec"] == "rvgc" and rep["ideal_bits_total"] > 0
    assert rep["bpp"] == pytest.approx(8 * dfc.stat().st_size / (48 * 40))
    assert main(["decompress", str(dfc), "-o", str(out), "--model", str(rvgc_path), "--sampler-steps", "2"]) == 0
    assert np.asarray(Image.open(out)).shape == (48, 40, 3)
    assert main(["decompress", str(dfc), "-o", str(tmp_path / "d.png"), "--model", str(rvgc_path),
                 "--deterministic"]) == 0
    assert main(["decompress", str(dfc), "-o", str(tmp_path / "e.png"), "--model", str(rvgc_path)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[-3].endswith("sampler, 2 steps") and said[-2].endswith("plain synthesis")
    assert said[-1].endswith("the model's default decoder")
    assert main(["info", str(dfc)]) == 0
    text = capsys.readouterr().out
    assert "q = 3" in text and "hyper-latent" in text and "latent" in text
    assert main(["compress", str(png), "-o", str(tmp_path / "b.dfc"), "--model", str(rvgc_path), "--bpp", "4"]) == 0
    assert 8 * (tmp_path / "b.dfc").stat().st_size / (48 * 40) <= 4
    capsys.readouterr()
    assert main(["compress", str(png), "-o", str(tmp_path / "c.dfc"), "--model", str(rvgc_path), "--q", "99"]) == 1
    assert "outside the range" in capsys.readouterr().err
    assert not (tmp_path / "c.dfc").exists()


_ENC = """
import sys, numpy as np, torch, diffcodec
torch.set_num_threads(1)
res = diffcodec.compress(np.load(sys.argv[2]), model=sys.argv[1], q=1.5)
open(sys.argv[3], 'wb').write(res.data)
"""
_DEC = """
import sys, numpy as np, torch, diffcodec
torch.set_num_threads(2)
data = open(sys.argv[2], 'rb').read()
np.save(sys.argv[3], diffcodec.decompress(data, model=sys.argv[1]))
"""


def test_cross_process_thread_count_determinism(rvgc_path, rvgc, tmp_path):
    """Encode with 1 thread, decode with 2 in another process: same symbols (CRC-checked), same pixels."""
    img = synthetic_image(96, 80, seed=6)
    np.save(tmp_path / "img.npy", img)
    subprocess.run([sys.executable, "-c", _ENC, str(rvgc_path), str(tmp_path / "img.npy"), str(tmp_path / "a.dfc")],
                   check=True)
    subprocess.run([sys.executable, "-c", _DEC, str(rvgc_path), str(tmp_path / "a.dfc"), str(tmp_path / "o.npy")],
                   check=True)
    data = (tmp_path / "a.dfc").read_bytes()
    assert data == diffcodec.compress(img, model=rvgc, q=1.5).data
    assert np.array_equal(np.load(tmp_path / "o.npy"), diffcodec.decompress(data, model=rvgc))


def test_train_command(tmp_path):
    data = make_image_folder(tmp_path, size=40)
    out = tmp_path / "run"
    assert main(["train", "--codec", "rvgc", "--data", str(data), "--out", str(out), "--preset", "tiny",
                 "--batch", "2", "--crop", "32", "--iters", "2", "--val-batch", "2", "-q"]) == 0
    m = load_model(str(out / "model.safetensors"))
    assert m.codec_id == "rvgc"
    res = diffcodec.compress(synthetic_image(32, 32), model=m, q=4.0)
    assert diffcodec.decompress(res.data, model=m).shape == (32, 32, 3)


def test_tiled_transforms_match_whole_image(rvgc, monkeypatch):
    """Large images run g_a / g_s in tiles (bounded memory); with a halo wider than the receptive
    field the result equals the whole-image computation up to float64 rounding."""
    from diffcodec.codecs import rvgc as mod

    px = synthetic_image(192, 256, seed=7).transpose(2, 0, 1).copy()
    y_full = rvgc.analyse(px)
    x_full = rvgc.synthesize(y_full, 2.0)
    monkeypatch.setattr(mod, "ANALYSIS_TILE", 32)
    y_tiled = rvgc.analyse(px)
    assert np.allclose(y_tiled, y_full, atol=1e-9)  # 3 x 4 tiles of 32 px (+ 64 px halo)
    x_tiled = rvgc.synthesize(y_full, 2.0)  # 6 x 8 tiles of 2 latents (+ 4 latents halo)
    assert np.abs(x_tiled.astype(int) - x_full.astype(int)).max() <= 1


def test_tiled_synthesis_with_a_grown_decoder(monkeypatch, tmp_path):
    """The full-resolution head widens g_s's receptive field by a few pixels: still inside the halo."""
    from diffcodec.codecs import rvgc as mod

    path = tmp_path / "grown.safetensors"
    save_model(make_tiny("rvgc", 3, N_s=16, refine=8), path)
    m = load_model(str(path))
    y = m.analyse(synthetic_image(192, 256, seed=7).transpose(2, 0, 1).copy())
    x_full = m.synthesize(y, 2.0)
    monkeypatch.setattr(mod, "ANALYSIS_TILE", 32)
    assert np.abs(m.synthesize(y, 2.0).astype(int) - x_full.astype(int)).max() <= 1
