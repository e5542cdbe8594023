"""UQDM step parts: a step written as several sections, cut points between the steps."""

import struct

import numpy as np
import pytest
import torch

import diffcodec
from conftest import make_tiny, make_tiny_uqdm_variant, synthetic_image
from diffcodec import container
from diffcodec.cli import main
from diffcodec.codecs.base import Section
from diffcodec.errors import DecodeError, DiffcodecError
from diffcodec.schedule import pixel_to_unit

PARTS = (0.05, 0.2, 0.35)


@pytest.fixture(scope="module", params=["context", "plain"])
def model(request):
    return make_tiny_uqdm_variant(request.param, f"tiny-parts-{request.param}")


def test_parts_keep_the_chain_and_the_lossless_finish(model):
    img = synthetic_image(24, 32, seed=1)
    whole = diffcodec.compress(img, model=model, lossless=True, seed=2, keep=1)  # parts of every coordinate
    parted = diffcodec.compress(img, model=model, lossless=True, seed=2, parts=PARTS, keep=1)
    T = model.num_steps
    kinds = [s["kind"] for s in parted.sections]
    assert kinds == ["part"] * 3 + ["step"] + ["part"] * 3 + ["step"] + ["part"] * 3 + ["step"] + ["step", "lossless"]
    assert [s["step"] for s in parted.sections] == [1] * 4 + [2] * 4 + [3] * 4 + [4, None]
    assert parted.steps == T and np.array_equal(diffcodec.decompress(parted.data, model=model), img)
    for k in range(1, T + 1):  # complete steps: the same latents, so the same reconstructions
        for method in ("denoise", "flow"):
            assert np.array_equal(diffcodec.decompress(parted.data, model=model, steps=k, method=method),
                                  diffcodec.decompress(whole.data, model=model, steps=k, method=method))
    ends = [struct.unpack("<HI", s.params)[1] for s in container.unpack(parted.data).sections[:4]]
    n = img.size  # 24 x 32 x 3 coordinates per step
    assert ends == [round(0.05 * n), round(0.2 * n), round(0.35 * n), n]


def test_every_cut_decodes_to_its_prefix(model):
    """A file cut after any section decodes to what decode_steps(parts=True) shows for it; a part adds to
    the step before it; decode_steps without parts still yields the complete steps."""
    img = synthetic_image(24, 32, seed=3)
    res = diffcodec.compress(img, model=model, steps=3, seed=4, parts=PARTS)
    meta = diffcodec.info(res.data)
    ends = [s["offset"] + s["bytes"] for s in meta["sections"]]
    shown = dict(diffcodec.decode_steps(res.data, model=model, methods=("denoise", "flow"), parts=True))
    assert sorted(shown) == list(range(1, len(ends) + 1))
    for n, end in enumerate(ends, 1):
        cut = res.data[:end]
        assert diffcodec.info(cut)["sections_in_file"] == n
        for method in ("denoise", "flow"):
            assert np.array_equal(diffcodec.decompress(cut, model=model, method=method), shown[n][method])
    steps = dict(diffcodec.decode_steps(res.data, model=model))
    assert sorted(steps) == [1, 2, 3]
    for k, n in zip((1, 2, 3), (4, 8, 12)):
        assert np.array_equal(steps[k]["denoise"], shown[n]["denoise"])
    with pytest.raises(DiffcodecError, match="complete step"):
        diffcodec.decompress(res.data[:ends[5]], model=model, steps=3)


def test_the_last_step_is_not_divided(model):
    img = synthetic_image(16, 16, seed=5)
    res = diffcodec.compress(img, model=model, steps=model.num_steps, parts=(0.5,))
    assert [s["kind"] for s in res.sections] == ["part", "step"] * (model.num_steps - 1) + ["step"]


