"""Rate-distortion evaluation: whole-file bpp, PSNR / MS-SSIM / SWD, Bjontegaard deltas, JSON and plots.

Any codec plugs in as a callable ``(img, setting) -> (file_bytes, decoded)`` (see :func:`evaluate_curve`):
the classical baselines of :mod:`diffcodec.baselines` are such callables, and a diffusion codec becomes one
with a few lines::

    def uqdm(img, steps):
        data = diffcodec.compress(img, model=model, steps=steps).data
        return data, diffcodec.decompress(data, model=model)

    result = evaluate_curve(images, uqdm, [1, 2, 3, 4], name="uqdm-small")

The rate is always ``8 * len(file_bytes) / (H * W)``: the complete file, headers included, so learned
and classical codecs pay for the same things.

Results use CompressAI's evaluation JSON schema, so its plotting tools (and ours) read them::

    {"name": "jpeg", "description": "...",
     "results": {"bpp": [...], "psnr-rgb": [...], "ms-ssim-rgb": [...], "swd": [...], "quality": [...], ...}}

One entry per setting; bpp, PSNR and MS-SSIM are means of per-image values (as CompressAI does), SWD is
computed on the whole image set at that setting (it is a distribution distance; per-image SWD would be
meaningless with 128 patches).  Non-finite values (PSNR of a lossless point) are stored as ``null``.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .baselines import find_quality, select_baselines
from .errors import DiffcodecError
from .metrics import fid, lpips_distance, ms_ssim, msssim_scales, psnr, sliced_wasserstein, swd_resolutions

__all__ = [
    "BaselineAdapter",
    "CodecAdapter",
    "EncodeDecodeFn",
    "Point",
    "ProgressiveAdapter",
    "QSweepAdapter",
    "RateAdapter",
    "RecordCache",
    "bd_psnr",
    "bd_rate",
    "bd_table",
    "compare_curves",
    "evaluate_baselines",
    "evaluate_curve",
    "format_curve",
    "load_images",
    "load_results",
    "make_adapter",
    "msssim_db",
    "plot_rd",
    "run_eval",
    "save_results",
    "metric_at_rate",
    "psnr_rate_table",
    "rate_table",
    "swd_at_rate",
    "swd_levels_table",
    "swd_rate_table",
]

EncodeDecodeFn = Callable[[np.ndarray, Any], tuple[bytes, np.ndarray]]
Images = Sequence[np.ndarray] | Mapping[str, np.ndarray]

# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def load_images(folder: str | Path, scale: int = 1, limit: int | None = None,
                pattern: str | None = "*.png") -> dict[str, np.ndarray]:
    """Load the images of ``folder`` (sorted by name) as uint8 RGB, optionally downscaled by ``scale``.

    Downscaling uses Pillow's LANCZOS resize, which widens its kernel by the reduction factor and so
    antialiases (768x512 -> 192x128 for scale 4: "kodak-small" of DESIGN.md section 5).  Sizes are floored
    to whole pixels.  ``pattern=None`` takes every file with a common image suffix (:data:`IMAGE_SUFFIXES`).
    Returns ``{stem: image}`` so results can name their images.
    """
    if scale < 1:
        raise ValueError("scale must be >= 1")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if pattern is None:
        files = sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = sorted(Path(folder).glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern or 'image'} files in {folder}")
    if len({f.stem for f in files}) != len(files):
        raise ValueError(f"{folder}: several images share a name stem (results are keyed by it)")
    out: dict[str, np.ndarray] = {}
    for f in files[:limit]:
        with Image.open(f) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            if scale > 1:
                im = im.resize((max(1, im.width // scale), max(1, im.height // scale)), Image.LANCZOS)
            out[f.stem] = np.asarray(im).copy()
    return out


def load_heldout_images(train_dir: str | Path, scale: int = 1, limit: int | None = None) -> dict[str, np.ndarray]:
    """The photos the trainer holds out of ``train_dir`` (:func:`diffcodec.data.split_files`: every 20th),
    loaded as :func:`load_images` loads a folder: what benchmarks choose between models on, never Kodak."""
    from .data import list_images, split_files  # torch-free at import time for evaluate's other users

    out: dict[str, np.ndarray] = {}
    for f in split_files(list_images(train_dir))[1][:limit]:
        out.update(load_images(f.parent, scale=scale, pattern=glob.escape(f.name)))
    return out


def load_benchmark_images(kodak_dir: str | Path, heldout_dir: str | Path | None = None, scale: int = 4,
                          limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """The images a benchmark runs on: Kodak's ``kodim*.png`` or, given ``heldout_dir`` (a training folder),
    the photos the trainer holds out of it (:func:`load_heldout_images`), as (name, image) pairs."""
    if heldout_dir:
        return list(load_heldout_images(heldout_dir, scale=scale, limit=limit).items())
    return list(load_images(kodak_dir, scale=scale, limit=limit, pattern="kodim*.png").items())


def _as_list(images: Images) -> list[np.ndarray]:
    imgs = list(images.values()) if isinstance(images, Mapping) else list(images)
    if not imgs:
        raise ValueError("no images to evaluate")
    return [np.asarray(im) for im in imgs]


# --------------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Settings are stored verbatim when JSON can hold them, else as their repr (a setting can be any object)."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _check_decoded(decoded: Any, img: np.ndarray, name: str) -> np.ndarray:
    """Refuse float or mis-shaped reconstructions: silently rounding or broadcasting would corrupt metrics."""
    dec = np.asarray(decoded)
    if dec.shape != img.shape:
        raise ValueError(f"{name}: decoded shape {dec.shape} != input shape {img.shape}")
    if dec.dtype != np.uint8:
        raise TypeError(f"{name}: decoded dtype {dec.dtype}, expected uint8 (quantise before returning)")
    return dec


def evaluate_curve(
    images: Images,
    encode_decode_fn: EncodeDecodeFn,
    settings: Iterable[Any],
    *,
    name: str = "codec",
    description: str = "",
    swd: bool = True,
    swd_options: Mapping[str, Any] | None = None,
    lpips: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Rate-distortion points of one codec: run ``encode_decode_fn(img, setting)`` on every image per setting.

    ``encode_decode_fn`` must return the complete file (``bytes``-like; its length is the rate) and the
    decoder's uint8 output of the same shape as ``img``.  Per setting the result holds the mean whole-file
    bpp, mean PSNR (RGB, 0-255), mean MS-SSIM (scale count per :func:`diffcodec.metrics.msssim_scales`;
    ``null`` for images under 11 px), the set's SWD (mean over pyramid levels, x1e3, seeded: equal options
    give comparable numbers across codecs) with per-level values, LPIPS when requested and available, and
    the mean wall time of one ``encode_decode_fn`` call ("coding_time": encode + decode, seconds).
    """
    imgs = _as_list(images)
    swd_opts = dict(swd_options or {})
    keys = ["bpp", "psnr-rgb", "ms-ssim-rgb", "swd", "swd-per-level", "coding_time", "quality"]
    res: dict[str, list[Any]] = {k: [] for k in keys}
    if lpips:
        res["lpips"] = []
    swd_levels: tuple[int, ...] = ()
    for setting in settings:
        bpps, psnrs, msssims, lpipss, times, recs = [], [], [], [], [], []
        for img in imgs:
            h, w = img.shape[:2]
            t0 = time.perf_counter()
            data, decoded = encode_decode_fn(img, setting)
            times.append(time.perf_counter() - t0)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"{name}: encode_decode_fn must return the file as bytes, got {type(data).__name__}")
            dec = _check_decoded(decoded, img, name)
            bpps.append(8.0 * len(data) / (h * w))
            psnrs.append(psnr(img, dec))
            msssims.append(ms_ssim(img, dec) if min(h, w) >= 11 else math.nan)
            if lpips:
                v = lpips_distance(img, dec)
                lpipss.append(math.nan if v is None else v)
            recs.append(dec)
        res["bpp"].append(float(np.mean(bpps)))
        res["psnr-rgb"].append(_finite_or_none(float(np.mean(psnrs))))
        res["ms-ssim-rgb"].append(_finite_or_none(float(np.mean(msssims))))
        if swd:
            r = sliced_wasserstein(imgs, recs, **swd_opts)
            swd_levels = r.resolutions
            res["swd"].append(r.mean)
            res["swd-per-level"].append(list(r.per_level))
        else:
            res["swd"].append(None)
            res["swd-per-level"].append(None)
        if lpips:
            res["lpips"].append(_finite_or_none(float(np.mean(lpipss))))
        res["coding_time"].append(float(np.mean(times)))
        res["quality"].append(_jsonable(setting))
        if log is not None:
            p, m = res["psnr-rgb"][-1], res["ms-ssim-rgb"][-1]
            log(f"{name} q={setting}: bpp {res['bpp'][-1]:.4f}  psnr {p if p is None else round(p, 3)}  "
                f"ms-ssim {m if m is None else round(m, 5)}  swd {res['swd'][-1]}")
    sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in imgs})
    scales = sorted({msssim_scales(*im.shape[:2]) for im in imgs if min(im.shape[:2]) >= 11})
    meta = (f"{len(imgs)} images ({', '.join(sizes)}); bpp = 8*whole-file bytes/pixels; PSNR RGB 0-255 "
            f"(mean of per-image); MS-SSIM {'/'.join(map(str, scales))} scale(s); SWD x1e3 Karras 2018 "
            f"Laplacian levels {list(swd_levels)} {json.dumps(swd_opts) if swd_opts else '(default options)'}")
    return {"name": name, "description": f"{description}. {meta}" if description else meta, "results": res}


