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
