"""A UQDM model whose last step codes in a per-pixel basis (``final_basis``): the lossless section
codes x among the pixels consistent with that step's box.  Files round-trip exactly (RGB and gray),
the earlier steps are untouched, the training loss is the coder's code length, the carried scales
are the right variances, and the fit scripts convert a model and fit only the steps asked for."""


import numpy as np
import pytest
import torch

import diffcodec
from conftest import load_repo_module, make_tiny, synthetic_image
from diffcodec import container
from diffcodec.codecs.noise_basis import NoiseBasis, carry_variance
from diffcodec.codecs.uqdm import UQDM
from diffcodec.errors import DecodeError
from diffcodec.models import load_model, save_model


def _model(final: str | None = "opponent", basis: str = "opponent-dct4", seed: int = 0) -> UQDM:
    m = make_tiny("uqdm", seed=seed, noise_basis=basis, final_basis=final, context="checkerboard",
                  scale_offsets=True)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        m.context_weight.copy_(0.05 * torch.randn(m.context_weight.shape, generator=g))
        m.scale_offset.copy_(0.2 * torch.randn(m.scale_offset.shape, generator=g))
    m.model_id, m.model_hash = f"tiny-final-{final}", "0123456789abcdef"
    return m


def _unit(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].double() * (2 / 256) + (1 / 256 - 1)


@pytest.mark.parametrize("basis,final", [("opponent-dct4", "opponent"), ("opponent-dct4", "rgb"),
                                         ("opponent", "opponent"), ("rgb", "opponent")])
def test_lossless_round_trip_through_files(basis, final, tmp_path):
    save_model(_model(final, basis), tmp_path / "m.safetensors")
    img = synthetic_image(20, 28, seed=3)  # not a multiple of the blocks: padded, the region coded
    gray = synthetic_image(20, 28, seed=4)[:, :, 0]
    for im in (img, gray):
        data = diffcodec.compress(im, model=str(tmp_path / "m.safetensors"), lossless=True).data
        (tmp_path / "a.dfc").write_bytes(data)
        other = load_model(str(tmp_path / "m.safetensors"))  # another instance decodes the file
        out = diffcodec.decompress((tmp_path / "a.dfc").read_bytes(), model=other)
        assert np.array_equal(out.reshape(im.shape), im)


def test_earlier_steps_are_untouched_and_the_last_differs():
    """Steps before the last code the same symbols with the same bits (same network, priors, seed); the
    last step and the lossless section are coded differently, and every prefix still decodes."""
    img = synthetic_image(16, 24, seed=1)
    plain, final = _model(None), _model("opponent")
    final.load_state_dict({**final.state_dict(), **plain.state_dict()})
    a = diffcodec.compress(img, model=plain, lossless=True, seed=5)
    b = diffcodec.compress(img, model=final, lossless=True, seed=5)
    sa, sb = container.unpack(a.data).sections, container.unpack(b.data).sections
    T = plain.num_steps
    for k in range(T - 1):
        assert sa[k].payload == sb[k].payload and sa[k].symbols_crc == sb[k].symbols_crc
    assert sa[T - 1].payload != sb[T - 1].payload
    for k in range(1, T + 1):  # the latents (channel-aware reconstructions also use the next step's prior)
        pa = diffcodec.decompress(a.data, model=plain, steps=k, channel_aware=False)
        pb = diffcodec.decompress(b.data, model=final, steps=k, channel_aware=False)
        assert np.array_equal(pa, pb) == (k < T)  # z_0 differs: the last step's noise is in another basis


