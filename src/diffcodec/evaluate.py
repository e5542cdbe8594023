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

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .baselines import find_quality, select_baselines
from .metrics import lpips_distance, ms_ssim, msssim_scales, psnr, sliced_wasserstein

__all__ = [
    "EncodeDecodeFn",
    "bd_psnr",
    "bd_rate",
    "compare_curves",
    "evaluate_baselines",
    "evaluate_curve",
    "load_images",
    "load_results",
    "msssim_db",
    "plot_rd",
    "save_results",
]

EncodeDecodeFn = Callable[[np.ndarray, Any], tuple[bytes, np.ndarray]]
Images = Sequence[np.ndarray] | Mapping[str, np.ndarray]

# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def load_images(folder: str | Path, scale: int = 1, limit: int | None = None,
                pattern: str = "*.png") -> dict[str, np.ndarray]:
    """Load the images of ``folder`` (sorted by name) as uint8 RGB, optionally downscaled by ``scale``.

    Downscaling uses Pillow's LANCZOS resize, which widens its kernel by the reduction factor and so
    antialiases (768x512 -> 192x128 for scale 4: "kodak-small" of DESIGN.md section 5).  Sizes are floored
    to whole pixels.  Returns ``{stem: image}`` so results can name their images.
    """
    if scale < 1:
        raise ValueError("scale must be >= 1")
    files = sorted(Path(folder).glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} images in {folder}")
    out: dict[str, np.ndarray] = {}
    for f in files[:limit]:
        with Image.open(f) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            if scale > 1:
                im = im.resize((max(1, im.width // scale), max(1, im.height // scale)), Image.LANCZOS)
            out[f.stem] = np.asarray(im).copy()
    return out


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
    swd_resolutions: tuple[int, ...] = ()
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
            swd_resolutions = r.resolutions
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
            f"Laplacian levels {list(swd_resolutions)} {json.dumps(swd_opts) if swd_opts else '(default options)'}")
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


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------

_LABELS = {"psnr-rgb": "PSNR RGB [dB]", "ms-ssim-rgb": "MS-SSIM (RGB)", "ms-ssim-db": "MS-SSIM [dB] = -10 log10(1-x)",
           "swd": "SWD x1e3 (lower is better)", "lpips": "LPIPS (lower is better)"}


def plot_rd(results: Sequence[Mapping[str, Any]], metric: str, out_png: str | Path, *, title: str | None = None,
            ) -> Path:
    """One RD plot: linear bpp axis, one line with markers per result, points ordered by rate.

    ``metric`` is any results key (``psnr-rgb``, ``ms-ssim-rgb``, ``swd``, ...) or the derived
    ``ms-ssim-db``.  Uses the Agg canvas directly (no pyplot global state), so it is safe to call from
    scripts, tests and threads regardless of the configured matplotlib backend."""
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
                     if b is not None and y is not None and math.isfinite(b) and math.isfinite(y))
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
