"""The shared denoiser: the pixel-unshuffle stem, legacy configs, and the training-time data term."""

import numpy as np
import pytest
import torch

import diffcodec
from conftest import make_tiny, synthetic_image
from diffcodec.models import load_model, save_model
from diffcodec.networks import DenoiserUNet, UNetConfig
from diffcodec.train import PRESETS, TrainConfig, model_config


@pytest.mark.parametrize("patch, head", [(1, 0), (2, 0), (4, 0), (2, 8), (4, 8)])
def test_patch_stem_shapes_and_downscale(patch, head):
    cfg = {**PRESETS["tiny"], "patch": patch, "head_channels": head, "input_skip": bool(head),
           "fourier_features": (7, 8) if head else ()}
    net = DenoiserUNet(UNetConfig(**cfg, out_channels=6)).double()
    assert net.downscale == 2 * patch
    d = net.downscale
    z = torch.randn(2, 3, 3 * d, 5 * d, dtype=torch.float64)
    out = net(z, torch.tensor([0.5, -3.0], dtype=torch.float64))
    assert out.shape == (2, 6, 3 * d, 5 * d)


def test_patch_stem_output_is_per_pixel():
    """Pixel-shuffling the output must give each pixel its own values (not one per patch)."""
    torch.manual_seed(0)
    net = DenoiserUNet(UNetConfig(**{**PRESETS["tiny"], "patch": 4}, out_channels=6))
    torch.nn.init.normal_(net.conv_out.weight)
    out = net(torch.randn(1, 3, 16, 16), torch.tensor([0.0]))
    assert not torch.allclose(out[..., 0, 0], out[..., 0, 1])


def test_fourier_features_need_the_head():
    with pytest.raises(ValueError, match="head"):
        DenoiserUNet(UNetConfig(**{**PRESETS["tiny"], "fourier_features": (8,)}))


def test_added_mid_blocks_start_as_the_identity():
    """A network grown at its coarsest level (``mid_blocks``) computes what the trained one did, until
    the new blocks train; its trained blocks load unchanged."""
    torch.manual_seed(0)
    cfg = {**PRESETS["tiny"], "patch": 2, "head_channels": 8, "input_skip": True}
    small = DenoiserUNet(UNetConfig(**cfg, out_channels=6)).double()
    for p in small.parameters():  # a "trained" network: no zero weights left
        torch.nn.init.normal_(p, std=0.05)
    big = DenoiserUNet(UNetConfig(**cfg, out_channels=6, mid_blocks=4)).double()
    missing, unexpected = big.load_state_dict(small.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("mid.2.", "mid.3.")) for k in missing)
    z, g = torch.randn(2, 3, 16, 24, dtype=torch.float64), torch.tensor([1.0, -4.0], dtype=torch.float64)
    assert torch.equal(small(z, g), big(z, g))
    torch.nn.init.normal_(big.mid[3].conv2.weight)  # a trained new block changes the output
    assert not torch.allclose(small(z, g), big(z, g))
    with pytest.raises(ValueError, match="mid_blocks"):
        DenoiserUNet(UNetConfig(**cfg, mid_blocks=0))


def test_input_skip_preconditions_eps():
    """With zero output weights the eps channels are exactly sigma(gamma) * z, the aux ones zero."""
    net = DenoiserUNet(UNetConfig(**{**PRESETS["tiny"], "patch": 2, "head_channels": 8, "input_skip": True}))
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gamma = torch.tensor([-5.0, 3.0], dtype=torch.float64)
    out = net.double()(z, gamma)
    sigma = torch.sigmoid(gamma).sqrt()[:, None, None, None]
    assert torch.equal(out[:, :3], sigma * z) and torch.equal(out[:, 3:], torch.zeros_like(out[:, 3:]))


def test_legacy_configs_have_no_patch():
    """Weights saved before the stem existed carry no ``patch`` key: they must build unchanged."""
    d = UNetConfig(**PRESETS["small"]).to_dict()
    for k in ("patch", "head_channels", "input_skip", "fourier_features"):
        del d[k]
    legacy = UNetConfig.from_dict(d)
    assert (legacy.patch, legacy.head_channels, legacy.input_skip, legacy.fourier_features) == (1, 0, False, ())
    assert model_config(TrainConfig(codec="uqdm"))["unet"]["patch"] == 4  # the new default preset
    assert model_config(TrainConfig(codec="diffc", preset="small"))["unet"]["patch"] == 1


@pytest.mark.parametrize("codec", ["uqdm", "diffc"])
@pytest.mark.parametrize("gamma0, tol", [(-12.0, 1e-9), (-8.0, 1e-3)])
def test_windowed_data_term_equals_full_softmax(codec, gamma0, tol):
    m = make_tiny(codec)
    x = torch.from_numpy(synthetic_image(8, 8)).permute(2, 0, 1)[None].long()
    x[0, 0, 0, :3] = torch.tensor([0, 255, 1])  # edges of the level range
    alpha = torch.sigmoid(torch.tensor(-gamma0)).sqrt()
    sigma = torch.sigmoid(torch.tensor(gamma0)).sqrt()
    z0 = alpha * ((x.double() + 0.5) / 128.0 - 1.0) + sigma * torch.randn(x.shape, dtype=torch.float64)
    g = torch.tensor(gamma0, dtype=torch.float64)
    m.train()
    win = m.data_nll(z0, g, x)
    m.eval()
    full = m.data_nll(z0, g, x)
    assert torch.allclose(win, full, atol=tol, rtol=0)


@pytest.mark.parametrize("codec", ["uqdm", "diffc"])
def test_patch_model_round_trips_through_files(codec, tmp_path):
    """A patch-2 model codes odd-sized images (padded to its downscale of 4) and decodes them
    bit-exactly after a save/load, including the tiled path (tiles scale with the patch)."""
    from diffcodec import diffusion

    kw = {"num_steps": 3} if codec == "uqdm" else {"num_steps": 4, "c_max": 8}
    path = tmp_path / f"p2-{codec}.safetensors"
    net = {"patch": 2, "head_channels": 8, "input_skip": True, "fourier_features": (8,)}
    save_model(make_tiny(codec, net=net, **kw), path)
    model = load_model(str(path))
    assert model.downscale == 4
    img = synthetic_image(13, 22)
    res = diffcodec.compress(img, model=model, lossless=True)
    assert np.array_equal(diffcodec.decompress(res.data, model=load_model(str(path))), img)
    lossy = diffcodec.compress(img, model=model, steps=2)
    a = diffcodec.decompress(lossy.data, model=model, method="flow")
    tile, halo = diffusion.TILE, diffusion.HALO
    try:
        diffusion.TILE, diffusion.HALO = 4, 2  # 8 x 4 pixel tiles for this patch-2 model
        z = np.random.default_rng(0).normal(size=(1, 3, 16, 24))
        e1, _ = model.eval_f64(z, 0.0)
        e2, _ = model.eval_f64(z, 0.0)
        assert np.array_equal(e1, e2)
        res_t = diffcodec.compress(img, model=model, lossless=True)
        assert np.array_equal(diffcodec.decompress(res_t.data, model=model), img)
    finally:
        diffusion.TILE, diffusion.HALO = tile, halo
    assert a.shape == img.shape