def test_training_loss_is_the_code_length():
    """The exact validation loss (all steps, the box term under the last step's prior) agrees with the
    mean ideal bits of real lossless files; the training form (uniform over the box) is close to it."""
    m = _model("opponent").double().eval()
    img = synthetic_image(16, 16, seed=2)
    x = _unit(img).repeat(8, 1, 1, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        out = m(x, all_steps=True)
    coded = np.mean([diffcodec.compress(img, model=m, lossless=True, seed=s, keep=1).ideal_bits_total / img.size
                     for s in range(8)])  # the loss codes every coordinate
    assert coded == pytest.approx(float(out["bpd"].mean()), rel=0.03)
    res = diffcodec.compress(img, model=m, lossless=True, seed=3)
    final = [s for s in res.sections if s["kind"] == "lossless"][0]
    assert 0 < final["ideal_bits"] / img.size < 1.0  # a fraction of a bit per sub-pixel: x is nearly known
    torch.manual_seed(0)
    with torch.no_grad():
        uniform = float(m(x)["data_bpd"].mean())
    assert 0 < uniform < 0.5 and abs(uniform - float(out["data_bpd"].mean())) < 0.1


def test_box_term_is_lower_than_the_gaussian_data_term():
    """On the same chain, coding x within the last step's box costs fewer bits than the 256-way
    Gaussian p(x | z_0) (what the final basis is for)."""
    m = _model("opponent").double().eval()
    x = _unit(synthetic_image(32, 32, seed=6)).repeat(4, 1, 1, 1)
    x_int = torch.round((x + 1) * 128 - 0.5).long()
    gam = m.schedule(torch.arange(5, dtype=torch.float64) / 4).detach()
    from diffcodec.codecs.uqdm import SQRT12
    from diffcodec.schedule import posterior_coefficients
    torch.manual_seed(1)
    a, b, beta = posterior_coefficients(gam[0], gam[1])
    z1 = (1 - torch.sigmoid(gam[1])).sqrt() * x + torch.sigmoid(gam[1]).sqrt() * torch.randn_like(x)
    z0 = a * z1 + b * x + SQRT12 * beta * m.final.inverse_t(torch.rand_like(x) - 0.5)
    box = float(m.box_data_nll(x_int, z1, z0, gam[0], gam[1]).sum())
    gauss = float(m.data_nll(z0, gam[0], x_int).sum())
    assert box < 0.8 * gauss


def test_carried_variances_are_the_covariance_diagonal():
    rng = np.random.default_rng(0)
    var = np.exp(rng.normal(size=(1, 3, 8, 8)))
    for src_name, dst_name in (("opponent-dct4", "opponent"), ("opponent-dct4", "rgb"), ("opponent", "rgb")):
        src, dst = NoiseBasis(src_name), NoiseBasis(dst_name)
        # dense: columns of M_src^T are the images of unit coordinates
        eye = np.eye(var.size).reshape(-1, 1, 3, 8, 8)
        cols = np.stack([dst.forward(src.inverse(e)).reshape(-1) for e in eye], 1)  # dst <- src
        want = (cols**2 * var.reshape(-1)[None, :]).sum(1).reshape(var.shape)
        got = carry_variance(src, dst, var)
        assert np.allclose(got, want, rtol=1e-12)
        assert np.allclose(carry_variance(src, dst, torch.from_numpy(var)).numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="per-pixel"):
        carry_variance(NoiseBasis("opponent"), NoiseBasis("opponent-dct4"), var)


def test_config_hash_and_frozen_gamma(tmp_path):
    m = _model("opponent")
    assert m.config_dict()["final_basis"] == "opponent" and not m.schedule.gamma_min.requires_grad
    assert "final_basis" not in _model(None).config_dict() and _model(None).schedule.gamma_min.requires_grad
    save_model(m, tmp_path / "a.safetensors")
    save_model(_model(None), tmp_path / "b.safetensors")
    a, b = load_model(str(tmp_path / "a.safetensors")), load_model(str(tmp_path / "b.safetensors"))
    assert a.final_basis == "opponent" and b.final is None and a.model_hash != b.model_hash
    with pytest.raises(ValueError, match="final basis"):
        make_tiny("uqdm", final_basis="opponent-dct4")
    img = synthetic_image(16, 16, seed=1)
    data = diffcodec.compress(img, model=a, lossless=True).data
    with pytest.raises(diffcodec.DiffcodecError):  # another model is refused, not decoded into garbage
        diffcodec.decompress(data, model=b)


def test_lossless_section_needs_the_previous_latent():
    m = _model("opponent").double().eval()
    img = synthetic_image(16, 16, seed=1)
    cont = container.unpack(diffcodec.compress(img, model=m, lossless=True).data)
    state = None
    coding = diffcodec.api._coding(cont.header)
    for state in m.iter_latents((1, 3, 16, 16), cont.header.seed, cont.sections[:-1], **coding):  # noqa: B007
        pass
    with pytest.raises(DecodeError, match="before the last step"):
        m.decode_final(state._replace(z_prev=None), cont.sections[-1], (3, 16, 16), cont.header.seed)
    assert np.array_equal(m.decode_final(state, cont.sections[-1], (3, 16, 16), cont.header.seed),
                          img.transpose(2, 0, 1))


def test_fit_scripts_convert_and_fit_only_the_last_step(tmp_path, image_folder, monkeypatch):
    """``--final-basis opponent --steps 4``: the converted model keeps every other step's offsets and
    context and the network bit for bit, fits the last step's, and still round-trips."""
    import sys

    src = _model(None)
    save_model(src, tmp_path / "src.safetensors")
    for name, out, inp in (("fit_scale_offsets", "a", "src"), ("fit_context", "b", "a")):
        args = [name, str(tmp_path / f"{inp}.safetensors"), str(tmp_path / f"{out}.safetensors"), "--data",
                str(image_folder), "--crops", "2", "--crop", "16", "--threads", "1", "--steps", "4"]
        if name == "fit_scale_offsets":
            args += ["--final-basis", "opponent"]
        monkeypatch.setattr(sys, "argv", args)
        load_repo_module("scripts", name).main()
    s, b = load_model(str(tmp_path / "src.safetensors")), load_model(str(tmp_path / "b.safetensors"))
    assert b.final_basis == "opponent"
    for k, v in s.state_dict().items():  # (the fits save float16 weights)
        if k in ("scale_offset", "context_weight", "context_adapt"):
            assert torch.equal(b.state_dict()[k][1:].half(), v[1:].half()), k  # steps 1-3 (j = 4, 3, 2) kept
            assert not torch.equal(b.state_dict()[k][0].half(), v[0].half()), k  # the last step's refitted
        else:
            assert torch.equal(b.state_dict()[k].half(), v.half()), k
    img = synthetic_image(16, 20, seed=5)
    assert np.array_equal(diffcodec.decompress(diffcodec.compress(img, model=b, lossless=True).data, model=b), img)


def test_lossless_section_reuses_the_last_steps_network_evaluation(monkeypatch):
    """Encoder and decoder evaluate the network once per step: the lossless section's prior is the
    last step's, remembered (per thread) rather than evaluated again."""
    m = _model("opponent").double().eval()
    calls = []
    real = m.evaluate_network
    monkeypatch.setattr(m, "evaluate_network", lambda z, g: calls.append(g) or real(z, g))
    img = synthetic_image(16, 16, seed=1)
    data = diffcodec.compress(img, model=m, lossless=True).data
    assert len(calls) == m.num_steps
    calls.clear()
    assert np.array_equal(diffcodec.decompress(data, model=m), img)
    assert len(calls) == m.num_steps and m._eval_memo is None


def test_ancestral_last_step_samples_in_the_final_basis():
    """The ancestral reconstruction's step to t = 0 draws its noise in the final basis with the carried
    scales: same network and seed, another sample than without a final basis; steps above t = 0 alike."""
    img = synthetic_image(16, 24, seed=2)
    plain, final = _model(None), _model("opponent")
    final.load_state_dict({**final.state_dict(), **plain.state_dict()})
    T = plain.num_steps
    runs = [diffcodec.compress(img, model=m, steps=T - 1, seed=5) for m in (plain, final)]
    one = [diffcodec.decompress(r.data, model=m, method="ancestral") for r, m in zip(runs, (plain, final))]
    assert not np.array_equal(one[0], one[1])
    again = diffcodec.decompress(runs[1].data, model=final, method="ancestral")
    assert np.array_equal(one[1], again)


def test_fine_tuning_keeps_the_final_basis_and_gamma_min(tmp_path, image_folder):
    """train --init of a model with a final basis: the run trains the network, offsets and context (the
    last step's included) but not gamma_min, and its model still round-trips losslessly."""
    from diffcodec.train import TrainConfig, train

    src = tmp_path / "final.safetensors"
    save_model(_model("opponent"), src)
    out = tmp_path / "run"
    train(TrainConfig(codec="uqdm", data=str(image_folder), out=str(out), init=str(src), iters=3, batch=2, crop=16,
                      val_batch=2, ckpt_every=1, warmup=1, lr=1e-3), quiet=True)
    a, b = load_model(str(src)), load_model(str(out / "model.safetensors"))
    assert b.final_basis == "opponent"
    assert float(b.schedule.gamma_min) == float(a.schedule.gamma_min)
    assert not torch.equal(a.context_weight[0].float(), b.context_weight[0].float())  # the last step's context
    assert not torch.equal(a.scale_offset[0].float(), b.scale_offset[0].float())
    img = synthetic_image(16, 20, seed=4)
    assert np.array_equal(diffcodec.decompress(diffcodec.compress(img, model=b, lossless=True).data, model=b), img)
