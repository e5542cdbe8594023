"""UQDM's checkerboard context (codecs/context.py): numpy and torch agree, files round-trip, only
the bits change, and the fit script never costs bits on its own crops."""


import numpy as np
import pytest
import torch

import diffcodec
from conftest import load_repo_module, make_tiny, synthetic_image
from diffcodec.codecs.context import context_np, context_t, from_blocks, second_pass, to_blocks
from diffcodec.codecs.uqdm import UQDM
from diffcodec.models import load_model, save_model


def _with_context(seed: int = 0, basis: str = "opponent-dct4", zero: bool = False) -> UQDM:
    m = make_tiny("uqdm", seed=seed, noise_basis=basis, context="checkerboard")
    if not zero:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            m.context_weight.copy_(0.1 * torch.randn(m.context_weight.shape, generator=g))
            m.context_adapt.copy_(0.2 * torch.randn(m.context_adapt.shape, generator=g))
    m.model_id, m.model_hash = "tiny-context", "0123456789abcdef"
    return m


def test_blocks_and_passes():
    v = np.arange(2 * 3 * 8 * 12, dtype=np.float64).reshape(2, 3, 8, 12)
    b = to_blocks(v, 4)
    assert b.shape == (2, 3, 4, 4, 2, 3) and b[1, 2, 3, 1, 1, 2] == v[1, 2, 7, 9]
    assert np.array_equal(from_blocks(b), v)
    assert torch.equal(from_blocks(to_blocks(torch.from_numpy(v), 4)), torch.from_numpy(v))
    sel = second_pass(3, 4)  # a checkerboard: every second-pass block's 4 neighbours are first-pass
    assert sel.sum() == 6 and not sel[0, 0] and sel[0, 1] and sel[1, 0] and not sel[1, 1]


def test_context_numpy_matches_torch():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(2, 3, 4, 4, 5, 6))
    s = np.exp(rng.normal(size=e.shape))
    w = rng.normal(size=(3, 4, 4, 4, 4, 4)) * 0.1
    a = rng.normal(size=(3, 4, 4, 2)) * 0.3
    m, s2 = context_np(e, s, w, a)
    tw = torch.from_numpy(w)[None].expand(2, *w.shape)
    ta = torch.from_numpy(a)[None].expand(2, *a.shape)
    mt, s2t = context_t(torch.from_numpy(e), torch.from_numpy(s), tw, ta)
    assert np.allclose(m, mt.numpy(), atol=1e-12)
    assert np.allclose(s2, s2t.numpy(), rtol=1e-4)  # numpy rounds the log-scale change to a 2^-16 grid
    # a block's mean depends only on its neighbours: change block (1, 1) and only (0,1),(2,1),(1,0),(1,2) move
    e2 = e.copy()
    e2[..., 1, 1] += 1.0
    moved = np.abs(context_np(e2, s, w, a)[0] - m).sum(axis=(0, 1, 2, 3)) > 0
    assert {tuple(ix) for ix in np.argwhere(moved)} == {(0, 1), (2, 1), (1, 0), (1, 2)}


@pytest.mark.parametrize("basis", ["opponent-dct4", "rgb"])
def test_context_round_trips_losslessly(basis, tmp_path):
    save_model(_with_context(basis=basis), tmp_path / "m.safetensors")
    m = load_model(str(tmp_path / "m.safetensors"))
    assert m.config_dict()["context"] == "checkerboard"
    img = synthetic_image(24, 20, seed=3)
    res = diffcodec.compress(img, model=m, lossless=True)
    loaded = load_model(str(tmp_path / "m.safetensors"))  # another instance decodes it
    assert np.array_equal(diffcodec.decompress(res.data, model=loaded), img)
    lossy = diffcodec.compress(img, model=loaded, steps=2)
    assert diffcodec.decompress(lossy.data, model=loaded).shape == img.shape


