"""Evaluation harness: quality metrics, classical baselines, Bjontegaard deltas, result JSON and plots.

Everything runs on small synthetic images (64x48) so the whole file takes a few seconds.
"""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffcodec import baselines as bl
from diffcodec.baselines import BASELINES, find_quality, get_baseline, select_baselines
from diffcodec.evaluate import (
    bd_psnr,
    bd_rate,
    compare_curves,
    evaluate_baselines,
    evaluate_curve,
    load_benchmark_images,
    load_heldout_images,
    load_images,
    load_results,
    msssim_db,
    plot_rd,
    psnr_rate_table,
    save_results,
    swd_at_rate,
    swd_rate_table,
)
from diffcodec.metrics import ms_ssim, msssim_scales, psnr, sliced_wasserstein

H, W = 48, 64


def photo_like(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Smooth shading, a few hard-edged shapes and mild texture: compresses like a (tiny) photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.05, 0.25), rng.uniform(0.05, 0.25), rng.uniform(0, 6.28)
        img[..., c] = 120 + 60 * np.sin(fx * xx + ph) * np.cos(fy * yy) + 30 * (xx / w - 0.5)
    for _ in range(4):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y0 : y0 + rng.integers(4, 16), x0 : x0 + rng.integers(4, 16)] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 3, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def blur(img: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def noisy(img: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, img.shape)
    return np.clip(np.round(img + noise), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def img() -> np.ndarray:
    return photo_like()


@pytest.fixture(scope="module")
def image_set() -> list[np.ndarray]:
    return [photo_like(seed=s) for s in range(3)]


# ------------------------------------------------------------------------------------------ MS-SSIM


def test_msssim_identical_is_one_and_decreases_with_noise(img):
    assert ms_ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    values = [ms_ssim(img, noisy(img, s)) for s in (2, 8, 25)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_msssim_scale_rule():
    assert msssim_scales(512, 768) == 5  # full Kodak: the standard 5 scales
    assert msssim_scales(128, 192) == 4  # kodak-small
    assert msssim_scales(48, 64) == 3
    assert msssim_scales(11, 40) == 1
    with pytest.raises(ValueError):
        msssim_scales(10, 64)
    with pytest.raises(ValueError):
        ms_ssim(photo_like(), photo_like(), scales=4)  # 48 px cannot hold 4 scales


def test_msssim_single_scale_is_gaussian_ssim(img):
    """One scale is plain SSIM with the 11/1.5 Gaussian window: check against an independent formula."""
    other = noisy(img, 10)
    x, y = img[..., 0].astype(np.float64), other[..., 0].astype(np.float64)
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / 4.5)
    g /= g.sum()
    win = np.outer(g, g)

    def filt(a: np.ndarray) -> np.ndarray:
        out = np.empty((a.shape[0] - 10, a.shape[1] - 10))
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[i, j] = np.sum(win * a[i : i + 11, j : j + 11])
        return out

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ref = np.mean((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2)))
    assert ms_ssim(img[..., :1], other[..., :1], scales=1) == pytest.approx(ref, rel=1e-10)


# ------------------------------------------------------------------------------------------ SWD


def test_swd_self_is_zero_and_blur_increases_it(image_set):
    same = sliced_wasserstein(image_set, image_set)
    assert same.mean == 0.0 and all(v == 0.0 for v in same.per_level)
    assert same.resolutions == (48, 24)  # levels down to 16 px on the short side
    light = sliced_wasserstein(image_set, [blur(im, 0.8) for im in image_set])
    heavy = sliced_wasserstein(image_set, [blur(im, 2.0) for im in image_set])
    assert heavy.mean > light.mean > 1.0
    assert light.per_level[0] > 0 and len(heavy.per_level) == 2


def test_swd_grows_with_noise(image_set):
    """More added noise = a larger distance.  Identical sets score exactly 0 when paired; unpaired, only the
    patch sampling differs (a floor that a few tiny images make large), still well below heavy noise."""
    swds = [sliced_wasserstein(image_set, [noisy(im, s) for im in image_set]).mean for s in (2, 8, 25)]
    assert 0.0 < swds[0] < swds[1] < swds[2], swds
    floor = sliced_wasserstein(image_set, image_set, paired=False).mean
    assert floor < 0.6 * sliced_wasserstein(image_set, [noisy(im, 25) for im in image_set], paired=False).mean


def test_swd_is_seeded(image_set):
    rec = [noisy(im, 6) for im in image_set]
    a = sliced_wasserstein(image_set, rec, seed=3)
    assert a == sliced_wasserstein(image_set, rec, seed=3)
    assert a != sliced_wasserstein(image_set, rec, seed=4)
    with pytest.raises(ValueError):
        sliced_wasserstein(image_set, image_set[:2])


# ------------------------------------------------------------------------------------------ Bjontegaard

RATES = [0.15, 0.3, 0.55, 0.9, 1.4]
PSNRS = [26.0, 28.4, 30.6, 32.5, 34.1]


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_bd_rate_identity_and_constant_factor(method):
    assert bd_rate(RATES, PSNRS, RATES, PSNRS, method=method) == pytest.approx(0.0, abs=1e-9)
    assert bd_rate(RATES, PSNRS, [0.9 * r for r in RATES], PSNRS, method=method) == pytest.approx(-10.0, abs=1e-6)
    assert bd_rate(RATES, PSNRS, [1.25 * r for r in RATES], PSNRS, method=method) == pytest.approx(25.0, abs=1e-6)
    assert bd_psnr(RATES, PSNRS, RATES, [p + 0.7 for p in PSNRS], method=method) == pytest.approx(0.7, abs=1e-9)


def test_bd_pchip_matches_scipy_when_available():
    interpolate = pytest.importorskip("scipy.interpolate")
    from diffcodec.evaluate import _integral

    x, y = np.array([1.0, 2.0, 4.0, 4.5, 7.0]), np.array([0.0, 3.0, 2.0, 5.0, 5.1])
    assert _integral(x, y, 1.5, 6.5, "pchip") == pytest.approx(interpolate.PchipInterpolator(x, y).integrate(1.5, 6.5))


def test_bd_edge_cases():
    with pytest.warns(UserWarning, match="overlap"):
        assert math.isnan(bd_rate(RATES, PSNRS, RATES, [p + 20 for p in PSNRS]))
    with pytest.raises(ValueError):
        bd_rate([0.1], [30.0], RATES, PSNRS)
    # non-finite points (a lossless PSNR) are dropped, not propagated
    assert bd_rate(RATES + [9.0], PSNRS + [None], RATES, PSNRS) == pytest.approx(0.0, abs=1e-9)
    assert msssim_db(0.99) == pytest.approx(20.0) and msssim_db(None) is None


def _curve(name, bpp, swd, quality=None):
    return {"name": name, "results": {"bpp": bpp, "swd": swd, "quality": quality or list(range(len(bpp)))}}


def test_swd_at_rate_interpolates_in_log_bpp_and_never_extrapolates():
    anchor = _curve("jpeg", [0.1, 0.4, 1.6], [80.0, 40.0, 20.0])
    test = _curve("codec", [0.05, 0.2, 0.4, 0.8], [90.0, 50.0, 45.0, 10.0], quality=[16, 8, 4, 2])
    pts = swd_at_rate(anchor, test, max_bpp=0.5)
    assert [p["quality"] for p in pts] == [16, 8, 4]  # 0.8 bpp is above max_bpp
    assert pts[0]["anchor_swd"] is None and pts[0]["delta"] is None  # below the anchor's lowest rate
    assert pts[1]["anchor_swd"] == pytest.approx(60.0)  # 0.2 is half-way from 0.1 to 0.4 in log bpp
    assert pts[1]["delta"] == pytest.approx(-10.0)
    assert pts[2]["anchor_swd"] == pytest.approx(40.0) and pts[2]["delta"] == pytest.approx(5.0)
    assert len(swd_at_rate(anchor, test, max_bpp=None)) == 4
    assert swd_at_rate(_curve("x", [0.1, 0.2], [1.0, 2.0]) | {"results": {"bpp": [0.1]}}, test) == []


def test_swd_rate_table_marks_and_counts_wins():
    anchors = [_curve("jpeg", [0.1, 0.4], [80.0, 40.0]), _curve("avif", [0.1, 0.4], [55.0, 35.0])]
    test = _curve("codec", [0.2, 0.3], [58.0, 30.0])
    rows, text = swd_rate_table([test], anchors)
    assert [r["bpp"] for r in rows] == [0.2, 0.3]
    assert rows[0]["swd-jpeg"] == pytest.approx(60.0) and rows[0]["swd-avif"] == pytest.approx(45.0)
    assert "lower (*) at: jpeg 2/2, avif 1/2" in text
    assert "58.0" in text and "60.0*" in text and "45.0 " in text


def test_psnr_rate_table_compares_every_rate_and_marks_the_higher():
    anchor = {"name": "jpeg", "results": {"bpp": [0.1, 0.4, 1.6], "psnr-rgb": [20.0, 26.0, 32.0]}}
    test = {"name": "codec", "results": {"bpp": [0.2, 0.8, 3.2], "psnr-rgb": [24.0, 28.0, 40.0],
                                         "quality": [1, 2, 3]}}
    rows, text = psnr_rate_table([test], [anchor])
    assert [r["psnr-rgb-jpeg"] for r in rows] == [pytest.approx(23.0), pytest.approx(29.0), None]
    assert "23.00*" in text and "29.00 " in text and "higher (*) at: jpeg 1/2" in text


# ------------------------------------------------------------------------------------------ baselines


def file_signature_ok(name: str, data: bytes) -> bool:
    """The bytes are a complete file of the codec's format (container/header included), not a bare payload."""
    if name == "jpeg":
        return data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    if name == "jpeg2000":
        return data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n"
    if name == "webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    if name == "jpegxl":
        return data[:2] == b"\xff\x0a" or data[4:8] == b"JXL "  # bare codestream or ISOBMFF container
    if name in ("avif", "heic"):
        return data[4:8] == b"ftyp" and data[8:12] in ((b"avif", b"avis") if name == "avif" else (b"heic", b"mif1"))
    raise AssertionError(name)



@pytest.mark.parametrize("name", list(bl._FACTORIES))
def test_baseline_roundtrip_whole_file(name, img):
    if name not in BASELINES:
        pytest.skip(f"{name} unavailable: {bl.UNAVAILABLE[name]}")
    codec = BASELINES[name]
    grid = codec.qualities
    qualities = [grid[0], grid[len(grid) // 2], grid[-1]]
    result = evaluate_curve([img], codec, qualities, name=name, swd=False)
    psnrs = result["results"]["psnr-rgb"]
    assert all(p is not None for p in psnrs)
    assert psnrs[0] < psnrs[1] < psnrs[2], psnrs
    data, dec = codec(img, qualities[1])
    assert dec.shape == img.shape and dec.dtype == np.uint8
    assert file_signature_ok(name, data), data[:16]
    assert np.array_equal(codec.decode(data), dec)  # the bytes alone decode: nothing kept on the side
    with pytest.raises(ValueError, match="outside"):
        codec(img, codec.quality_range[1] + 1)
    assert result["results"]["bpp"][1] == pytest.approx(8.0 * len(data) / (H * W))


def test_webp_is_really_lossy(img):
    codec = get_baseline("webp")
    data, dec = codec(img, 5)
    assert 20.0 < psnr(img, dec) < 40.0
    import imagecodecs

    lossless = imagecodecs.webp_encode(img, level=5)  # the trap: without lossless=False this is lossless
    assert np.array_equal(imagecodecs.webp_decode(lossless), img)
    assert len(data) < len(lossless) / 2


@pytest.mark.parametrize("name", ["jpeg", "jpeg2000", "jpegxl"])
def test_find_quality_hits_target(name, img):
    if name not in BASELINES:
        pytest.skip(f"{name} unavailable")
    codec = BASELINES[name]
    if codec.integer_quality:  # an achievable rate: the search must land on it
        target = 8.0 * len(codec(img, 40)[0]) / (H * W)
        tol = 0.01
    else:
        target, tol = 1.0, 0.05  # continuous parameter; OpenJPEG's dB target moves in small steps
    found = find_quality(codec, img, target)
    assert found.rel_error <= tol, found
    assert found.bpp == pytest.approx(8.0 * len(codec(img, found.quality)[0]) / (H * W))
    assert found.evaluations <= 32
    low = find_quality(codec, img, 1e-4)  # unreachable: clamps to the lowest quality
    assert low.quality == codec.quality_range[0]


def test_unavailable_codec_is_skipped(monkeypatch, img):
    monkeypatch.setitem(bl.UNAVAILABLE, "heic", "pillow-heif is not installed (simulated)")
    monkeypatch.delitem(bl.BASELINES, "heic", raising=False)
    chosen, skipped = select_baselines(["jpeg", "bpg"])
    assert list(chosen) == ["jpeg"] and "simulated" in skipped["heic"]
    with pytest.raises(KeyError, match="unavailable"):
        get_baseline("heic")
    with pytest.raises(KeyError, match="unknown"):
        select_baselines(["nosuchcodec"])
    with pytest.warns(UserWarning, match="skipping baseline heic"):
        out = evaluate_baselines([img], ["jpeg", "heic"], {"jpeg": [30, 70]}, swd=False)
    assert list(out) == ["jpeg"] and len(out["jpeg"]["results"]["bpp"]) == 2


# ------------------------------------------------------------------------------------------ curves, JSON, plots


def png_quantiser(img: np.ndarray, step: int) -> tuple[bytes, np.ndarray]:
    """A toy codec for the callable protocol: uniform quantisation, stored as a PNG file."""
    q = (img.astype(np.int32) // step) * step + step // 2
    q = np.clip(q, 0, 255).astype(np.uint8) if step > 1 else img
    bio = io.BytesIO()
    Image.fromarray(q).save(bio, format="PNG")
    data = bio.getvalue()
    return data, np.asarray(Image.open(io.BytesIO(data)))


def test_evaluate_curve_json_and_plot(image_set, tmp_path):
    res = evaluate_curve(image_set, png_quantiser, [1, 8, 32], name="png-q", description="toy")
    r = res["results"]
    assert set(res) == {"name", "description", "results"} and res["name"] == "png-q"
    for key in ("bpp", "psnr-rgb", "ms-ssim-rgb", "swd", "quality"):
        assert len(r[key]) == 3
    assert r["quality"] == [1, 8, 32]
    assert r["psnr-rgb"][0] is None  # lossless: inf is stored as null, keeping the JSON strict
    assert r["ms-ssim-rgb"][0] == pytest.approx(1.0) and r["swd"][0] == 0.0
    assert r["bpp"][0] > r["bpp"][1] > r["bpp"][2]
    assert r["psnr-rgb"][1] > r["psnr-rgb"][2] and r["swd"][2] > r["swd"][1] > 0
    expected = np.mean([8.0 * len(png_quantiser(im, 8)[0]) / im.shape[0] / im.shape[1] for im in image_set])
    assert r["bpp"][1] == pytest.approx(expected)

    path = save_results(res, tmp_path / "png-q.json")
    json.loads(path.read_text())  # strict JSON
    back = load_results(path)
    assert back["results"]["bpp"] == r["bpp"]

    jpeg = evaluate_baselines(image_set, ["jpeg"], swd=False)["jpeg"]
    cmp = compare_curves(jpeg, jpeg)
    assert cmp["bd-rate-psnr"] == pytest.approx(0.0, abs=1e-9) and cmp["bd-psnr"] == pytest.approx(0.0, abs=1e-9)
    for metric in ("psnr-rgb", "ms-ssim-db"):
        out = plot_rd([jpeg, res], metric, tmp_path / f"{metric}.png", title="t")
        assert out.read_bytes().startswith(b"\x89PNG")


def test_evaluate_curve_rejects_bad_outputs(img):
    with pytest.raises(TypeError, match="uint8"):
        evaluate_curve([img], lambda x, s: (b"x", x.astype(np.float32)), [0], swd=False)
    with pytest.raises(ValueError, match="shape"):
        evaluate_curve([img], lambda x, s: (b"x", x[:-1]), [0], swd=False)
    with pytest.raises(TypeError, match="bytes"):
        evaluate_curve([img], lambda x, s: (len(x), x), [0], swd=False)


def test_load_images_downscales(tmp_path):
    for name, (w, h) in {"b": (40, 24), "a": (24, 40)}.items():
        Image.fromarray(photo_like(h, w)).save(tmp_path / f"{name}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imgs = load_images(tmp_path, scale=4)
    assert list(imgs) == ["a", "b"]
    assert imgs["a"].shape == (10, 6, 3) and imgs["b"].shape == (6, 10, 3) and imgs["a"].dtype == np.uint8
    assert list(load_images(tmp_path, limit=1)) == ["a"]


def test_load_heldout_images_takes_the_trainers_held_out_photos(tmp_path):
    """Benchmarks choose between models on exactly the photos training never saw (data.split_files), even
    when a name has glob characters."""
    from diffcodec.data import list_images, split_files

    for i in range(45):
        Image.fromarray(photo_like(16, 24)).save(tmp_path / f"p[{i:02d}].png")
    held = [f.stem for f in split_files(list_images(tmp_path))[1]]
    imgs = load_heldout_images(tmp_path, scale=2)
    assert list(imgs) == held and len(held) == 2
    assert all(v.shape == (8, 12, 3) for v in imgs.values())
    assert list(load_heldout_images(tmp_path, limit=1)) == held[:1]
    assert [n for n, _ in load_benchmark_images(tmp_path / "kodak", tmp_path, scale=2)] == held


def test_rvgc_cache_key_covers_the_decoder_defaults(monkeypatch):
    """A model re-exported with other decoder defaults (same weights and hash) must not reuse cached points."""
    from diffcodec import evaluate

    a = evaluate.QSweepAdapter(model="rvgc-small8")
    m = evaluate._load_model("rvgc-small8", "rvgc")
    monkeypatch.setattr(m, "sampler_max_q", 4.0)
    monkeypatch.setattr(evaluate, "_load_model", lambda *_: m)
    b = evaluate.QSweepAdapter(model="rvgc-small8")
    assert a.model_hash == b.model_hash and a.config != b.config