def test_bpp_target_with_parts_takes_the_longest_prefix_that_fits(model):
    img = synthetic_image(24, 32, seed=6)
    full = diffcodec.compress(img, model=model, steps=model.num_steps - 1, parts=diffcodec.api.DEFAULT_PARTS)
    ends = [s["offset"] + s["bytes"] for s in diffcodec.info(full.data)["sections"]]
    px = 24 * 32
    assert len(ends) == 2 * (model.num_steps - 1)  # DEFAULT_PARTS: one cut per step
    for n in (1, 3, 5):  # budgets just above a part's end: the file ends exactly there
        bpp = 8.0 * (ends[n - 1] + 1) / px
        res = diffcodec.compress(img, model=model, bpp=bpp, parts=diffcodec.api.DEFAULT_PARTS)
        assert res.bpp <= bpp and len(res.sections) == n
        start = container.unpack(full.data).offsets[0]  # the sections, after the header
        assert res.data[container.unpack(res.data).offsets[0]:] == full.data[start:ends[n - 1]]
    with pytest.raises(DiffcodecError, match="cannot reach"):
        diffcodec.compress(img, model=model, bpp=8.0 * ends[0] / px * 0.5, parts=diffcodec.api.DEFAULT_PARTS)


def test_bad_parts_are_refused(model, tmp_path):
    img = synthetic_image(16, 16)
    for bad in ((0.5, 0.2), (0.0, 0.5), (1.0,), "a,b", (0.3, 0.3)):
        with pytest.raises(DiffcodecError, match="parts"):
            diffcodec.compress(img, model=model, steps=2, parts=bad)
    diffc = make_tiny("diffc")
    diffc.model_id, diffc.model_hash = "tiny-diffc", "0123456789abcdef"
    with pytest.raises(DiffcodecError, match="uqdm"):
        diffcodec.compress(img, model=diffc, steps=2, parts=PARTS)


def test_corrupt_or_foreign_parts_are_refused(model):
    img = synthetic_image(16, 16, seed=7)
    res = diffcodec.compress(img, model=model, steps=2, parts=PARTS)
    cont = container.unpack(res.data)
    secs = list(cont.sections)

    def repack(sections) -> bytes:
        return container.pack(cont.header, sections)

    bad_end = Section(secs[1].kind, 2, struct.pack("<HI", struct.unpack("<HI", secs[1].params)[0], 1),
                      secs[1].payload, secs[1].symbols_crc)  # ends before the part before it
    with pytest.raises(DecodeError):
        diffcodec.decompress(repack([secs[0], bad_end]), model=model)
    with pytest.raises(DecodeError):  # a part that claims to end the step is a step, not a part
        p = secs[0]
        n = 16 * 16 * 3
        diffcodec.decompress(repack([Section(p.kind, 1, struct.pack("<HI", 1, n), p.payload, p.symbols_crc)]),
                             model=model)
    with pytest.raises(DecodeError):  # a whole step where the rest of a divided one belongs
        whole = container.unpack(diffcodec.compress(img, model=model, steps=1).data).sections[0]
        diffcodec.decompress(repack([secs[0], whole]), model=model)
    diffc = make_tiny("diffc")
    diffc.model_id, diffc.model_hash = model.model_id, model.model_hash
    hd = container.Header("diffc", model.model_id, model.model_hash, 16, 16, 3, 0, params=diffc.header_params())
    with pytest.raises(DecodeError, match="no step parts"):
        diffcodec.decompress(container.pack(hd, [secs[0]]), model=diffc)


def test_parts_decode_the_same_under_1_and_2_threads(model):
    img = synthetic_image(24, 32, seed=8)
    res = diffcodec.compress(img, model=model, steps=2, parts=PARTS)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append([v["denoise"] for _, v in diffcodec.decode_steps(res.data, model=model, parts=True)])
    torch.set_num_threads(1)
    assert all(np.array_equal(a, b) for a, b in zip(*outs))


