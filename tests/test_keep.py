"""UQDM kept coordinates: steps that code only their largest-prior-scale coordinates and draw the others
from their prior with randomness both sides share."""

import struct

import numpy as np
import pytest

import diffcodec
from conftest import make_tiny, make_tiny_uqdm_variant, synthetic_image, under_threads
from diffcodec import container
from diffcodec.cli import main
from diffcodec.codecs.uqdm import UQDM
from diffcodec.errors import DiffcodecError, FormatError


@pytest.fixture(scope="module", params=["context", "plain"])
def model(request):
    return make_tiny_uqdm_variant(request.param, f"tiny-keep-{request.param}")


@pytest.mark.parametrize("box_prior", [True, False])
def test_kept_steps_are_lossless_and_every_cut_decodes_to_its_prefix(model, box_prior):
    img = synthetic_image(24, 32, seed=1)
    T = model.num_steps
    res = diffcodec.compress(img, model=model, lossless=True, seed=2, keep=0.5, box_prior=box_prior)
    meta = diffcodec.info(res.data)
    assert meta["keep"] == (128,) * (T - 2) + (255,) and meta["box_prior"] is box_prior
    assert np.array_equal(diffcodec.decompress(res.data, model=model), img)
    secs = container.unpack(res.data).sections
    n = img.size
    ends = [struct.unpack("<HI", s.params)[1] for s in secs[: T - 1]]
    assert ends == [(n * 128 + 127) // 255] * (T - 2) + [n]  # one section per step, ending at its kept count
    assert [s["kind"] for s in res.sections] == ["step"] * T + ["lossless"]
    for k, images in diffcodec.decode_steps(res.data, model=model, methods=("denoise", "flow")):
        for method, im in images.items():
            assert np.array_equal(im, diffcodec.decompress(res.data, model=model, steps=k, method=method))
    whole = diffcodec.compress(img, model=model, lossless=True, seed=2, box_prior=box_prior, keep=1)
    first_whole = container.unpack(whole.data).sections[0]
    assert secs[0].symbols_crc != first_whole.symbols_crc  # the first step codes fewer symbols


def test_kept_shares_by_default():
    """compress writes the model's default shares (10% / 20% / 80% back from step T-1 for T = 4, the first steps
    of longer chains 10%); keep=1 codes every coordinate in the format before (no keep flag); box_prior=False
    (the format of the versions before box priors, which know no kept coordinates) codes every coordinate."""
    img = synthetic_image(16, 16)
    for T, fractions in ((4, (0.1, 0.2, 0.8)), (2, (0.8,)), (6, (0.1, 0.1, 0.1, 0.2, 0.8))):
        m = make_tiny("uqdm", num_steps=T)
        m.model_id, m.model_hash = f"tiny-default-keep-{T}", "0123456789abcdef"
        assert m.default_keep() == fractions
        assert diffcodec.info(diffcodec.compress(img, model=m, steps=1).data)["keep"] == \
            tuple(round(255 * f) for f in fractions)
    assert diffcodec.info(diffcodec.compress(img, model=m, steps=1, keep=1).data)["keep"] is None
    old = diffcodec.info(diffcodec.compress(img, model=m, steps=1, box_prior=False).data)
    assert old["keep"] is None and old["box_prior"] is False
    assert diffcodec.info(diffcodec.compress(img, model=m, steps=1, box_prior=False, keep=0.5).data)["keep"]


def test_denoise_starts_from_a_kept_steps_prior_mean_after_the_first_step(model):
    """The chain, flow and ancestral go on from a kept step's draws; denoise starts from them after the first
    step and from the prior mean (the coded coordinates as sent, the others at the mean) after the later ones."""
    img = synthetic_image(24, 32, seed=6)
    res = diffcodec.compress(img, model=model, steps=3, seed=3, keep=(0.2, 0.5, 1.0))
    cont = container.unpack(res.data)
    states = list(model.iter_latents((1, 3, 24, 32), 3, cont.sections, **diffcodec.api._coding(cont.header)))
    assert all(np.array_equal(st.z_view, st.z) for st in states)
    assert states[0].z_denoise is None and states[2].z_denoise is None  # the first step; a step coding all
    T, n = model.num_steps, img.size
    diff = model.step_basis(T - 1).forward(states[1].z_denoise - states[1].z).reshape(-1)
    assert np.sum(np.abs(diff) < 1e-9) == (n * 128 + 127) // 255  # the coded coordinates agree, the others not
    st = states[1]
    for method, z in (("denoise", st.z_denoise), ("flow", st.z)):
        expect = model.reconstruct(z, st.gamma_view, method=method, box=st.box, default_steps=max(1, st.remaining),
                                   rng=diffcodec.rng.SeededStream(3, diffcodec.rng.ANCESTRAL))
        assert np.array_equal(diffcodec.decompress(res.data, model=model, steps=2, method=method),
                              expect[0].transpose(1, 2, 0))


def test_kept_steps_with_parts_cut_anywhere(model):
    """Parts divide the kept coordinates; a file cut after any section decodes to what decode_steps shows."""
    img = synthetic_image(24, 32, seed=3)
    res = diffcodec.compress(img, model=model, steps=3, seed=4, keep=(0.4, 0.6, 1.0), parts=(0.3,))
    n = img.size
    ends = [struct.unpack("<HI", s.params)[1] for s in container.unpack(res.data).sections]
    k1, k2 = (n * 102 + 127) // 255, (n * 153 + 127) // 255
    assert ends == [round(0.3 * k1), k1, round(0.3 * k2), k2, round(0.3 * n), n]
    meta = diffcodec.info(res.data)
    cuts = [s["offset"] + s["bytes"] for s in meta["sections"]]
    shown = dict(diffcodec.decode_steps(res.data, model=model, methods=("denoise",), parts=True))
    for j, end in enumerate(cuts, 1):
        assert np.array_equal(diffcodec.decompress(res.data[:end], model=model), shown[j]["denoise"])


def test_kept_steps_decode_the_same_under_1_and_2_threads(model):
    img = synthetic_image(24, 32, seed=8)
    res = diffcodec.compress(img, model=model, steps=3, keep=0.3)
    outs = under_threads(lambda: [v["denoise"] for _, v in diffcodec.decode_steps(res.data, model=model)])
    assert all(np.array_equal(a, b) for a, b in zip(*outs))
    assert diffcodec.compress(img, model=model, steps=3, keep=0.3).data == res.data


def test_bad_keep_is_refused(model):
    img = synthetic_image(16, 16)
    T = model.num_steps
    for bad in (0.0, 1.5, -0.2, (0.5,) * T, (0.5, 0.0) + (1.0,) * (T - 3)):
        with pytest.raises(DiffcodecError, match="keep"):
            diffcodec.compress(img, model=model, steps=2, keep=bad)
    diffc = make_tiny("diffc")
    diffc.model_id, diffc.model_hash = "tiny-diffc", "0123456789abcdef"
    with pytest.raises(DiffcodecError, match="uqdm"):
        diffcodec.compress(img, model=diffc, steps=2, keep=0.5)


def test_keep_text_is_parsed_once_for_every_command():
    """--keep, train --keep-chain and scripts/val_bpd.py --keep share one parser (api.parse_keep)."""
    from diffcodec.api import parse_keep

    assert parse_keep("default") is None and parse_keep("0.3") == 0.3 and parse_keep("0.1,0.3,0.8") == [0.1, 0.3, 0.8]
    for bad in ("x", "0.1,,0.3", ""):
        with pytest.raises(ValueError):
            parse_keep(bad)


def test_malformed_keep_headers_are_refused():
    assert UQDM.parse_header_params(bytes([4, 3, 128, 128, 255]))["keep"] == (128, 128, 255)
    assert UQDM.parse_header_params(bytes([4, 1]))["keep"] is None
    for bad in (bytes([4, 2, 128, 128]), bytes([4, 2, 128, 128, 255, 1]), bytes([4, 2, 0, 128, 255]),
                bytes([4, 6, 128, 128, 255])):
        with pytest.raises(FormatError):
            UQDM.parse_header_params(bad)


def test_cli_keep(tmp_path, model, capsys):
    path = tmp_path / "tiny.safetensors"
    from diffcodec.models import save_model

    save_model(model, path)
    img = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(synthetic_image(16, 24, seed=5)).save(img)
    out = tmp_path / "out.dfc"
    assert main(["compress", str(img), "-o", str(out), "--model", str(path), "--lossless", "--keep", "0.5"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "coordinates each step codes" in capsys.readouterr().out
    assert main(["decompress", str(out), "-o", str(tmp_path / "out.png"), "--model", str(path)]) == 0
    assert np.array_equal(np.array(Image.open(tmp_path / "out.png")), np.array(Image.open(img).convert("RGB")))
    for arg, shares in (("0.2,0.4,1", (51, 102, 255)), ("1", None)):  # one share per step; every coordinate
        assert main(["compress", str(img), "-o", str(out), "--model", str(path), "--keep", arg, "--force"]) == 0
        assert diffcodec.info(out.read_bytes())["keep"] == shares
    with pytest.raises(SystemExit):
        main(["compress", str(img), "-o", str(out), "--model", str(path), "--keep", "half", "--force"])


def test_eval_measures_kept_files_under_their_own_curve(model, monkeypatch):
    """diffcodec eval: the default files (the model's kept shares) as MODEL-METHOD, --keep F as
    MODEL+keepF-METHOD, --keep 1 (every coordinate, the format before) as MODEL-METHOD under the cache key
    of the records made before kept coordinates; each kind of file has its own cache key."""
    from diffcodec import evaluate

    monkeypatch.setattr(evaluate, "_load_model", lambda name, codec: model)
    default = evaluate.make_adapter("uqdm", "tiny")
    kept = evaluate.make_adapter("uqdm", "tiny", keep=0.3)
    every = evaluate.make_adapter("uqdm", "tiny", keep=1)
    assert kept.curves() == [f"{model.model_id}+keep0.3-denoise"]
    assert default.curves() == every.curves() == [f"{model.model_id}-denoise"]
    shares = diffcodec.api._keep_shares(model, None)
    assert shares == tuple(round(255 * f) for f in model.default_keep())
    assert default.config == every.config + f":keep={','.join(map(str, shares))}/255:mean-view"
    assert kept.config == every.config + ":keep=0.3:mean-view"
    assert every.config.endswith(":box-prior")  # the key of the records made before kept coordinates
    assert "coding 10% / 20% / 80% of their coordinates" in default.curve_description(default.curves()[0])
    with pytest.raises(ValueError, match="keep"):
        evaluate.make_adapter("uqdm", "tiny", keep=1.5)


def test_kept_chain_loss_is_the_kept_files_code_length(model):
    """forward(keep=...) (train --keep-chain): each step's share of the code length (one-hot step weights)
    is the bits a real kept file's step section costs (its coded coordinates only, the context seeing no
    uncoded neighbour), and the kept steps cost less than the same steps coding every coordinate; with
    uncoded_weight 1 (--keep-chain-uncoded 1) the uncoded coordinates' posterior samples count too."""
    import torch

    T = model.num_steps
    img = synthetic_image(16, 16, seed=3)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].to(next(model.net.parameters()).dtype) * (2 / 256) + (1 / 256 - 1)
    xb = x.repeat(64, 1, 1, 1)
    keep = model.check_keep([128] * (T - 1))
    with torch.no_grad():
        def shares(**kw):
            out = []
            for k in range(T):
                torch.manual_seed(1)
                out.append(float(model(xb, all_steps=True, step_weights=torch.eye(T)[k], **kw)["loss"].mean()) / T)
            return out
        kept, whole = shares(keep=keep), shares()
        # W = 1: every coordinate's posterior sample given the kept chain
        full = shares(keep=keep, uncoded_weight=1.0)
        torch.manual_seed(1)
        assert abs(sum(kept) - float(model(xb, all_steps=True, keep=keep)["bpd"].mean())) < 1e-4 * sum(kept)
    files = [diffcodec.compress(img, model=model, lossless=True, seed=s, keep=[128 / 255] * (T - 1)).sections
             for s in range(8)]
    bits = [np.mean([f[k]["ideal_bits"] for f in files]) / x.numel() for k in range(T + 1)]
    for k in range(T - 1):
        assert abs(kept[k] - bits[k]) < 0.2 * bits[k] + 0.05, (k, kept, bits)
        assert kept[k] < whole[k] and kept[k] < full[k]
    # the first step starts from z_T in both chains, with the same noise: with W = 1 it costs what the plain
    # chain's first step does (but for the context, which sees only the coded first-pass coordinates)
    if not model.context:
        assert full[0] == pytest.approx(whole[0], rel=1e-5)
    with pytest.raises(ValueError):
        model(x, keep=(255,) * T)  # one share per step but the last
