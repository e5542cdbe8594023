"""Image quality metrics for rate-distortion evaluation (full-reference and distributional).

Only numpy is needed (torch only for the optional LPIPS/FID hooks); nothing is downloaded.

* :func:`ms_ssim` -- multi-scale SSIM (Wang, Simoncelli & Bovik 2003) on 0-255 images, the metric
  learned-compression papers report beside PSNR.  Standard constants: Gaussian window 11 / sigma 1.5,
  K1 = 0.01, K2 = 0.03, five scales weighted (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2x2 average
  down-sampling between scales, computed per channel and averaged over channels (as in the reference
  MATLAB code, ``pytorch_msssim`` and CompressAI).
* :func:`sliced_wasserstein` -- the sliced Wasserstein distance between multi-scale Laplacian-pyramid
  patch distributions of Karras et al. 2018 (Progressive GAN, ``metrics/sliced_wasserstein.py``).  It
  needs no pretrained network, which is why it is our realism metric (DESIGN.md section 5).
* :func:`lpips_distance` / :func:`fid` -- hooks that work only if ``lpips`` / ``torchmetrics`` (with
  their backbone weights) are importable; they return ``None`` otherwise and are never required.

* :func:`psnr` -- PSNR in dB over all pixels and channels.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB over all pixels and channels (inf for identical images)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


__all__ = [
    "MSSSIM_WEIGHTS",
    "SWDResult",
    "fid",
    "lpips_distance",
    "ms_ssim",
    "msssim_scales",
    "psnr",
    "sliced_wasserstein",
]

# --------------------------------------------------------------------------------------------------
# MS-SSIM
# --------------------------------------------------------------------------------------------------

MSSSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_WIN_SIZE = 11
_WIN_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03


def msssim_scales(height: int, width: int, max_scales: int = len(MSSSIM_WEIGHTS)) -> int:
    """Number of MS-SSIM scales usable for an image of this size.

    Rule: the largest ``M <= max_scales`` with ``min(H, W) // 2**(M-1) >= 11``, i.e. the 11x11 window
    still fits (valid convolution, no padding) at the coarsest scale.  Full Kodak (512 px short side)
    gets the standard 5 scales; kodak-small (128 px) gets 4; a 64x48 test image gets 3.  With fewer
    than 5 scales the first ``M`` standard weights are renormalised to sum to 1 (the coarse scales are
    dropped, the fine-scale ones keep their relative importance).  Values computed with different ``M``
    are therefore not strictly comparable; results record the scale count in their description.
    """
    side = min(height, width)
    if side < _WIN_SIZE:
        raise ValueError(f"MS-SSIM needs images of at least {_WIN_SIZE}x{_WIN_SIZE} pixels, got {height}x{width}")
    m = 1
    while m < max_scales and side // 2**m >= _WIN_SIZE:
        m += 1
    return m


@functools.lru_cache(maxsize=4)
def _gauss_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _gauss_filter(x: np.ndarray, win: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over the last two axes, 'valid' output (as the reference implementation).

    Plain numpy on purpose: torch's intra-op thread pool made this 50-100x slower on a busy 2-core machine
    (small convolutions spin on barriers), and numpy's shifted-slice sums are fast enough here."""
    k = win.size
    h, w = x.shape[-2:]
    x = sum(win[i] * x[..., i : h - k + 1 + i, :] for i in range(k))
    return sum(win[i] * x[..., i : w - k + 1 + i] for i in range(k))