def test_context_changes_only_the_bits():
    """The same network with and without a context reconstructs identically at every step (k and z_s
    do not depend on the prior); a zero context costs what no context costs; a fitted one differs."""
    img = synthetic_image(16, 24, seed=4)
    plain = make_tiny("uqdm", seed=0, noise_basis="opponent-dct4")
    plain.model_id, plain.model_hash = "tiny-context", "0123456789abcdef"
    zero = _with_context(zero=True)
    ctx = _with_context()
    zero.load_state_dict({**zero.state_dict(), **plain.state_dict()})
    ctx.load_state_dict({**ctx.state_dict(), **plain.state_dict()})
    runs = [diffcodec.compress(img, model=mm, steps=2, seed=11) for mm in (plain, zero, ctx)]
    recs = [diffcodec.decompress(r.data, model=mm) for r, mm in zip(runs, (plain, zero, ctx))]
    assert np.array_equal(recs[0], recs[1]) and np.array_equal(recs[0], recs[2])
    ideal = [r.ideal_bits_total for r in runs]
    assert ideal[1] == pytest.approx(ideal[0], rel=1e-9) and ideal[2] != pytest.approx(ideal[0], rel=1e-6)


def test_context_is_in_the_training_loss():
    """The training loss includes the context (gradients reach it) and is the coder's code length: its
    exact expected bits agree with the mean bits of real lossless files of the same image."""
    m = _with_context().double()
    img = synthetic_image(16, 16, seed=2)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].double() * (2 / 256) + (1 / 256 - 1)).repeat(8, 1, 1, 1)
    torch.manual_seed(0)
    out = m(x, all_steps=True)
    out["bpd"].mean().backward()
    assert float(m.context_weight.grad.abs().sum()) > 0 and float(m.context_adapt.grad.abs().sum()) > 0
    expected = float(out["bpd"].detach().mean())
    coded = np.mean([diffcodec.compress(img, model=m, lossless=True, seed=s, keep=1).ideal_bits_total / img.size
                     for s in range(8)])  # the loss codes every coordinate
    assert coded == pytest.approx(expected, rel=0.03)
    zero = _with_context(zero=True).double()
    zero.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("context_")}, strict=False)
    torch.manual_seed(0)
    with torch.no_grad():
        assert float(zero(x, all_steps=True)["bpd"].mean()) != pytest.approx(expected, rel=1e-6)


def test_fit_context_never_costs_bits_on_its_crops():
    mod = load_repo_module("scripts", "fit_context")
    model = _with_context(zero=True).double().eval()
    x = torch.from_numpy(np.stack([synthetic_image(16, 16, seed=i) for i in range(3)])).permute(0, 3, 1, 2)
    report = mod.fit(model, x.double() * (2 / 256) + (1 / 256 - 1))
    assert len(report) == model.num_steps
    assert all(r["bits_per_pixel_after"] <= r["bits_per_pixel_before"] + 1e-4 for r in report)
    assert float(model.context_weight.detach().abs().sum()) > 0 or float(model.context_adapt.detach().abs().sum()) > 0
    img = synthetic_image(16, 20, seed=5)
    assert np.array_equal(diffcodec.decompress(diffcodec.compress(img, model=model, lossless=True).data,
                                               model=model), img)


def test_calibration_frame_loads_and_saves_a_fitted_model(tmp_path, image_folder):
    """diffcodec.calibrate: the source's weights carry over into a model with the fitted weights added,
    the other codecs are refused, and the saved model's card records the fit."""
    import argparse

    from diffcodec.calibrate import load_for_fit, save_fitted, training_crops
    from diffcodec.models import read_metadata

    src_model = make_tiny("uqdm", seed=2, noise_basis="opponent-dct4")
    save_model(src_model, tmp_path / "src.safetensors")
    src, model = load_for_fit(str(tmp_path / "src.safetensors"), "the context", {"context": "checkerboard"},
                              ("context_steps",), ("context_weight", "context_adapt"))
    assert model.context == "checkerboard" and model.context_weight.dtype == torch.float64
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k].float(), v.float()), k
    x = training_crops(str(image_folder), 16, 2)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float64
    a = argparse.Namespace(data=str(image_folder), crop=16, crops=2, out=str(tmp_path / "out.safetensors"))
    save_fitted(src, model, a, "context", [{"step": 1}])
    card = read_metadata(tmp_path / "out.safetensors")["card"]
    assert card["context"]["fitted_from_hash"] == src.model_hash and "val_bpd_before" in card["context"]
    assert load_model(a.out).context == "checkerboard"
    save_model(make_tiny("diffc"), tmp_path / "d.safetensors")
    with pytest.raises(SystemExit):
        load_for_fit(str(tmp_path / "d.safetensors"), "the context", {}, (), ())