def evaluate_baselines(
    images: Images,
    codecs: Iterable[str] | None = None,
    qualities: Mapping[str, Sequence[float]] | None = None,
    *,
    target_bpps: Sequence[float] | None = None,
    swd: bool = True,
    swd_options: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """CompressAI-style results for each classical codec (see :mod:`diffcodec.baselines`), keyed by name.

    Settings per codec, in order of precedence: ``target_bpps`` (one quality per target, found by bisection
    on the mean bpp of ``images``, so every codec is sampled at the same rates), ``qualities[name]``, the
    codec's default grid.  Unavailable codecs are skipped with a warning naming the reason.
    """
    imgs = _as_list(images)
    chosen, skipped = select_baselines(codecs)
    for name, reason in skipped.items():
        warnings.warn(f"skipping baseline {name}: {reason}", stacklevel=2)
    out: dict[str, dict[str, Any]] = {}
    for name, baseline in chosen.items():
        if target_bpps is not None:
            grid: list[float] = [find_quality(baseline, imgs, t).quality for t in target_bpps]
        elif qualities is not None and name in qualities:
            grid = [float(q) for q in qualities[name]]
        else:
            grid = list(baseline.qualities)
        out[name] = evaluate_curve(imgs, baseline, grid, name=name, description=baseline.description, swd=swd,
                                   swd_options=swd_options, log=log)
    return out


def save_results(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write one result as strict JSON (no NaN/Infinity tokens, which CompressAI's loader would reject)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a CompressAI-style result JSON, checking the fields this module relies on."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "results" not in data or "bpp" not in data["results"]:
        raise ValueError(f"{path}: not a CompressAI-style result (needs results.bpp)")
    data.setdefault("name", Path(path).stem)
    data.setdefault("description", "")
    return data


# --------------------------------------------------------------------------------------------------
# Bjontegaard deltas
# --------------------------------------------------------------------------------------------------


def msssim_db(x: float | None) -> float | None:
    """MS-SSIM on a dB scale, -10 log10(1 - MS-SSIM): how CompressAI plots it and what BD on MS-SSIM uses
    (raw MS-SSIM saturates near 1, which squashes the high-rate end of a fit)."""
    if x is None or not math.isfinite(x):
        return None
    return math.inf if x >= 1.0 else -10.0 * math.log10(1.0 - x)


def _clean_points(x: Sequence[float | None], y: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """Finite (x, y) pairs sorted by x, duplicates in x averaged (interpolation needs strictly increasing x)."""
    pts = [(float(a), float(b)) for a, b in zip(x, y)
           if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pts) < 2:
        raise ValueError(f"need at least 2 finite RD points, got {len(pts)}")
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    ux = np.unique(xs)
    uy = np.array([ys[xs == v].mean() for v in ux])
    if ux.size < 2:
        raise ValueError("RD points must span at least 2 distinct values")
    return ux, uy


def _pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson monotone slopes with the non-centred three-point end rule (as scipy's PchipInterpolator)."""
    h = np.diff(x)
    d = np.diff(y) / h
    n = x.size
    if n == 2:
        return np.array([d[0], d[0]])
    m = np.zeros(n)
    for k in range(1, n - 1):
        if d[k - 1] * d[k] > 0:
            w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
            m[k] = (w1 + w2) / (w1 / d[k - 1] + w2 / d[k])

    def edge(h0: float, h1: float, d0: float, d1: float) -> float:
        s = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        if np.sign(s) != np.sign(d0):
            return 0.0
        if np.sign(d0) != np.sign(d1) and abs(s) > 3 * abs(d0):
            return 3 * d0
        return s

    m[0] = edge(h[0], h[1], d[0], d[1])
    m[-1] = edge(h[-1], h[-2], d[-1], d[-2])
    return m


def _integral(x: np.ndarray, y: np.ndarray, lo: float, hi: float, method: str) -> float:
    """Exact integral over [lo, hi] of the curve through (x, y): a cubic polynomial fit or a PCHIP."""
    if method == "cubic":
        p = np.polyint(np.polyfit(x, y, min(3, x.size - 1)))
        return float(np.polyval(p, hi) - np.polyval(p, lo))
    if method != "pchip":
        raise ValueError(f"method must be 'pchip' or 'cubic', got {method!r}")
    m = _pchip_slopes(x, y)
    total = 0.0
    for k in range(x.size - 1):
        a, b = max(lo, x[k]), min(hi, x[k + 1])
        if b <= a:
            continue
        hk = x[k + 1] - x[k]
        dk = (y[k + 1] - y[k]) / hk
        c2 = (3 * dk - 2 * m[k] - m[k + 1]) / hk
        c3 = (m[k] + m[k + 1] - 2 * dk) / hk**2

        def antiderivative(s: float, k: int = k, c2: float = c2, c3: float = c3) -> float:
            return y[k] * s + m[k] * s**2 / 2 + c2 * s**3 / 3 + c3 * s**4 / 4

        total += antiderivative(b - x[k]) - antiderivative(a - x[k])
    return total


def _bd(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, yb: np.ndarray, method: str) -> float:
    lo, hi = max(xa.min(), xb.min()), min(xa.max(), xb.max())
    if hi <= lo:
        warnings.warn("RD curves do not overlap: Bjontegaard delta undefined (nan)", stacklevel=3)
        return math.nan
    return float((_integral(xb, yb, lo, hi, method) - _integral(xa, ya, lo, hi, method)) / (hi - lo))


def bd_rate(rate_a: Sequence[float], dist_a: Sequence[float | None], rate_b: Sequence[float],
            dist_b: Sequence[float | None], *, method: str = "pchip") -> float:
    """Bjontegaard delta rate (VCEG-M33) of curve B against anchor A, in percent (negative = B saves bits).

    log(rate) is modelled as a function of quality (PSNR, or MS-SSIM in dB) for each curve, integrated over
    the quality interval both curves cover, and the mean log-rate difference is turned into a percentage:
    ``100 * (exp(mean(ln R_b - ln R_a)) - 1)``.  ``method="cubic"`` is the original least-squares cubic
    polynomial (degree ``min(3, n-1)``); ``"pchip"`` (default) interpolates with a monotone piecewise-cubic
    Hermite spline, the variant adopted by JVET/VCEG (VCEG-AL22) because the polynomial can oscillate with
    unevenly spaced points.  Both are exact for curves that differ by a constant rate factor.  Non-finite
    points are dropped; nan (with a warning) when the quality ranges do not overlap.
    """
    xa, ya = _clean_points(dist_a, [math.log(r) if r and r > 0 else None for r in rate_a])
    xb, yb = _clean_points(dist_b, [math.log(r) if r and r > 0 else None for r in rate_b])
    d = _bd(xa, ya, xb, yb, method)
    return d if math.isnan(d) else 100.0 * (math.exp(d) - 1.0)


def bd_psnr(rate_a: Sequence[float], dist_a: Sequence[float | None], rate_b: Sequence[float],
            dist_b: Sequence[float | None], *, method: str = "pchip") -> float:
    """Bjontegaard delta quality of B against anchor A (dB for PSNR; positive = B better at equal rate).

    Quality is modelled as a function of log(rate) and the mean difference over the common log-rate interval
    is returned; fitting as in :func:`bd_rate`."""
    xa, ya = _clean_points([math.log(r) if r and r > 0 else None for r in rate_a], dist_a)
    xb, yb = _clean_points([math.log(r) if r and r > 0 else None for r in rate_b], dist_b)
    return _bd(xa, ya, xb, yb, method)


def _metric_values(result: Mapping[str, Any], metric: str) -> list[float | None]:
    res = result["results"]
    if metric == "ms-ssim-db":
        return [msssim_db(v) for v in res.get("ms-ssim-rgb", [])]
    if metric not in res:
        raise KeyError(f"{result.get('name')}: no '{metric}' in results")
    return list(res[metric])


def compare_curves(anchor: Mapping[str, Any], test: Mapping[str, Any], *,
                   method: str = "pchip") -> dict[str, float]:
    """BD-rate on PSNR, BD-PSNR and BD-rate on MS-SSIM (dB) of ``test`` against ``anchor`` result JSONs.

    A metric that cannot be computed (missing, fewer than two points, no overlap) is nan, so one odd curve
    does not abort a whole table."""
    out: dict[str, float] = {}
    jobs = {"bd-rate-psnr": (bd_rate, "psnr-rgb"), "bd-psnr": (bd_psnr, "psnr-rgb"),
            "bd-rate-ms-ssim": (bd_rate, "ms-ssim-db")}
    for key, (fn, metric) in jobs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[key] = fn(anchor["results"]["bpp"], _metric_values(anchor, metric),
                              test["results"]["bpp"], _metric_values(test, metric), method=method)
        except (KeyError, ValueError):
            out[key] = math.nan
    return out


def metric_at_rate(anchor: Mapping[str, Any], test: Mapping[str, Any], metric: str, *,
                   max_bpp: float | None = None) -> list[dict[str, Any]]:
    """``metric`` of ``anchor`` at each of ``test``'s rates: two codecs compared at equal bpp, point by point.

    For every ``test`` point with ``bpp <= max_bpp`` the anchor's value is interpolated linearly in log(bpp)
    between its two neighbouring points; a test point outside the anchor's measured rate range gets ``None``
    (no extrapolation: a claim needs a measured bracket).  Returns one dict per test point: ``bpp``,
    ``quality``, ``<metric>``, ``anchor_<metric>``, ``delta`` (test minus anchor)."""
    res_t, res_a = test["results"], anchor["results"]
    if metric not in res_t or metric not in res_a:
        return []
    try:
        xa, ya = _clean_points([math.log(r) if r and r > 0 else None for r in res_a["bpp"]], list(res_a[metric]))
    except ValueError:
        return []
    quality = list(res_t.get("quality") or [None] * len(res_t["bpp"]))
    out = []
    for b, s, q in sorted(zip(res_t["bpp"], res_t[metric], quality), key=lambda t: t[0]):
        if b is None or s is None or b <= 0 or (max_bpp is not None and b > max_bpp):
            continue
        lb = math.log(b)
        ref = float(np.interp(lb, xa, ya)) if xa[0] <= lb <= xa[-1] else None
        out.append({"bpp": float(b), "quality": q, metric: float(s), f"anchor_{metric}": ref,
                    "delta": None if ref is None else float(s) - ref})
    return out


def swd_at_rate(anchor: Mapping[str, Any], test: Mapping[str, Any], *, max_bpp: float | None = 0.5
                ) -> list[dict[str, Any]]:
    """SWD of ``anchor`` at each of ``test``'s rates (:func:`metric_at_rate`; ``delta`` negative = the test curve
    is more realistic at that rate).

    Realism goals are stated as "lower SWD than codec X at equal bpp", and SWD is not a quality that a
    Bjontegaard fit handles well (it is not monotone in rate for a generative decoder, and a sampler can
    trade PSNR for SWD): hence point-by-point comparisons, by default below 0.5 bpp."""
    return metric_at_rate(anchor, test, "swd", max_bpp=max_bpp)


def _quality_str(q: Any) -> str:
    """A point's setting as a table cell: numbers in %g, anything else as text, None empty."""
    return "" if q is None else f"{q:g}" if isinstance(q, (int, float)) else str(q)


def rate_table(tests: Sequence[Mapping[str, Any]], anchors: Sequence[Mapping[str, Any]], metric: str, *,
               title: str, column: str, digits: int, higher_better: bool, max_bpp: float | None = None
               ) -> tuple[list[dict[str, Any]], str]:
    """:func:`metric_at_rate` of every test curve against every anchor, as rows and as a text table.

    Each test point (below ``max_bpp``) is a row with its own value and each anchor's at the same bpp (``-``
    where the anchor has no points on both sides, ``*`` where the curve is better); a last line per curve
    counts, for each anchor, the points at which the curve is better among those the anchor brackets."""
    rows: list[dict[str, Any]] = []
    limit = "" if max_bpp is None else f" up to {max_bpp:g} bpp"
    lines = [f"{title} of each curve's points{limit} and of each anchor at the same bpp (linear in log bpp between "
             "the anchor's points; - = outside its measured range)"]
    cols = [str(a["name"]) for a in anchors]
    cw = [max(8, len(c)) for c in cols]
    better = (lambda v, ref: v > ref) if higher_better else (lambda v, ref: v < ref)
    for t in tests:
        per_anchor = {str(a["name"]): metric_at_rate(a, t, metric, max_bpp=max_bpp) for a in anchors}
        pts = next((v for v in per_anchor.values() if v), [])
        if not pts:
            continue
        lines += ["", f"{t['name']}",
                  f"  {'quality':>9} {'bpp':>8} {column:>7}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, cw))]
        wins = dict.fromkeys(cols, 0)
        bracketed = dict.fromkeys(cols, 0)
        for i, p in enumerate(pts):
            refs = {c: per_anchor[c][i][f"anchor_{metric}"] if per_anchor[c] else None for c in cols}
            rows.append({"curve": t["name"], "quality": p["quality"], "bpp": p["bpp"], metric: p[metric],
                         **{f"{metric}-{c}": refs[c] for c in cols}})
            cells = ["-" if refs[c] is None else f"{refs[c]:.{digits}f}" + ("*" if better(p[metric], refs[c]) else " ")
                     for c in cols]
            lines.append(f"  {_quality_str(p['quality']):>9} {p['bpp']:8.4f} {p[metric]:7.{digits}f}  "
                         + "  ".join(f"{v:>{w}}" for v, w in zip(cells, cw)))
            for c in cols:
                if refs[c] is not None:
                    bracketed[c] += 1
                    wins[c] += better(p[metric], refs[c])
        lines.append(f"  {'higher' if higher_better else 'lower'} (*) at: "
                     + ", ".join(f"{c} {wins[c]}/{bracketed[c]}" for c in cols) + " of the points each anchor brackets")
    return rows, "\n".join(lines)


def swd_rate_table(tests: Sequence[Mapping[str, Any]], anchors: Sequence[Mapping[str, Any]], *,
                   max_bpp: float | None = 0.5) -> tuple[list[dict[str, Any]], str]:
    """SWD at equal bpp (:func:`rate_table`; ``*`` = lower, more realistic), by default below 0.5 bpp."""
    return rate_table(tests, anchors, "swd", title="SWD (x1e3, lower = more realistic)", column="SWD", digits=1,
                      higher_better=False, max_bpp=max_bpp)


def psnr_rate_table(tests: Sequence[Mapping[str, Any]], anchors: Sequence[Mapping[str, Any]]
                    ) -> tuple[list[dict[str, Any]], str]:
    """PSNR at equal bpp over every rate (:func:`rate_table`; ``*`` = higher): where a curve stands against an
    anchor point by point, which a BD-rate averages away."""
    return rate_table(tests, anchors, "psnr-rgb", title="PSNR (dB, higher = better)", column="PSNR", digits=2,
                      higher_better=True)


def swd_levels_table(curves: Sequence[Mapping[str, Any]], resolutions: Sequence[int]) -> str:
    """Each curve's SWD per Laplacian level at each of its points (finest level first).

    The mean SWD hides at which scale a codec loses realism.  Curves without SWD are left out."""
    heads = [f"L{r}" for r in resolutions]
    lines = ["SWD (x1e3) per Laplacian pyramid level, labelled by the level's smallest image side (finest first), "
             "and the mean over levels (the SWD of the other tables)"]
    for c in curves:
        res = c["results"]
        per = res.get("swd-per-level") or []
        pts = sorted(((b, q, m, lv) for b, q, m, lv in zip(res["bpp"], res["quality"], res["swd"], per)
                      if b is not None and lv is not None), key=lambda t: t[0])
        if not pts:
            continue
        lines += ["", str(c["name"]), f"  {'quality':>9} {'bpp':>8} " + " ".join(f"{h:>6}" for h in heads)
                  + f" {'mean':>6}"]
        for b, q, m, lv in pts:
            qs = _quality_str(q)
            lines.append(f"  {qs:>9} {b:8.4f} " + " ".join(f"{v:6.1f}" for v in lv) + f" {m:6.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------

_LABELS = {"psnr-rgb": "PSNR RGB [dB]", "ms-ssim-rgb": "MS-SSIM (RGB)", "ms-ssim-db": "MS-SSIM [dB] = -10 log10(1-x)",
           "swd": "SWD x1e3 (lower is better)", "lpips": "LPIPS (lower is better)"}


def plot_rd(results: Sequence[Mapping[str, Any]], metric: str, out_png: str | Path, *, title: str | None = None,
            max_bpp: float | None = None) -> Path:
    """One RD plot: linear bpp axis, one line with markers per result, points ordered by rate.

    ``metric`` is any results key (``psnr-rgb``, ``ms-ssim-rgb``, ``swd``, ...) or the derived
    ``ms-ssim-db``.  ``max_bpp`` leaves out points above that rate (a progressive file's last steps can
    cost 10x the rates of interest and would squash the rest).  Uses the Agg canvas directly (no pyplot
    global state), so it is safe to call from scripts, tests and threads regardless of the configured
    matplotlib backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>pP*Xh"
    plotted = 0
    for i, r in enumerate(results):
        try:
            ys = _metric_values(r, metric)
        except KeyError:
            continue
        pts = sorted((b, y) for b, y in zip(r["results"]["bpp"], ys)
                     if b is not None and y is not None and math.isfinite(b) and math.isfinite(y)
                     and (max_bpp is None or b <= max_bpp))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], markersize=4,
                linewidth=1.3, label=str(r.get("name", f"curve {i}")))
        plotted += 1
    if plotted == 0:
        raise ValueError(f"no result has finite '{metric}' values to plot")
    ax.set_xlabel("bits per pixel (whole file)")
    ax.set_ylabel(_LABELS.get(metric, metric))
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


# --------------------------------------------------------------------------------------------------
# One-command evaluation (``diffcodec eval``): codec adapters, a resumable record cache, worker processes
# --------------------------------------------------------------------------------------------------
#
# A codec enters the evaluation through a small *adapter* that turns one image into RD points:
#
# * :class:`ProgressiveAdapter` (uqdm, diffc): encode ONE file with every step, then every prefix of it is a
#   point: point k is the file cut after step section k (header + sections 1..k, its size read from
#   ``api.info``), reconstructed by ``api.decode_steps`` with each method;
# * :class:`RateAdapter` (uqdm, diffc with ``--bpp``): one file per image and bpp target, by the encoder's rate
#   control;
# * :class:`QSweepAdapter` (rvgc): one file per image and quantisation step q, swept over the model's q range;
# * :class:`BaselineAdapter`: one classical codec (:mod:`diffcodec.baselines`) swept over its quality grid.
#
# :func:`run_eval` runs the adapters' jobs (one job = one image x one encoded file), stores every point's
# per-image record in ``OUT/cache/records.jsonl`` (and its reconstruction as a PNG, which the set-level SWD
# needs), skips points already recorded when rerun, and rebuilds every output from the records: one
# CompressAI-style JSON per curve, ``per_image.csv``, the BD-rate table ``bd.txt`` and RD plots.  Every
# quantity except the wall times is deterministic, so the results do not depend on the worker count.


@dataclass
class Point:
    """One RD point of one image, as an adapter produces it: the whole-file size and the reconstruction."""

    curve: str
    setting: Any
    file_bytes: int
    decoded: np.ndarray
    enc_s: float
    dec_s: float


Group = tuple[Any, list[tuple[str, Any]]]  # (job setting, the (curve, setting) points that one job produces)


class CodecAdapter:
    """How one codec turns an image into RD points (see the section comment above).

    Adapters hold plain data only (they are pickled to worker processes) and load models lazily through
    the per-process model cache of :func:`diffcodec.api.get_model`.  ``config`` fingerprints everything
    that changes the points (model hash, options): records made under another config are recomputed.
    """

    family = "diffcodec"

    def curves(self) -> list[str]:
        raise NotImplementedError

    def curve_description(self, curve: str) -> str:
        raise NotImplementedError

    @property
    def config(self) -> str:
        raise NotImplementedError

    def groups(self) -> list[Group]:
        raise NotImplementedError

    def run(self, img: np.ndarray, group: Any, needed: Sequence[tuple[str, Any]]) -> list[Point]:
        """The points ``needed`` (a subset of the group's points) for ``img``."""
        raise NotImplementedError


class _CallTimer:
    """Times every call of ``obj.<name>()`` while active (an instance attribute shadows the method)."""

    def __init__(self, obj: Any, name: str, clock: Callable[[], float] = time.perf_counter):
        self.obj, self.name, self.times, self.clock = obj, name, [], clock

    def __enter__(self) -> _CallTimer:
        fn = getattr(self.obj, self.name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times.append(self.clock() - t0)

        setattr(self.obj, self.name, timed)
        return self

    def __exit__(self, *exc: Any) -> None:
        delattr(self.obj, self.name)

    def take(self) -> list[float]:
        out, self.times = self.times, []
        return out


class _StandaloneClock:
    """A clock that runs as if every network evaluation were computed afresh.

    ``decode_steps`` reuses the evaluation behind x_hat(z_k) for step k+1's prior
    (``DiffusionModel.reuse_evaluations``), but the decoding time reported for prefix k must be what
    decoding that prefix alone costs: every memo hit advances this clock by the time the reused
    evaluation took (the memo holds the last computed one).
    """

    def __init__(self, model: Any):
        self.model, self.extra = model, 0.0
        self.network = _CallTimer(model, "evaluate_network")  # durations of the computed evaluations

    def __enter__(self) -> _StandaloneClock:
        self.network.__enter__()
        evaluate, times = self.model.eval_f64, self.network.times

        def charged_evaluate(*args: Any, **kwargs: Any) -> Any:
            computed = len(times)
            out = evaluate(*args, **kwargs)
            if len(times) == computed and times:  # a memo hit: the last computed evaluation again
                self.extra += times[-1]
            return out

        self.model.eval_f64 = charged_evaluate
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.model.eval_f64
        self.network.__exit__(*exc)

    def __call__(self) -> float:
        return time.perf_counter() + self.extra


def _load_model(model: str | None, codec: str | None):
    from .api import get_model

    m = get_model(None if model is None else str(model), codec or "uqdm")
    if codec is not None and m.codec_id != codec:
        raise ValueError(f"model {m.model_id} is a {m.codec_id} model, not {codec}")
    return m


def _check_reconstruction(methods: Sequence[str], codec: str, nfe: int | None) -> None:
    """The reconstructions (and network evaluations) asked of a progressive codec's adapter, before any work."""
    from .diffusion import RECONSTRUCTION_METHODS

    bad = [x for x in methods if x not in RECONSTRUCTION_METHODS]
    if bad or not methods:
        raise ValueError(f"methods {bad or '(none)'} invalid for {codec}; choose from "
                         f"{', '.join(RECONSTRUCTION_METHODS)}")
    if nfe is not None and nfe < 1:
        raise ValueError("nfe must be >= 1")


class ProgressiveAdapter(CodecAdapter):
    """uqdm / diffc: one file per image with T steps (not lossless); point k = the file cut after step k.

    ``steps`` restricts which prefixes are reconstructed (default: every step 1..T).  Only the steps up
    to the largest one needed are encoded: a section never depends on later ones, so those prefixes are
    byte for byte the prefixes of the T-step file but for the header's section count (same size while
    T < 128; a test checks this).
    Times: encoding_time of point k is the time until section k was coded, decoding_time is the time to
    decode sections 1..k plus that method's reconstruction (both measured inside the one encode/decode).
    """

    def __init__(self, codec: str | None = None, model: str | None = None, methods: Sequence[str] = ("denoise",),
                 *, nfe: int | None = None, steps: Sequence[int] | None = None, seed: int = 0,
                 channel_aware: bool = True, parts: Sequence[float] | None = None, keep: float | None = None):
        from .api import _check_parts

        m = _load_model(model, codec)
        if m.codec_id not in ("uqdm", "diffc"):
            raise ValueError(f"{m.model_id} is a {m.codec_id} model, not a progressive one")
        # uqdm step parts: a point after every section of the steps measured (setting = the section count)
        self.parts = _check_parts(parts, m.codec_id) if parts else ()
        # uqdm kept coordinates: every step but the last two codes this fraction of its coordinates (1: all);
        # default: the model's default shares, as compress writes them
        self.keep, self.shares = None if keep is None else float(keep), None
        if keep is not None and m.codec_id != "uqdm":
            raise ValueError(f"keep applies to uqdm models, not {m.codec_id}")
        if m.codec_id == "uqdm":
            from .api import _keep_shares

            try:  # before any image is coded: the same check as compress's
                self.shares = _keep_shares(m, self.keep)
            except DiffcodecError as e:
                raise ValueError(str(e)) from None
        _check_reconstruction(methods, m.codec_id, nfe)
        self.codec, self.model, self.seed, self.nfe = m.codec_id, model, int(seed), nfe
        # diffc: reconstructions from the latent with the channel coder's shortfall undone; uqdm: from the
        # received latent, kept inside the box its last step puts x in (codecs/box.py)
        self.channel_aware = bool(channel_aware)
        self.methods = tuple(dict.fromkeys(methods))
        self.model_id, self.model_hash, self.num_steps = m.model_id, m.model_hash, int(m.num_steps)
        all_steps = range(1, self.num_steps + 1)
        self.steps = tuple(all_steps) if steps is None else tuple(k for k in sorted(set(steps)) if k in all_steps)
        if not self.steps:
            raise ValueError(f"none of steps {list(steps or [])} is in 1..{self.num_steps} for {self.model_id}")

    def curves(self) -> list[str]:
        kept = self.keep is not None and self.shares is not None  # a share given (not the default, not all)
        tag = (f"+keep{self.keep:g}" if kept else "") + ("+parts" if self.parts else "")
        return [f"{self.model_id}{tag}-{method}" for method in self.methods]

    def curve_description(self, curve: str) -> str:
        method = self.methods[self.curves().index(curve)]
        kept = "" if self.shares is None else \
            f" (steps 1-{len(self.shares)} coding {' / '.join(f'{v / 255:.0%}' for v in self.shares)} of their " \
            "coordinates, the rest drawn from their priors)"
        if self.parts:
            fr = ",".join(f"{f:g}" for f in self.parts)
            return (f"diffcodec {self.codec} model {self.model_id} ({self.model_hash}), {method} reconstruction, "
                    f"channel-aware={self.channel_aware}; one file per image{kept} with steps {self.steps[0]}-"
                    f"{self.steps[-1]} written in parts ending at {fr} of each step's coordinates (the last step "
                    f"whole), point n = that file cut after its n-th section; quality = n")
        nfe = "" if method == "denoise" else f" with nfe = {self.nfe or 'the remaining step count'}"
        if self.channel_aware and self.codec == "diffc":
            nfe += " from the channel-aware latent"
        elif self.channel_aware:
            nfe += (", the posterior mean inside the last step's box" if method == "denoise"
                    else ", projected onto the last step's box")
        else:
            nfe += " from the received latent as it is (--no-channel-aware)"
        return (f"diffcodec {self.codec} model {self.model_id} ({self.model_hash}), {method} reconstruction{nfe}; "
                f"one file per image with all {self.num_steps} steps{kept}, point k = that file cut after step section "
                f"k (header + sections 1..k); quality = k")

    @property
    def config(self) -> str:
        # records made before channel-aware reconstruction existed (diffc, then uqdm) were of the received
        # latent: same config as --no-channel-aware
        aware = ":channel-aware" if self.channel_aware else ""
        parts = f":parts={','.join(repr(f) for f in self.parts)}" if self.parts else ""
        if self.channel_aware and self.codec == "uqdm":
            # since 2026-12-07 each step's box lies within the boxes before it (StepBox.within), and a step
            # part's view keeps them for the coordinates it has not sent: records made before are of
            # another reconstruction
            aware += ":chained-boxes"
        if self.codec == "uqdm":
            # the uqdm format since 2026-12-07 codes each step under its prior restricted to the earlier
            # steps' box (the files are smaller): records made before are of the earlier format
            aware += ":box-prior"
        if self.shares is not None:  # kept coordinates (files coding every one have no key: the format before)
            aware += f":keep={self.keep!r}" if self.keep is not None else \
                f":keep={','.join(str(v) for v in self.shares)}/255"
            # since 2026-12-07 denoise reconstructs a complete kept step after the first from its prior mean, not
            # its draws (UQDM.part_view): records made before are of another reconstruction
            aware += ":mean-view" if self.channel_aware else ""
        return f"{self.codec}:{self.model_hash}:seed={self.seed}:nfe={self.nfe}{aware}{parts}"

    def _sections(self) -> list[int]:
        """With parts: the section counts measured, those of the steps asked for (each step but the last in
        len(parts) + 1 sections; fewer only for images too small to divide, whose missing points are skipped)."""
        per, T = len(self.parts) + 1, self.num_steps
        first = [1 + (k - 1) * per for k in range(1, T + 1)]
        return [n for k in self.steps for n in range(first[k - 1], first[k - 1] + (per if k < T else 1))]

    def groups(self) -> list[Group]:
        settings = self._sections() if self.parts else self.steps
        return [("all-steps", [(c, k) for c in self.curves() for k in settings])]

    def run(self, img: np.ndarray, group: Any, needed: Sequence[tuple[str, Any]]) -> list[Point]:
        from .api import compress, decode_steps, info

        m = _load_model(self.model, self.codec)
        if m.model_hash != self.model_hash:
            raise RuntimeError(f"model {self.model_id} changed during the evaluation")
        method_of = dict(zip(self.curves(), self.methods))
        need = set(needed)
        methods = tuple(method_of[c] for c in self.curves() if any(c == n[0] for n in need))
        want = {k for _, k in need}
        marks: list[float] = []
        t0 = time.perf_counter()
        per = len(self.parts) + 1
        top = max(want) if not self.parts else min(self.num_steps, (max(want) - 1) // per + 1)
        res = compress(img, model=m, codec=self.codec, steps=top, seed=self.seed, parts=self.parts or None,
                       keep=self.keep,
                       progress=lambda n: marks.append(time.perf_counter() - t0))
        t_enc = time.perf_counter() - t0
        secs = info(res.data)["sections"]
        if self.parts:  # sections, and the time until the step each belongs to was coded
            ends = {n: s["offset"] + s["bytes"] for n, s in enumerate(secs, 1)}
            marks = [marks[s["step"] - 1] if len(marks) >= s["step"] else t_enc for s in secs]
        else:
            ends = {s["step"]: s["offset"] + s["bytes"] for s in secs if s["kind"] == "step"}
        points: list[Point] = []
        latent = 0.0  # seconds spent decoding sections so far (reconstructions excluded)
        with _StandaloneClock(m) as clock, _CallTimer(m, "reconstruct", clock) as timer:
            t_prev = clock()
            for k, images in decode_steps(res.data, model=m, methods=methods, nfe=self.nfe, at=want,
                                             channel_aware=self.channel_aware, parts=bool(self.parts)):
                spent = clock() - t_prev
                recon = timer.take()
                if len(recon) != len(methods):  # not one reconstruct() per method: charge the whole interval
                    recon = [0.0] * len(methods)
                latent += spent - sum(recon)
                for method, dt in zip(methods, recon):
                    curve = self.curves()[self.methods.index(method)]
                    if (curve, k) in need:
                        points.append(Point(curve, k, ends[k], images[method],
                                            marks[k - 1] if len(marks) >= k else t_enc, latent + dt))
                if k >= max(want):
                    break
                t_prev = clock()
        return points


class QSweepAdapter(CodecAdapter):
    """rvgc: not progressive; one file per image and quantisation step q, ``num_q`` values log-spaced over the
    model's ``q_range`` (largest q = fewest bits first).  Methods: ``deterministic`` (plain synthesis of the
    decoded latent), ``sampler`` (the few-step stochastic sampler, ``sampler_steps`` evaluations, at every q)
    and ``default`` (what ``diffcodec decompress`` gives: the model's own choice per q, e.g. the plain
    synthesis above its ``sampler_max_q``).  Without ``methods``: all three, or the first two for a model
    whose default is the sampler at every q (``default`` would repeat the ``sampler`` curve)."""

    METHODS = ("deterministic", "sampler", "default")

    def __init__(self, codec: str = "rvgc", model: str | None = None, methods: Sequence[str] | None = None, *,
                 num_q: int = 6, qs: Sequence[float] | None = None, sampler_steps: int | None = None, seed: int = 0):
        if codec != "rvgc":
            raise ValueError(f"the q-sweep adapter is for rvgc, not {codec}")
        bad = [x for x in methods or () if x not in self.METHODS]
        if bad:
            raise ValueError(f"methods {bad} invalid for rvgc; choose from {', '.join(self.METHODS)}")
        m = _load_model(model, codec)
        if not methods:
            methods = self.METHODS if m.sampler_max_q is not None else self.METHODS[:2]
        methods = tuple(dict.fromkeys(methods))
        q_min, q_max = (float(v) for v in m.q_range)
        if qs is None:
            if num_q < 2:
                raise ValueError("num_q must be >= 2")
            qs = np.geomspace(q_max, q_min, num_q)
        self.qs = tuple(min(max(float(f"{q:.6g}"), q_min), q_max) for q in qs)
        self.codec, self.model, self.methods, self.seed = codec, model, methods, int(seed)
        self.sampler_steps = sampler_steps
        self.model_id, self.model_hash = m.model_id, m.model_hash
        # the decoder defaults are not in the hash (it covers the tensors): a model re-exported with other
        # defaults decodes the same files differently, so they are part of the cache key
        # (the size rule only when a model has one: the keys of models without it stay valid)
        self.decoder_defaults = f"{m.sampler_steps},{m.eta},{m.sampler_max_q}" + (
            f",{list(m.sampler_max_q_by_pixels)}" if m.sampler_max_q_by_pixels else "")

    def curves(self) -> list[str]:
        return [f"{self.model_id}-{method}" for method in self.methods]

    def curve_description(self, curve: str) -> str:
        method = self.methods[self.curves().index(curve)]
        extra = f" ({self.sampler_steps or 'default'} sampler steps)" if method == "sampler" else ""
        return (f"diffcodec rvgc model {self.model_id} ({self.model_hash}), {method} decoding{extra}; one file per "
                f"image and quantisation step q (log-spaced over the model's q range); quality = q")

    @property
    def config(self) -> str:
        return (f"rvgc:{self.model_hash}:seed={self.seed}:sampler_steps={self.sampler_steps}"
                f":defaults={self.decoder_defaults}")

    def groups(self) -> list[Group]:
        return [(q, [(c, q) for c in self.curves()]) for q in self.qs]

    def run(self, img: np.ndarray, group: Any, needed: Sequence[tuple[str, Any]]) -> list[Point]:
        from .api import compress, decompress

        m = _load_model(self.model, self.codec)
        t0 = time.perf_counter()
        data = compress(img, model=m, codec="rvgc", q=group, seed=self.seed).data
        t_enc = time.perf_counter() - t0
        wanted = set(needed)
        decoded: dict[str, tuple[np.ndarray, float]] = {}
        sampler_steps = self.sampler_steps if self.sampler_steps is not None else m.sampler_steps
        # the model's default decoder is one of the other two at each q: reuse that decode when it ran here
        default_steps = m.default_sampler_steps(group, img.shape[0] * img.shape[1])
        same_as = ("deterministic" if default_steps == 0 else "sampler" if sampler_steps == default_steps
                   else None)
        points = []
        for curve, method in sorted(zip(self.curves(), self.methods), key=lambda cm: cm[1] == "default"):
            if (curve, group) not in wanted:
                continue
            if method == "default" and same_as in decoded:
                dec, t_dec = decoded[same_as]
            else:
                kw: dict[str, Any] = {}
                if method == "deterministic":
                    kw["deterministic"] = True
                elif method == "sampler":  # the sampler at every q, also above a model's sampler_max_q
                    kw["sampler_steps"] = sampler_steps
                t0 = time.perf_counter()
                dec = decompress(data, model=m, **kw)
                t_dec = time.perf_counter() - t0
                decoded[method] = (dec, t_dec)
            points.append(Point(curve, group, len(data), dec, t_enc, t_dec))
        return points


class BaselineAdapter(CodecAdapter):
    """One classical codec of :mod:`diffcodec.baselines` over its quality grid (or ``qualities``)."""

    family = "baseline"

    def __init__(self, name: str, qualities: Sequence[float] | None = None):
        from .baselines import get_baseline

        b = get_baseline(name)
        self.name, self.description = b.name, b.description
        self.qualities = tuple(dict.fromkeys(float(q) for q in (qualities if qualities is not None else b.qualities)))
        lo, hi = b.quality_range
        bad = [q for q in self.qualities if not lo <= q <= hi]
        if bad or not self.qualities:
            raise ValueError(f"{self.name}: qualities {bad or '(none)'} outside {lo}..{hi}")

    def curves(self) -> list[str]:
        return [self.name]

    def curve_description(self, curve: str) -> str:
        return f"{self.description}; quality = the codec's quality parameter"

    @property
    def config(self) -> str:
        return f"baseline:{self.description}"

    def groups(self) -> list[Group]:
        return [(q, [(self.name, q)]) for q in self.qualities]

    def run(self, img: np.ndarray, group: Any, needed: Sequence[tuple[str, Any]]) -> list[Point]:
        from .baselines import get_baseline

        data, dec, t_enc, t_dec = get_baseline(self.name).timed(img, group)
        return [Point(self.name, group, len(data), dec, t_enc, t_dec)]


class RateAdapter(CodecAdapter):
    """uqdm / diffc: one file per image and bpp target, written by the encoder's rate control
    (``compress(bpp=...)``: for uqdm the file ends with one step coding the largest share of its coordinates
    that fits, README, *Rate control*); quality = the target.  The points are the files a user asking for
    those sizes gets, spread over the whole range: a progressive file's own steps lie far apart (13 dB between
    the default uqdm model's steps 2 and 3), and a BD-rate over them interpolates across the gaps."""

    def __init__(self, codec: str | None = None, model: str | None = None, methods: Sequence[str] = ("denoise",),
                 *, targets: Sequence[float], nfe: int | None = None, seed: int = 0, channel_aware: bool = True,
                 parts: Sequence[float] | None = None):
        from .api import _check_parts

        m = _load_model(model, codec)
        if m.codec_id not in PROGRESSIVE_CODECS:
            raise ValueError(f"{m.model_id} is a {m.codec_id} model: its rate is set by q (rvgc sweeps q)")
        # uqdm with parts: the longest prefix of a file written in them (compress --bpp X --parts P)
        self.parts = _check_parts(parts, m.codec_id) if parts else ()
        _check_reconstruction(methods, m.codec_id, nfe)
        self.targets = tuple(sorted({float(f"{float(t):.6g}") for t in targets}))
        if not self.targets or not all(t > 0 for t in self.targets):
            raise ValueError("bpp targets must be positive")
        self.codec, self.model, self.seed, self.nfe = m.codec_id, model, int(seed), nfe
        self.channel_aware, self.methods = bool(channel_aware), tuple(dict.fromkeys(methods))
        self.model_id, self.model_hash = m.model_id, m.model_hash

    def curves(self) -> list[str]:
        tag = "+bpp+parts" if self.parts else "+bpp"
        return [f"{self.model_id}{tag}-{method}" for method in self.methods]

    def curve_description(self, curve: str) -> str:
        method = self.methods[self.curves().index(curve)]
        nfe = "" if method == "denoise" else f" with nfe = {self.nfe or 'the remaining step count'}"
        rule = (f"the longest prefix of a file written in parts ending at {','.join(f'{f:g}' for f in self.parts)} "
                "of each step's coordinates (compress --bpp --parts)" if self.parts else
                "written by the encoder's rate control (compress --bpp)")
        return (f"diffcodec {self.codec} model {self.model_id} ({self.model_hash}), {method} reconstruction{nfe}, "
                f"channel-aware={self.channel_aware}; one file per image and bpp target, {rule}; quality = the target")

    @property
    def config(self) -> str:
        # RATE_CONTROL names the encoder's rate control: records of another one are of other files
        from .api import RATE_CONTROL

        aware = ":channel-aware" if self.channel_aware else ""
        rule = f"parts={','.join(repr(f) for f in self.parts)}" if self.parts else RATE_CONTROL[self.codec]
        return f"{self.codec}:{self.model_hash}:seed={self.seed}:nfe={self.nfe}{aware}:bpp:{rule}"

    def groups(self) -> list[Group]:
        return [(t, [(c, t) for c in self.curves()]) for t in self.targets]

    def run(self, img: np.ndarray, group: Any, needed: Sequence[tuple[str, Any]]) -> list[Point]:
        from .api import compress, decompress

        m = _load_model(self.model, self.codec)
        if m.model_hash != self.model_hash:
            raise RuntimeError(f"model {self.model_id} changed during the evaluation")
        t0 = time.perf_counter()
        data = compress(img, model=m, codec=self.codec, bpp=group, seed=self.seed, parts=self.parts or None).data
        t_enc = time.perf_counter() - t0
        points = []
        for curve, method in zip(self.curves(), self.methods):
            if (curve, group) in needed:
                t0 = time.perf_counter()
                dec = decompress(data, model=m, method=method, nfe=self.nfe, channel_aware=self.channel_aware)
                points.append(Point(curve, group, len(data), dec, t_enc, time.perf_counter() - t0))
        return points


PROGRESSIVE_CODECS = ("uqdm", "diffc")


def make_adapter(codec: str | None, model: str | None = None, methods: Sequence[str] | None = None, *,
                 nfe: int | None = None, steps: Sequence[int] | None = None, sampler_steps: int | None = None,
                 num_q: int = 6, seed: int = 0, channel_aware: bool = True,
                 parts: Sequence[float] | None = None, keep: float | None = None,
                 bpp: Sequence[float] | None = None) -> CodecAdapter:
    """The adapter of a diffcodec codec: progressive for uqdm/diffc (with ``bpp`` targets: one file per target,
    :class:`RateAdapter`), a q sweep for rvgc only.

    ``codec=None`` takes the codec of ``model``; ``methods=None`` the codec's default (denoise; rvgc both)."""
    if codec is None:
        codec = _load_model(model, None if model is not None else "uqdm").codec_id
    if bpp and codec in PROGRESSIVE_CODECS:
        if steps or keep is not None:
            raise ValueError("bpp targets: the encoder's rate control chooses the steps (no steps or keep)")
        return RateAdapter(codec, model, methods or ("denoise",), targets=bpp, nfe=nfe, seed=seed,
                           channel_aware=channel_aware, parts=parts if codec == "uqdm" else None)
    if codec in PROGRESSIVE_CODECS:
        return ProgressiveAdapter(codec, model, methods or ("denoise",), nfe=nfe, steps=steps, seed=seed,
                                  channel_aware=channel_aware, parts=parts if codec == "uqdm" else None,
                                  keep=keep if codec == "uqdm" else None)
    if codec == "rvgc":
        return QSweepAdapter(codec, model, methods, num_q=num_q, sampler_steps=sampler_steps, seed=seed)
    raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(PROGRESSIVE_CODECS)}, rvgc")


# ------------------------------------------------------------------------------------------ the record cache


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(name)) or "_"


def _short_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def image_sha(img: np.ndarray) -> str:
    """Fingerprint of an evaluation image (pixels and shape): a record is only reused for the same pixels."""
    a = np.ascontiguousarray(img)
    return hashlib.sha256(f"{a.shape}{a.dtype}".encode() + a.tobytes()).hexdigest()[:16]


class RecordCache:
    """Per-image point records of an evaluation folder: ``OUT/cache/records.jsonl`` (one JSON object per line,
    appended as points finish, so an interrupted run loses at most its running jobs) and each point's
    reconstruction as a PNG under ``OUT/cache/recon/`` (the set-level SWD/FID needs the images).

    A record is keyed by (image name, image fingerprint, curve, setting, adapter config).  Its ``psnr`` is
    ``null`` for an identical reconstruction (infinite PSNR); its ``ms-ssim`` is ``null`` for images under 11 px.
    """

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir) / "cache"
        self.path = self.root / "records.jsonl"
        self.records: dict[tuple[str, ...], dict[str, Any]] = {}
        if self.path.exists():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # cut mid-line: end it, so the next record starts a line
                with open(self.path, "a") as f:
                    f.write("\n")
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    self.records[self.key(r["image"], r["image_sha"], r["codec"], r["setting"], r["config"])] = r
                except (ValueError, KeyError, TypeError):  # a line cut by an interrupted run
                    warnings.warn(f"{self.path}:{n}: unreadable record ignored", stacklevel=2)

    @staticmethod
    def key(image: str, sha: str, curve: str, setting: Any, config: str) -> tuple[str, ...]:
        return (image, sha, curve, json.dumps(setting), config)

    def get(self, image: str, sha: str, curve: str, setting: Any, config: str, *,
            need_recon: bool = False) -> dict[str, Any] | None:
        r = self.records.get(self.key(image, sha, curve, setting, config))
        if r is not None and need_recon and not (r.get("recon") and (self.root / r["recon"]).is_file()):
            return None
        return r

    def recon_path(self, record: Mapping[str, Any]) -> str:
        setting = json.dumps(record["setting"])
        return (f"recon/{_safe(record['codec'])}-{_short_hash(record['config'])}/{_safe(setting)}/"
                f"{_safe(record['image'])}-{record['image_sha'][:8]}.png")

    def add(self, record: dict[str, Any], decoded: np.ndarray | None) -> None:
        """Store one record (and its reconstruction, written atomically before the record refers to it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        record = dict(record)
        if decoded is not None:
            rel = self.recon_path(record)
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            Image.fromarray(np.asarray(decoded).squeeze() if decoded.shape[-1] == 1 else decoded).save(
                tmp, format="PNG", compress_level=3)
            os.replace(tmp, path)
            record["recon"] = rel
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
        self.records[self.key(record["image"], record["image_sha"], record["codec"], record["setting"],
                              record["config"])] = record

    def drop_superseded(self, current: Mapping[str, str]) -> int:
        """Remove the records of the curves in ``current`` (curve -> adapter config) made under another
        config (a re-exported model, changed decoder defaults): they can never be reused, and a committed
        cache should not carry them.  Rewrites ``records.jsonl`` atomically; returns how many went."""
        stale = [k for k, r in self.records.items() if r["codec"] in current and r["config"] != current[r["codec"]]]
        if not stale:
            return 0
        for k in stale:
            del self.records[k]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            for r in self.records.values():
                f.write(json.dumps(r, allow_nan=False) + "\n")
        os.replace(tmp, self.path)
        return len(stale)

    def load_recon(self, record: Mapping[str, Any]) -> np.ndarray:
        with Image.open(self.root / record["recon"]) as im:
            a = np.asarray(im).copy()
        return a[..., None] if a.ndim == 2 else a


# ------------------------------------------------------------------------------------------ running jobs


def _point_record(name: str, img: np.ndarray, p: Point) -> dict[str, Any]:
    dec = _check_decoded(p.decoded, img, p.curve)
    h, w = img.shape[:2]
    rec: dict[str, Any] = {
        "image": name, "codec": p.curve, "setting": _jsonable(p.setting), "width": w, "height": h,
        "bytes": int(p.file_bytes), "bpp": 8.0 * p.file_bytes / (h * w),
        "psnr": _finite_or_none(psnr(img, dec)),
        "ms-ssim": _finite_or_none(ms_ssim(img, dec)) if min(h, w) >= 11 else None,
        "enc_s": float(p.enc_s), "dec_s": float(p.dec_s),
    }
    lp = lpips_distance(img, dec) if dec.ndim == 3 and dec.shape[2] == 3 else None
    if lp is not None:
        rec["lpips"] = lp
    return rec


def _run_job(payload: tuple) -> tuple[int, str, list[tuple[dict[str, Any], np.ndarray]]]:
    """One job in any process: (adapter index, image name, [(record, reconstruction), ...])."""
    index, adapter, group, name, img, needed = payload
    points = adapter.run(img, group, needed)
    got = {(p.curve, json.dumps(_jsonable(p.setting))) for p in points}
    missing = [n for n in needed if (n[0], json.dumps(_jsonable(n[1]))) not in got]
    if missing:
        raise RuntimeError(f"{type(adapter).__name__} produced no point for {missing} of image {name}")
    return index, name, [(_point_record(name, img, p), np.asarray(p.decoded)) for p in points]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _execute(payloads: list[tuple], workers: int, bar: Any):
    """Yield each job's result as it finishes, in-process (``workers <= 1``) or in spawned worker processes
    (one torch thread each)."""
    if not payloads:
        return
    if workers <= 1:
        import torch

        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for p in payloads:
                bar.set_postfix_str(f"{p[1].curves()[0]} {p[3]}", refresh=False)
                yield _run_job(p)
                bar.update()
        finally:
            torch.set_num_threads(prev)
        return
    import multiprocessing as mp

    # spawn (fresh interpreters: safe beside torch's thread pools) re-imports the parent's main script, which
    # is impossible when it has no file (python - < script, notebooks): fork there, as workers use 1 thread
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    spawnable = main_file is None or Path(main_file).is_file() or "fork" not in mp.get_all_start_methods()
    ctx = mp.get_context("spawn" if spawnable else "fork")
    saved = {v: os.environ.get(v) for v in _THREAD_VARS}
    os.environ.update({v: "1" for v in _THREAD_VARS})  # read by the children's BLAS/OpenMP at import
    try:
        pool = ctx.Pool(min(workers, len(payloads)), initializer=_init_worker)
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
    with pool:
        for result in pool.imap_unordered(_run_job, payloads):
            yield result
            bar.update()


# ------------------------------------------------------------------------------------------ aggregation


class _SetMetricCache:
    """Set-level metrics (SWD, FID) of finished settings, in ``OUT/cache/set_metrics.json``: rebuilding the
    outputs of a finished run does not recompute them."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            self.data = {}
        self.dirty = False

    def has(self, *keys: str) -> bool:
        return all(k in self.data for k in keys)

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.data:
            self.data[key] = compute()
            self.dirty = True
        return self.data[key]

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, allow_nan=False) + "\n")
            os.replace(tmp, self.path)
            self.dirty = False


def _set_metric_keys(curve: str, config: str, setting: Any, shas: Mapping[str, str],
                     swd_opts: Mapping[str, Any]) -> tuple[str, str]:
    """Keys of one setting's SWD and FID in :class:`_SetMetricCache`: the curve, its config, the setting and
    every image's fingerprint, so a metric is reused only for the very same set of records."""
    set_key = _short_hash(curve, config, setting, [(n, shas[n]) for n in shas])
    return f"swd:{set_key}:{_short_hash(swd_opts)}", f"fid:{set_key}"


def _needs_recon(sets: _SetMetricCache, swd_key: str, fid_key: str, *, swd: bool, fid: bool) -> bool:
    """Whether a setting's points need their reconstructions: they only feed its set-level metrics, so once
    those are cached the records alone are enough (a committed records.jsonl + set_metrics.json, without the
    PNGs, rebuild an evaluation, and a rerun with one more codec computes only that codec)."""
    return swd and not sets.has(swd_key, *((fid_key,) if fid else ()))


def _mean(values: Sequence[float | None], none_is: float = math.nan) -> float | None:
    return _finite_or_none(float(np.mean([none_is if v is None else v for v in values])))


def _aggregate_curve(adapter: CodecAdapter, curve: str, imgs: Mapping[str, np.ndarray], shas: Mapping[str, str],
                     cache: RecordCache, sets: _SetMetricCache, *, swd: bool, swd_opts: Mapping[str, Any],
                     fid_state: dict[str, bool]) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(CompressAI-style result, its per-image records, number of incomplete settings) of one curve."""
    keys = ["bpp", "psnr-rgb", "ms-ssim-rgb", "swd", "swd-per-level", "encoding_time", "decoding_time", "quality"]
    res: dict[str, list[Any]] = {k: [] for k in keys}
    lpips_vals: list[float | None] = []
    fid_vals: list[float | None] = []
    rows: list[dict[str, Any]] = []
    incomplete = 0
    swd_res: tuple[int, ...] = ()
    settings = [s for _, pts in adapter.groups() for c, s in pts if c == curve]
    refs = list(imgs.values())
    for s in settings:
        swd_key, fid_key = _set_metric_keys(curve, adapter.config, s, shas, swd_opts)
        need = _needs_recon(sets, swd_key, fid_key, swd=swd, fid=bool(fid_state.get("available")))
        recs = [cache.get(n, shas[n], curve, s, adapter.config, need_recon=need) for n in imgs]
        if any(r is None for r in recs):
            incomplete += 1
            continue
        rows.extend(recs)
        res["bpp"].append(float(np.mean([r["bpp"] for r in recs])))
        res["psnr-rgb"].append(_mean([r["psnr"] for r in recs], none_is=math.inf))
        res["ms-ssim-rgb"].append(_mean([r["ms-ssim"] for r in recs]))
        res["encoding_time"].append(float(np.mean([r["enc_s"] for r in recs])))
        dec = [r["dec_s"] for r in recs]  # null in a record: not measured
        res["decoding_time"].append(None if None in dec else float(np.mean(dec)))
        res["quality"].append(_jsonable(s))
        if swd:
            def compute_swd(recs: list = recs) -> dict[str, Any]:
                r = sliced_wasserstein(refs, [cache.load_recon(x) for x in recs], **swd_opts)
                return {"mean": r.mean, "per_level": list(r.per_level), "resolutions": list(r.resolutions)}

            v = sets.get(swd_key, compute_swd)
            res["swd"].append(v["mean"])
            res["swd-per-level"].append(v["per_level"])
            swd_res = tuple(v["resolutions"])
            if fid_state.get("available"):
                f = sets.get(fid_key, lambda recs=recs: fid(refs, [cache.load_recon(x) for x in recs]))
                if f is None:
                    fid_state["available"] = False
                fid_vals.append(f)
        else:
            res["swd"].append(None)
            res["swd-per-level"].append(None)
        lpips_vals.append(_mean([r.get("lpips") for r in recs]) if all("lpips" in r for r in recs) else None)
    if any(v is not None for v in lpips_vals):
        res["lpips"] = lpips_vals
    if fid_vals and any(v is not None for v in fid_vals) and len(fid_vals) == len(res["bpp"]):
        res["fid"] = fid_vals
    ims = list(imgs.values())
    sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in ims})
    scales = sorted({msssim_scales(*im.shape[:2]) for im in ims if min(im.shape[:2]) >= 11})
    meta = (f"{len(ims)} images ({', '.join(sizes)}); bpp = 8*whole-file bytes/pixels (mean of per-image); PSNR "
            f"RGB 0-255 and MS-SSIM ({'/'.join(map(str, scales))} scale(s)) means of per-image values; SWD x1e3 "
            f"Karras 2018 Laplacian levels {list(swd_res)} on the image set "
            f"{json.dumps(dict(swd_opts)) if swd_opts else '(default options)'}; encoding_time/decoding_time "
            f"mean seconds per image, 1 torch thread")
    return {"name": curve, "description": f"{adapter.curve_description(curve)}. {meta}", "results": res}, rows, \
        incomplete


def _fmt_pct(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:+.1f}%"


def bd_table(tests: Sequence[Mapping[str, Any]], anchors: Sequence[Mapping[str, Any]], *,
             method: str = "pchip") -> tuple[list[dict[str, Any]], str]:
    """BD-rate on PSNR of every ``tests`` curve (rows) against every ``anchors`` curve (columns).

    Returns the rows (all of :func:`compare_curves`' numbers, nan as ``None``) and the table as text."""
    rows = []
    for t in tests:
        for a in anchors:
            cmp = compare_curves(a, t, method=method)
            rows.append({"curve": t["name"], "anchor": a["name"], **{k: _finite_or_none(v) for k, v in cmp.items()}})
    width = max([len(str(t["name"])) for t in tests] + [5])
    cols = [str(a["name"]) for a in anchors]
    cw = [max(9, len(c)) for c in cols]
    lines = [f"BD-rate on PSNR ({method}) of each curve (rows) against each anchor (columns): extra bits at equal "
             "PSNR, negative = fewer; n/a = no overlap in PSNR",
             f"{'curve':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, cw))]
    lines.append("-" * len(lines[-1]))
    for t in tests:
        vals = {r["anchor"]: r["bd-rate-psnr"] for r in rows if r["curve"] == t["name"]}
        lines.append(f"{t['name']:<{width}}  " + "  ".join(f"{_fmt_pct(vals[c]):>{w}}" for c, w in zip(cols, cw)))
    return rows, "\n".join(lines)


def format_curve(result: Mapping[str, Any]) -> str:
    """A result's points as a text table (quality, bpp, PSNR, MS-SSIM, SWD, seconds per image)."""
    res = result["results"]
    n = len(res["bpp"])

    def col(key: str) -> list[Any]:
        return list(res.get(key) or [None] * n)

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"{result['name']}",
             f"  {'quality':>9} {'bpp':>8} {'PSNR':>7} {'MS-SSIM':>8} {'SWD':>7} {'enc s':>7} {'dec s':>7}"]
    enc, dec = col("encoding_time"), col("decoding_time")
    if all(v is None for v in enc) and "coding_time" in res:
        enc = col("coding_time")
    for q, b, p, m, s, te, td in zip(col("quality"), res["bpp"], col("psnr-rgb"), col("ms-ssim-rgb"), col("swd"),
                                     enc, dec):
        lines.append(f"  {'' if q is None else f'{q:g}' if isinstance(q, (int, float)) else str(q):>9} "
                     f"{f(b, '8.4f')} {f(p, '7.2f'):>7} {f(m, '8.4f'):>8} {f(s, '7.1f'):>7} {f(te, '7.3f'):>7} "
                     f"{f(td, '7.3f'):>7}")
    return "\n".join(lines)


CSV_COLUMNS = ("image", "codec", "setting", "bytes", "bpp", "psnr", "ms-ssim", "enc_s", "dec_s")


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    import csv

    cols = list(CSV_COLUMNS) + (["lpips"] if any("lpips" in r for r in rows) else [])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            vals = []
            for c in cols:
                v = r.get(c)
                if c == "psnr" and v is None:
                    v = "inf"
                vals.append("" if v is None else f"{v:.6g}" if isinstance(v, float) and c != "setting" else v)
            w.writerow(vals)
    os.replace(tmp, path)


def run_eval(
    images: Mapping[str, np.ndarray],
    adapters: Sequence[CodecAdapter],
    out_dir: str | Path,
    *,
    workers: int = 1,
    swd: bool = True,
    swd_options: Mapping[str, Any] | None = None,
    bd_method: str = "pchip",
    swd_max_bpp: float | None = 0.5,
    extra_curves: Sequence[Mapping[str, Any]] = (),
    plots: bool = True,
    title: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Evaluate ``adapters`` on ``images`` ({name: uint8 RGB}) into ``out_dir``; resumable, parallel.

    Writes ``<curve>.json`` (CompressAI schema: name, description, results with bpp, psnr-rgb, ms-ssim-rgb,
    swd, encoding_time, decoding_time, quality per point, plus lpips/fid when their weights are installed),
    ``per_image.csv``, ``curves.txt`` (the points as tables), ``bd.txt`` / ``bd.csv`` (BD-rate on PSNR of each
    diffcodec and ``extra_curves`` curve against each baseline), ``swd_rate.txt`` (each curve's SWD below
    ``swd_max_bpp`` next to each baseline's SWD at the same bpp, :func:`swd_rate_table`), ``swd_levels.txt``
    (every point's SWD per pyramid level, :func:`swd_levels_table`), and
    ``rd_psnr.png`` / ``rd_msssim.png`` / ``rd_swd.png``; the per-image records live in ``cache/`` (see
    :class:`RecordCache`).  Points already recorded for the same pixels and config are not recomputed.
    Returns a summary dict (``curves``, ``table``, ``bd``, ``swd_rate``, counts of points run / cached /
    incomplete settings).
    """
    from tqdm import tqdm

    imgs = {str(k): np.asarray(v) for k, v in images.items()}
    if not imgs:
        raise ValueError("no images to evaluate")
    for n, im in imgs.items():
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"image {n}: expected uint8 (H, W, 3), got {im.dtype} {im.shape}")
    names = [c for a in adapters for c in a.curves()]
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ValueError(f"several codecs produce curves named {dup}")
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    swd_opts = dict(swd_options or {})
    shas = {n: image_sha(im) for n, im in imgs.items()}
    cache = RecordCache(out)
    sets = _SetMetricCache(cache.root / "set_metrics.json")
    fid_state = {"available": importlib.util.find_spec("torchmetrics") is not None}

    payloads, n_points, n_cached = [], 0, 0
    for ai, ad in enumerate(adapters):
        for group, pts in ad.groups():
            recon = [_needs_recon(sets, *_set_metric_keys(c, ad.config, s, shas, swd_opts), swd=swd,
                                  fid=fid_state["available"]) for c, s in pts]
            for n in imgs:
                needed = [(c, s) for (c, s), r in zip(pts, recon)
                          if cache.get(n, shas[n], c, s, ad.config, need_recon=r) is None]
                n_points += len(pts)
                n_cached += len(pts) - len(needed)
                if needed:
                    payloads.append((ai, ad, group, n, imgs[n], needed))
    say(f"{len(imgs)} images, {len(names)} curves: {n_points} points, {n_cached} already in {cache.path}; "
        f"{len(payloads)} jobs to run on {max(1, workers)} worker(s)")
    bar = tqdm(total=len(payloads), desc="eval", unit="job", file=sys.stderr, disable=not progress or not payloads,
               dynamic_ncols=True)
    try:
        for ai, name, results in _execute(payloads, workers, bar):
            for rec, dec in results:
                cache.add({**rec, "image_sha": shas[name], "config": adapters[ai].config}, dec if swd else None)
    finally:
        bar.close()
    dropped = cache.drop_superseded({c: ad.config for ad in adapters for c in ad.curves()})
    if dropped:
        say(f"dropped {dropped} records of these curves made under another model or decoder configuration")

    curves: list[dict[str, Any]] = []
    family: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    incomplete = 0
    try:
        for ad in adapters:
            for curve in ad.curves():
                result, recs, inc = _aggregate_curve(ad, curve, imgs, shas, cache, sets, swd=swd, swd_opts=swd_opts,
                                                     fid_state=fid_state)
                incomplete += inc
                rows.extend(recs)
                if result["results"]["bpp"]:
                    save_results(result, out / f"{_safe(curve)}.json")
                    curves.append(result)
                    family[curve] = ad.family
    finally:
        sets.save()
    if incomplete:
        say(f"warning: {incomplete} settings lack some images' points and were left out (rerun to finish them)")
    _write_csv(out / "per_image.csv", rows)
    (out / "curves.txt").write_text("\n\n".join(format_curve(c) for c in curves) + "\n")
    for c in curves:
        say(format_curve(c))

    baselines = [c for c in curves if family[c["name"]] == "baseline"]
    tests = [c for c in curves if family[c["name"]] != "baseline"] + list(extra_curves)
    bd_rows: list[dict[str, Any]] = []
    table = ""
    if baselines:
        bd_rows, table = bd_table(tests or baselines, baselines, method=bd_method)
        (out / "bd.txt").write_text(table + "\n")
        with open(out / "bd.csv", "w", newline="") as f:
            import csv

            w = csv.writer(f)
            w.writerow(["curve", "anchor", "bd-rate-psnr", "bd-psnr", "bd-rate-ms-ssim"])
            for r in bd_rows:
                w.writerow([r["curve"], r["anchor"]] + ["" if r[k] is None else f"{r[k]:.4f}"
                                                        for k in ("bd-rate-psnr", "bd-psnr", "bd-rate-ms-ssim")])
        say("")
        say(table)
    if baselines and tests:
        psnr_rows, psnr_text = psnr_rate_table(tests, baselines)
        if psnr_rows:
            (out / "psnr_rate.txt").write_text(psnr_text + "\n")
    swd_rows: list[dict[str, Any]] = []
    if swd and baselines and tests:
        swd_rows, swd_text = swd_rate_table(tests, baselines, max_bpp=swd_max_bpp)
        if swd_rows:
            (out / "swd_rate.txt").write_text(swd_text + "\n")
            say("")
            say(swd_text)
    if swd and curves:
        side = min(min(v.shape[:2]) for v in imgs.values())
        levels = swd_resolutions(side, swd_opts.get("min_resolution", 16))
        (out / "swd_levels.txt").write_text(swd_levels_table(curves, levels) + "\n")
    if plots and curves:
        every = curves + list(extra_curves)
        max_bpp = 1.25 * max(max(c["results"]["bpp"]) for c in baselines) if baselines else None
        sizes = ", ".join(sorted({f"{v.shape[1]}x{v.shape[0]}" for v in imgs.values()}))
        title = title or f"{len(imgs)} images ({sizes})"
        figures = (("psnr-rgb", "rd_psnr.png"), ("ms-ssim-db", "rd_msssim.png"), ("swd", "rd_swd.png"))
        # what the plots show (not the wall times): a rerun with nothing new does not redraw them
        stamp = _short_hash(title, max_bpp, [(c["name"], {k: v for k, v in c["results"].items() if "time" not in k})
                                              for c in every])
        stamp_file = cache.root / "plots.stamp"
        fresh = stamp_file.is_file() and stamp_file.read_text() == stamp and all((out / f).exists() for _, f in figures
                                                                                  if f != "rd_swd.png" or swd)
        if not fresh:
            for metric, fname in figures:
                try:
                    plot_rd(every, metric, out / fname, title=title, max_bpp=max_bpp)
                except ValueError:
                    pass  # e.g. --no-swd: nothing to plot for that metric
            cache.root.mkdir(parents=True, exist_ok=True)
            stamp_file.write_text(stamp)
    return {"curves": curves, "families": family, "bd": bd_rows, "table": table, "swd_rate": swd_rows,
            "points": n_points, "points_cached": n_cached, "jobs_run": len(payloads),
            "incomplete_settings": incomplete, "out": out}