def _ssim_cs(x: np.ndarray, y: np.ndarray, win: np.ndarray, peak: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean SSIM and mean contrast-structure term; x, y are (C, H, W) float64."""
    c1 = (_K1 * peak) ** 2
    c2 = (_K2 * peak) ** 2
    mu_x, mu_y, exx, eyy, exy = _gauss_filter(np.stack([x, y, x * x, y * y, x * y]), win)
    sxx = exx - mu_x**2
    syy = eyy - mu_y**2
    sxy = exy - mu_x * mu_y
    cs_map = (2.0 * sxy + c2) / (sxx + syy + c2)
    ssim_map = (2.0 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.mean(axis=(1, 2)), cs_map.mean(axis=(1, 2))


def _downsample2(x: np.ndarray) -> np.ndarray:
    """2x2 average pooling; an odd last row/column is edge-replicated first so no pixel is dropped
    and no zero padding darkens the border (``pytorch_msssim`` pads with zeros instead)."""
    ph, pw = x.shape[-2] % 2, x.shape[-1] % 2
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="edge")
    return 0.25 * (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2])


def _to_chw(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {a.shape}")
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float64)


def ms_ssim(a: np.ndarray, b: np.ndarray, *, peak: float = 255.0, scales: int | None = None) -> float:
    """MS-SSIM of two images in [0, peak] (uint8 or float), averaged over channels.

    ``scales=None`` picks the count with :func:`msssim_scales`; an explicit value larger than the image
    allows raises instead of silently computing on a too-small coarsest scale.  Negative per-scale
    contrast-structure values (possible for anti-correlated content) are clamped to 0 before the
    weighted geometric mean, as ``pytorch_msssim`` does, so the result stays real.
    """
    if np.shape(a) != np.shape(b):
        raise ValueError(f"shape mismatch {np.shape(a)} vs {np.shape(b)}")
    x = _to_chw(a)
    y = _to_chw(b)
    h, w = x.shape[-2:]
    max_m = msssim_scales(h, w)
    m = max_m if scales is None else int(scales)
    if not 1 <= m <= max_m:
        raise ValueError(f"{m} MS-SSIM scales impossible for a {h}x{w} image (at most {max_m})")
    weights = np.asarray(MSSSIM_WEIGHTS[:m], dtype=np.float64)
    weights = weights / weights.sum()
    win = _gauss_window(_WIN_SIZE, _WIN_SIGMA)
    factors = []
    for i in range(m):
        ssim_c, cs_c = _ssim_cs(x, y, win, peak)
        factors.append(np.maximum(ssim_c if i == m - 1 else cs_c, 0.0))
        if i < m - 1:
            x, y = _downsample2(x), _downsample2(y)
    stack = np.stack(factors, axis=0)  # (M, C)
    per_channel = np.prod(stack ** weights[:, None], axis=0)
    return float(per_channel.mean())


# --------------------------------------------------------------------------------------------------
# Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018)
# --------------------------------------------------------------------------------------------------

_BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0], dtype=np.float32) / 16.0  # outer product = the 5x5 filter / 256


def _blur(x: np.ndarray) -> np.ndarray:
    """5x5 binomial filter (separable), 'mirror' borders like ``scipy.ndimage.convolve(mode='mirror')``
    in the reference code, which matches ``cv2.pyrDown``/``pyrUp``."""
    x = np.pad(x, ((0, 0), (2, 2), (0, 0)), mode="reflect")
    x = sum(_BINOMIAL[k] * x[:, k : x.shape[1] - 4 + k, :] for k in range(5))
    x = np.pad(x, ((0, 0), (0, 0), (2, 2)), mode="reflect")
    return sum(_BINOMIAL[k] * x[:, :, k : x.shape[2] - 4 + k] for k in range(5)).astype(np.float32)


def _pyr_down(x: np.ndarray) -> np.ndarray:
    return _blur(x)[:, ::2, ::2]


def _pyr_up(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    c, h, w = x.shape
    up = np.zeros((c, 2 * h, 2 * w), dtype=np.float32)
    up[:, ::2, ::2] = x
    return 4.0 * _blur(up)[:, : shape[0], : shape[1]]  # crop: odd sizes round up on the way down


def _laplacian_pyramid(img: np.ndarray, levels: int) -> list[np.ndarray]:
    """(C, H, W) float32 Laplacian pyramid, finest first; the last level is the low-pass residual."""
    pyr = [img]
    for _ in range(1, levels):
        pyr.append(_pyr_down(pyr[-1]))
        pyr[-2] = pyr[-2] - _pyr_up(pyr[-1], pyr[-2].shape[1:])
    return pyr


def _patches(level: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """(N, C, size, size) patches with top-left corners (ys, xs)."""
    r = np.arange(size)
    return level[:, ys[:, None, None] + r[None, :, None], xs[:, None, None] + r[None, None, :]].transpose(1, 0, 2, 3)


def _normalise(desc: np.ndarray) -> np.ndarray:
    """Karras' ``finalize_descriptors``: zero mean / unit std per channel over the whole set, then flatten.
    The guard keeps a constant level (flat synthetic images) from dividing by zero."""
    desc = desc - desc.mean(axis=(0, 2, 3), keepdims=True)
    desc = desc / np.maximum(desc.std(axis=(0, 2, 3), keepdims=True), 1e-8)
    return desc.reshape(desc.shape[0], -1)


@dataclass(frozen=True)
class SWDResult:
    """SWD per pyramid level (finest first, in units of 1e-3 like the paper's ``SWDx1e3``) and their mean.

    ``resolutions`` labels each level by the smallest image side at that level (16 is the coarsest
    level used, as in the paper).
    """

    resolutions: tuple[int, ...]
    per_level: tuple[float, ...]
    mean: float


def swd_resolutions(smallest: int, min_resolution: int = 16) -> tuple[int, ...]:
    """The Laplacian levels SWD compares for images whose smallest side is ``smallest``, each labelled by
    its smallest side: full resolution first, halving down to ``min_resolution``."""
    out = []
    while smallest >= min_resolution:
        out.append(smallest)
        smallest //= 2
    return tuple(out)


def sliced_wasserstein(
    references: Sequence[np.ndarray],
    reconstructions: Sequence[np.ndarray],
    *,
    seed: int = 0,
    patch_size: int = 7,
    patches_per_image: int = 128,
    dir_repeats: int = 4,
    dirs_per_repeat: int = 128,
    min_resolution: int = 16,
    paired: bool = True,
) -> SWDResult:
    """Sliced Wasserstein distance between two image sets, per Laplacian level (Karras et al. 2018).

    Follows the reference implementation: 7x7 RGB patches at random positions, 128 per image per level,
    each set normalised per level and channel on its own, 4 x 128 random unit directions, the 1-D
    Wasserstein-1 distance between sorted projections averaged over patches and directions, x1e3.
    Levels run from full resolution down to ``min_resolution`` (16) on the smallest image side.

    Why ``paired=True`` by default: in compression evaluation reconstruction ``i`` corresponds to
    reference ``i``; sampling the same patch positions in both halves the estimator's variance with a few
    dozen images (Karras used tens of thousands) and makes a perfect reconstruction score exactly 0.
    ``paired=False`` draws independent positions for the second set (a purely distributional comparison;
    then only the number of images must match).  Directions and positions come from ``seed``, so numbers
    are reproducible and comparable across codecs evaluated with the same seed.
    """
    refs = [np.asarray(r) for r in references]
    recs = [np.asarray(r) for r in reconstructions]
    if len(refs) != len(recs) or not refs:
        raise ValueError(f"need two non-empty sets of equal size, got {len(refs)} and {len(recs)}")
    for r, s in zip(refs, recs):
        if r.ndim not in (2, 3) or s.ndim not in (2, 3):
            raise ValueError("images must be (H, W) or (H, W, C)")
        if paired and r.shape != s.shape:
            raise ValueError(f"paired SWD needs equal shapes, got {r.shape} vs {s.shape}")
    smallest = min(min(im.shape[:2]) for im in refs + recs)
    resolutions = swd_resolutions(smallest, min_resolution)
    levels = len(resolutions)
    if levels == 0:
        raise ValueError(f"images need a side of at least {min_resolution} pixels for SWD, got {smallest}")

    ss = np.random.SeedSequence(seed)
    pos_ss, dir_ss, pos2_ss = ss.spawn(3)

    def descriptors(images: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        per_level: list[list[np.ndarray]] = [[] for _ in range(levels)]
        for im in images:
            chw = (im[..., None] if im.ndim == 2 else im).transpose(2, 0, 1).astype(np.float32)
            for lod, level in enumerate(_laplacian_pyramid(chw, levels)):
                _, h, w = level.shape
                ys = rng.integers(0, h - patch_size + 1, size=patches_per_image)
                xs = rng.integers(0, w - patch_size + 1, size=patches_per_image)
                per_level[lod].append(_patches(level, ys, xs, patch_size))
        return [_normalise(np.concatenate(d, axis=0)) for d in per_level]

    desc_a = descriptors(refs, np.random.default_rng(pos_ss))
    desc_b = descriptors(recs, np.random.default_rng(pos_ss if paired else pos2_ss))
    dir_rng = np.random.default_rng(dir_ss)
    dists = []
    for a, b in zip(desc_a, desc_b):
        # All repeats' directions in one matrix and both sets in one product: the mean over repeats of
        # per-repeat means equals the overall mean (equal block sizes), and one large matmul avoids the
        # BLAS thread wake-up cost that dominated 32 small ones on a busy machine.
        dirs = dir_rng.standard_normal((a.shape[1], dir_repeats * dirs_per_repeat)).astype(np.float32)
        dirs /= np.sqrt(np.sum(dirs**2, axis=0, keepdims=True))
        proj = np.concatenate([a, b], axis=0).astype(np.float32) @ dirs
        pa = np.sort(proj[: a.shape[0]], axis=0)
        pb = np.sort(proj[a.shape[0] :], axis=0)
        dists.append(1e3 * float(np.mean(np.abs(pa - pb))))
    return SWDResult(resolutions=resolutions, per_level=tuple(dists), mean=float(np.mean(dists)))


# --------------------------------------------------------------------------------------------------
# Optional hooks needing pretrained networks (DESIGN.md: support when present, never require)
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _lpips_model(net: str):
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        model = lpips.LPIPS(net=net, verbose=False)
    except Exception as e:  # backbone weights missing / no network: the hook degrades, it never fails
        warnings.warn(f"lpips is installed but its '{net}' model could not be built ({e}); LPIPS disabled",
                      stacklevel=3)
        return None
    return model.eval()


def lpips_distance(a: np.ndarray, b: np.ndarray, net: str = "alex") -> float | None:
    """LPIPS between two uint8 RGB images, or ``None`` when the ``lpips`` package/weights are unavailable."""
    model = _lpips_model(net)
    if model is None:
        return None

    def prep(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(2, 0, 1)))
        return (t / 127.5 - 1.0).unsqueeze(0)

    with torch.no_grad():
        return float(model(prep(a), prep(b)).mean())


def fid(references: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray]) -> float | None:
    """FID (Inception-v3 pool features) via ``torchmetrics``, or ``None`` when it (or its weights) is
    unavailable.  With a few dozen images FID is heavily biased; report it only as a secondary number."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        metric = FrechetInceptionDistance(feature=2048)
        for imgs, real in ((references, True), (reconstructions, False)):
            for im in imgs:
                t = torch.from_numpy(np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)))
                metric.update(t.unsqueeze(0), real=real)
        value = float(metric.compute())
    except Exception as e:  # weights not downloadable here
        warnings.warn(f"torchmetrics FID unavailable ({e})", stacklevel=2)
        return None
    return value if math.isfinite(value) else None