def test_cli_parts(tmp_path, model):
    from diffcodec.models import save_model

    save_model(model, tmp_path / "m.safetensors")
    from PIL import Image

    Image.fromarray(synthetic_image(24, 32, seed=9)).save(tmp_path / "a.png")
    assert main(["compress", str(tmp_path / "a.png"), "-o", str(tmp_path / "a.dfc"), "--model",
                 str(tmp_path / "m.safetensors"), "--steps", "2", "--parts", "0.1,0.5", "-q"]) == 0
    kinds = [s["kind"] for s in diffcodec.info((tmp_path / "a.dfc").read_bytes())["sections"]]
    assert kinds == ["part", "part", "step"] * 2
    assert main(["compress", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.dfc"), "--model",
                 str(tmp_path / "m.safetensors"), "--steps", "2", "--parts", "0.5,0.1", "-q"]) == 1


def test_eval_measures_every_section(tmp_path, model):
    """diffcodec eval --parts: a point after every section of the steps asked for, each what the file cut
    there decodes to, in curves and a cache config of their own."""
    from diffcodec.evaluate import ProgressiveAdapter
    from diffcodec.models import save_model

    path = tmp_path / f"{model.model_id}.safetensors"
    save_model(model, path)
    img = synthetic_image(24, 32, seed=10)
    ad = ProgressiveAdapter("uqdm", str(path), ("denoise", "flow"), steps=[2, 4], parts=PARTS)
    whole = ProgressiveAdapter("uqdm", str(path), ("denoise", "flow"), steps=[2, 4])
    assert ad.curves() == [f"{model.model_id}+parts-denoise", f"{model.model_id}+parts-flow"]
    assert ad.config.startswith(whole.config) and ad.config != whole.config
    (group, pts), = ad.groups()
    assert sorted({k for _, k in pts}) == [5, 6, 7, 8, 13]  # step 2's four sections, step 4's one
    points = ad.run(img, group, pts)
    ref = diffcodec.compress(img, model=str(path), steps=4, parts=PARTS).data
    ends = [s["offset"] + s["bytes"] for s in diffcodec.info(ref)["sections"]]
    assert len(points) == len(pts)
    for p in points:
        method = p.curve.rsplit("-", 1)[1]
        assert p.file_bytes == ends[p.setting - 1]
        assert np.array_equal(p.decoded, diffcodec.decompress(ref[:ends[p.setting - 1]], model=str(path),
                                                              method=method))


def test_a_part_keeps_the_previous_steps_box(model):
    """After a part, a coordinate the step has not sent keeps the box of the complete step before it, a sent
    one lies in both boxes (their intersection); the image is inside every part's box."""
    img = synthetic_image(24, 32, seed=9)
    res = diffcodec.compress(img, model=model, steps=3, seed=5, parts=PARTS, keep=1)  # parts of every coordinate
    x = pixel_to_unit(img.transpose(2, 0, 1).astype(np.float64))[None]
    states = list(model.iter_latents(x.shape, 5, container.unpack(res.data).sections))
    assert [s.part for s in states] == ([True] * 3 + [False]) * 3
    for k in (1, 2):  # the parts of steps 2 and 3, after the complete step k
        prev = states[4 * k - 1].box
        lo_prev, hi_prev = prev.center - prev.half_width, prev.center + prev.half_width
        widths = []
        for st in states[4 * k: 4 * k + 3]:
            b = st.box
            mx = b.basis.forward(x)
            assert np.all(np.abs(mx - b.center) <= b.half_width * (1 + 1e-9) + 1e-12)
            assert np.all(b.center - b.half_width >= lo_prev - 1e-12)
            assert np.all(b.center + b.half_width <= hi_prev + 1e-12)
            narrower = b.half_width < prev.half_width * (1 - 1e-9)
            widths.append(int(narrower.sum()))
        n = x.size  # the part ends at 5%, 20%, 35% of the coordinates: those have the step's narrower box
        assert widths == [round(f * n) for f in PARTS]
