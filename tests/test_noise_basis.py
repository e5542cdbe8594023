"""UQDM's noise basis: uniform noise and factorised prior along opponent-colour (and DCT) axes, not RGB."""

import numpy as np
import pytest
import torch

import diffcodec
from conftest import make_tiny, synthetic_image
from diffcodec.codecs.noise_basis import BASES, NoiseBasis, dct_matrix
from diffcodec.codecs.uqdm import SQRT12, UQDM
from diffcodec.errors import ModelError
from diffcodec.models import load_model, save_model
from diffcodec.schedule import pixel_to_unit, posterior_coefficients

CODED = ["opponent", "opponent-dct4"]


@pytest.fixture(scope="module", params=CODED)
def opp_path(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / f"tiny-{request.param}.safetensors"
    save_model(make_tiny("uqdm", noise_basis=request.param), path, card={"default_steps": 2})
    return path


@pytest.fixture(scope="module")
def opp(opp_path):
    return load_model(str(opp_path))


def _full_matrix(basis: NoiseBasis, h: int, w: int) -> np.ndarray:
    """M as a dense (3hw, 3hw) matrix, from the transform of each unit vector."""
    eye = np.eye(3 * h * w).reshape(-1, 3, h, w)
    return basis.forward(eye).reshape(3 * h * w, -1).T


@pytest.mark.parametrize("name", sorted(BASES))
def test_bases_are_orthonormal_and_torch_matches_numpy(name):
    basis = NoiseBasis(name)
    m = _full_matrix(basis, 8, 4)
    assert np.allclose(m @ m.T, np.eye(len(m)), atol=1e-13)
    v = np.random.default_rng(0).normal(size=(2, 3, 8, 12))
    f = basis.forward(v)
    assert np.allclose(basis.inverse(f), v, atol=1e-13)
    assert np.allclose(basis.forward_t(torch.from_numpy(v)).numpy(), f, atol=1e-13)
    assert np.allclose(basis.inverse_t(torch.from_numpy(f)).numpy(), v, atol=1e-13)
    assert basis.max_row_l1 >= np.abs(m).sum(1).max() - 1e-12


def test_dct_basis_compacts_smooth_images():
    """A constant block is one (DC) coefficient per colour axis; the layout puts coefficient (i, j) of
    each block at offset (i, j) within it."""
    assert np.allclose(dct_matrix(4) @ dct_matrix(4).T, np.eye(4))
    v = np.ones((1, 3, 8, 8)) * np.array([0.3, 0.3, 0.3])[None, :, None, None]
    f = NoiseBasis("opponent-dct4").forward(v)
    assert np.allclose(f[0, 0, ::4, ::4], 0.3 * np.sqrt(3) * 4) and np.allclose(np.delete(f.ravel(), [0, 4, 32, 36]), 0)
    with pytest.raises(ValueError, match="multiples of 4"):
        NoiseBasis("opponent-dct4").forward(np.zeros((1, 3, 6, 8)))


def test_encoded_step_is_an_exact_sample_of_the_rotated_box(opp):
    """z_s lies in the posterior box around mu_Q along the basis axes (universal quantization in the
    opponent coordinates), and the decoder rebuilds it bit for bit."""
    img = synthetic_image(16, 20, seed=4)
    x = pixel_to_unit(img.transpose(2, 0, 1).astype(np.float64))[None]
    gam = opp.gamma_grid(opp.num_steps)
    z = opp.initial_latent(x.shape, 7)
    for i in range(opp.num_steps, 0, -1):
        z_s, sec = opp.encode_step(z, x, i, gam, 7)
        a, b, beta = (float(v) for v in posterior_coefficients(gam[i - 1], gam[i]))
        w = opp.basis.forward(z_s - (a * z + b * x)) / (SQRT12 * beta)
        assert np.abs(w).max() <= 0.5 + 1e-9
        # the rotated offsets are not axis-aligned in RGB: the basis is really used
        w_rgb = (z_s - (a * z + b * x)) / (SQRT12 * beta)
        assert np.abs(w_rgb).max() > 0.5
        assert np.array_equal(opp.decode_step(z, sec, i, gam, 7), z_s)
        z = z_s


def test_lossless_and_progressive_roundtrip(opp):
    img = synthetic_image(20, 28, seed=1)
    res = diffcodec.compress(img, model=opp, lossless=True)
    assert np.array_equal(diffcodec.decompress(res.data, model=opp), img)
    meta = diffcodec.info(res.data)
    for sec in meta["sections"][:-1]:
        cut = res.data[: sec["offset"] + sec["bytes"]]
        for method in ("denoise", "flow", "ancestral"):
            assert np.array_equal(diffcodec.decompress(cut, model=opp, method=method),
                                  diffcodec.decompress(res.data, model=opp, steps=sec["step"], method=method))
    gray = synthetic_image(12, 12, c=1)
    assert np.array_equal(diffcodec.decompress(diffcodec.compress(gray, model=opp, lossless=True).data,
                                               model=opp), gray)


@pytest.mark.parametrize("name", CODED)
def test_gray_costs_less_in_the_opponent_basis(name):
    """A gray image's colour differences are 0: along opponent axes only luminance costs bits (same
    network weights; the rgb model pays for the same detail in each channel)."""
    rgb_model = make_tiny("uqdm", seed=3)
    opp_model = make_tiny("uqdm", seed=3, noise_basis=name)
    torch.manual_seed(0)
    x = torch.from_numpy(np.repeat(synthetic_image(16, 16, c=1, seed=2), 3, 2)).permute(2, 0, 1)[None].float()
    x = x.repeat(8, 1, 1, 1) * (2 / 256) + (1 / 256 - 1)
    with torch.no_grad():
        a = rgb_model(x, all_steps=True)["steps_bpd"].mean()
        torch.manual_seed(0)
        b = opp_model(x, all_steps=True)["steps_bpd"].mean()
    assert float(b) < float(a)


@pytest.mark.parametrize("name", CODED)
def test_one_step_estimator_is_unbiased_in_the_opponent_basis(name):
    m = make_tiny("uqdm", noise_basis=name)
    x = torch.from_numpy(synthetic_image(8, 8)).permute(2, 0, 1)[None].float() * (2 / 256) + (1 / 256 - 1)
    torch.manual_seed(0)
    with torch.no_grad():
        one = torch.cat([m(x.repeat(256, 1, 1, 1))["bpd"] for _ in range(4)])
        full = m(x.repeat(256, 1, 1, 1), all_steps=True)["bpd"]
    se = float(one.std() / len(one) ** 0.5 + full.std() / len(full) ** 0.5)
    assert abs(float(one.mean() - full.mean())) < 4 * se + 1e-3


def test_basis_is_part_of_the_model_identity(opp, opp_path, tmp_path):
    """The same network weights in the rgb basis are another model: its files are refused."""
    rgb = make_tiny("uqdm", noise_basis="rgb")
    rgb.load_state_dict({k: v for k, v in opp.state_dict().items() if k != "noise_basis_code"})
    path = tmp_path / opp_path.name  # same name as the opponent model, other basis
    save_model(rgb, path)
    other = load_model(str(path))
    assert other.model_hash != opp.model_hash and other.config_dict().get("noise_basis") is None
    data = diffcodec.compress(synthetic_image(12, 12), model=opp, steps=2).data
    with pytest.raises(ModelError):
        diffcodec.decompress(data, model=other)
    with pytest.raises(ValueError, match="noise basis"):
        make_tiny("uqdm", noise_basis="xyz")


def test_old_rgb_models_keep_their_config_and_hash():
    m = make_tiny("uqdm")
    assert "noise_basis" not in m.config_dict() and "noise_basis_code" not in m.state_dict()
    assert make_tiny("uqdm", noise_basis="opponent-dct4").downscale == 4 and m.downscale == 2


def test_train_converts_an_rgb_model_to_the_opponent_basis(tmp_path, image_folder):
    from diffcodec.train import TrainConfig, train

    src = tmp_path / "rgb.safetensors"
    save_model(make_tiny("uqdm"), src)
    out = tmp_path / "run"
    train(TrainConfig(codec="uqdm", data=str(image_folder), out=str(out), init=str(src), noise_basis="opponent-dct4",
                      iters=2, batch=2, crop=16, val_batch=2, ckpt_every=1, warmup=1), quiet=True)
    m = load_model(str(out / "model.safetensors"))
    assert m.noise_basis == "opponent-dct4"
    img = synthetic_image(16, 16)
    assert np.array_equal(diffcodec.decompress(diffcodec.compress(img, model=m, lossless=True).data, model=m), img)
    train(TrainConfig(codec="uqdm", data=str(image_folder), out=str(out), init=str(src), noise_basis="opponent-dct4",
                      iters=3, batch=2, crop=16, val_batch=2, ckpt_every=1, warmup=1, resume=True), quiet=True)
    assert load_model(str(out / "model.safetensors")).noise_basis == "opponent-dct4"
    with pytest.raises(diffcodec.DiffcodecError, match="noise basis 'opponent-dct4'"):
        train(TrainConfig(codec="uqdm", data=str(image_folder), out=str(out), noise_basis="opponent", iters=4,
                          batch=2, crop=16, val_batch=2, resume=True), quiet=True)
    with pytest.raises(diffcodec.DiffcodecError, match="noise-basis"):
        train(TrainConfig(codec="diffc", data=str(image_folder), out=str(tmp_path / "d"), noise_basis="opponent",
                          iters=1), quiet=True)


def test_new_models_default_to_a_basis_their_network_can_serve():
    from diffcodec.train import TrainConfig, model_config

    assert model_config(TrainConfig(codec="uqdm", preset="medium"))["noise_basis"] == "opponent-dct4"
    assert model_config(TrainConfig(codec="uqdm", preset="tiny"))["noise_basis"] == "opponent"
    assert model_config(TrainConfig(codec="uqdm", preset="tiny", noise_basis="rgb"))["noise_basis"] == "rgb"
    assert "noise_basis" not in model_config(TrainConfig(codec="diffc", preset="tiny"))


def _with_offsets(seed: int = 0, basis: str = "opponent-dct4"):
    m = make_tiny("uqdm", seed=seed, noise_basis=basis, scale_offsets=True)
    with torch.no_grad():
        m.scale_offset.copy_(torch.linspace(-1.0, 1.0, m.scale_offset.numel()).reshape(m.scale_offset.shape))
    return m


def test_scale_offsets_at_the_steps_and_between():
    """A step of the model's grid uses its own offsets exactly (numpy and torch); between steps they are
    interpolated in gamma, beyond the ends held."""
    m = _with_offsets()
    gam = m.gamma_grid(m.num_steps)
    off = m.scale_offset.detach().double().numpy()
    for i in range(1, m.num_steps + 1):
        o = m.log_scale_offset(float(gam[i]), (1, 3, 8, 8))
        assert o.shape == (1, 3, 8, 8) and np.array_equal(o[0, :, 4:8, 0:4], off[i - 1])
        t = m.log_scale_offset(torch.tensor([gam[i]], dtype=torch.float64), (1, 3, 8, 8))
        assert np.allclose(t.detach().numpy(), o, atol=1e-6)  # torch: the float32 schedule of training
    mid = m.log_scale_offset(float(0.5 * (gam[1] + gam[2])), (1, 3, 4, 4))
    assert np.allclose(mid[0], 0.5 * (off[0] + off[1]))
    assert np.array_equal(m.log_scale_offset(float(gam[0]), (1, 3, 4, 4))[0], off[0])
    assert np.array_equal(m.log_scale_offset(99.0, (1, 3, 4, 4))[0], off[-1])
    assert make_tiny("uqdm").log_scale_offset(0.0, (1, 3, 4, 4)) == 0.0


def test_scale_offsets_change_the_code_and_round_trip(tmp_path):
    """The offsets are part of the prior (other bits), of the weights (another hash) and they train."""
    a = _with_offsets()
    b = make_tiny("uqdm", seed=0, noise_basis="opponent-dct4")
    save_model(a, tmp_path / "a.safetensors")
    save_model(b, tmp_path / "b.safetensors")
    ma, mb = load_model(str(tmp_path / "a.safetensors")), load_model(str(tmp_path / "b.safetensors"))
    assert ma.config_dict()["scale_offsets"] and "scale_offsets" not in mb.config_dict()
    assert ma.model_hash != mb.model_hash
    img = synthetic_image(20, 24, seed=3)
    ra, rb = (diffcodec.compress(img, model=m, lossless=True) for m in (ma, mb))
    assert ra.data != rb.data
    assert np.array_equal(diffcodec.decompress(ra.data, model=ma), img)
    for method in ("denoise", "flow", "ancestral"):
        assert diffcodec.decompress(ra.data, model=ma, steps=2, method=method).shape == img.shape
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() * (2 / 256) + (1 / 256 - 1)
    a.train()
    a(x.repeat(2, 1, 1, 1))["bpd"].mean().backward()
    assert a.scale_offset.grad is not None and float(a.scale_offset.grad.abs().sum()) > 0


def test_scale_offsets_keep_their_grid_at_another_step_count(tmp_path):
    """A model fine-tuned or run at another T keeps the offsets of the grid they were fitted on
    (interpolated in gamma): its config says so, and its files round-trip."""
    a = _with_offsets()
    cfg = {**a.config_dict(), "num_steps": 2 * a.num_steps, "scale_offset_steps": a.num_steps}
    b = UQDM.from_config(cfg)
    b.load_state_dict(a.state_dict())
    assert b.config_dict()["scale_offset_steps"] == a.num_steps and "scale_offset_steps" not in a.config_dict()
    gam_a = a.gamma_grid(a.num_steps)
    for i in range(1, a.num_steps + 1):  # b's even steps are a's steps: the same offsets, bit for bit
        assert np.array_equal(b.log_scale_offset(float(gam_a[i]), (1, 3, 4, 4)),
                              a.log_scale_offset(float(gam_a[i]), (1, 3, 4, 4)))
    save_model(b, tmp_path / "b.safetensors")
    mb = load_model(str(tmp_path / "b.safetensors"))
    assert mb.num_steps == b.num_steps and mb.scale_offset.shape[0] == a.num_steps
    img = synthetic_image(20, 24, seed=5)
    res = diffcodec.compress(img, model=mb, lossless=True)
    assert np.array_equal(diffcodec.decompress(res.data, model=mb), img)
