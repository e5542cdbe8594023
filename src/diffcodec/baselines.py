"""Classical image codecs as rate-distortion baselines, with the same whole-file bpp accounting as ours.

Every baseline maps ``(uint8 RGB image, quality) -> (complete file bytes, decoded uint8 image)``: the
bytes are exactly what would be written to disk (headers and container boxes included), because a
learned codec's file also pays for its header.  At kodak-small size (192x128) a few hundred bytes of
header are ~0.1 bpp, so counting payloads only would flatter the classical codecs.

Codecs (names in :data:`BASELINES`; aliases in :data:`ALIASES`):

* ``jpeg``     -- libjpeg-turbo via imagecodecs (Pillow as fallback): 4:2:0, optimised Huffman tables
  (lossless, what any deployment uses), quality 1-100.  The anchor for BD-rate tables.
* ``jpeg2000`` -- OpenJPEG via imagecodecs, JP2 file, irreversible 9/7 wavelet; the quality parameter is
  OpenJPEG's fixed-quality target in dB (PSNR-like), which gives fine-grained rate control.
* ``webp``     -- libwebp via imagecodecs with ``lossless=False`` *explicitly*: imagecodecs otherwise
  encodes losslessly without complaint (DESIGN.md section 6).
* ``avif``     -- libavif/AV1 via imagecodecs at speed 6 (the default speed costs 20-50 s per Kodak image).
* ``jpegxl``   -- libjxl via imagecodecs, quality 0-100 (libjxl maps it to a Butteraugli distance).
* ``heic``     -- HEVC-intra in a HEIF container via pillow-heif/x265, 4:2:0.  BPG is also HEVC-intra;
  HEIC carries a somewhat larger container header than BPG.

A codec whose library is missing is absent from :data:`BASELINES` and listed in :data:`UNAVAILABLE`
with the reason; :func:`select_baselines` skips it with that message instead of crashing.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ALIASES",
    "BASELINES",
    "UNAVAILABLE",
    "Baseline",
    "QualitySearch",
    "find_quality",
    "get_baseline",
    "select_baselines",
]


@dataclass(frozen=True)
class Baseline:
    """One classical codec driven by a scalar quality parameter (higher = more bits).

    ``qualities`` is the default RD grid, chosen to span roughly 0.2-3 bpp on kodak-small; ``quality_range``
    is where :func:`find_quality` may search; ``integer_quality`` says the library only honours whole
    numbers, so bisection stops at adjacent integers.
    """

    name: str
    description: str
    encode: Callable[[np.ndarray, float], bytes] = field(repr=False)
    decode: Callable[[bytes], np.ndarray] = field(repr=False)
    qualities: tuple[float, ...]
    quality_range: tuple[float, float]
    integer_quality: bool = True

    def __call__(self, img: np.ndarray, quality: float) -> tuple[bytes, np.ndarray]:
        """Encode and decode ``img``: the ``(img, setting) -> (file_bytes, decoded)`` protocol of
        :func:`diffcodec.evaluate.evaluate_curve`.  An out-of-range quality is an error rather than clamped, so
        a result never records a setting that was not used; integer-only parameters are rounded."""
        data, dec, _, _ = self.timed(img, quality)
        return data, dec

    def timed(self, img: np.ndarray, quality: float) -> tuple[bytes, np.ndarray, float, float]:
        """As :meth:`__call__`, also returning the encode and decode wall times in seconds."""
        img = _check_rgb(img)
        lo, hi = self.quality_range
        if not lo <= float(quality) <= hi:
            raise ValueError(f"{self.name}: quality {quality} outside {lo}..{hi}")
        q = self._clip_quality(quality)
        t0 = time.perf_counter()
        data = bytes(self.encode(img, q))
        t1 = time.perf_counter()
        dec = np.asarray(self.decode(data))
        t2 = time.perf_counter()
        if dec.shape != img.shape or dec.dtype != np.uint8:
            raise RuntimeError(f"{self.name}: decoded {dec.shape} {dec.dtype}, expected {img.shape} uint8")
        return data, dec, t1 - t0, t2 - t1

    def _clip_quality(self, quality: float) -> float:
        lo, hi = self.quality_range
        q = min(max(float(quality), lo), hi)
        return float(round(q)) if self.integer_quality else q


def _check_rgb(img: np.ndarray) -> np.ndarray:
    """Baselines take 8-bit RGB, like the evaluation images; refusing other layouts beats having one codec
    silently code gray as RGB and another code it natively (their rates would not be comparable)."""
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"baselines take uint8 (H, W, 3) RGB images, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------------------------------
# Codec factories: each imports lazily and raises ImportError/RuntimeError when unusable.
# --------------------------------------------------------------------------------------------------


def _imagecodecs(flag: str):
    try:
        import imagecodecs
    except ImportError as e:
        raise ImportError(f"imagecodecs is not installed ({e}); pip install imagecodecs") from None
    if not getattr(getattr(imagecodecs, flag, None), "available", False):
        raise RuntimeError(f"this imagecodecs build ({imagecodecs.__version__}) has no {flag} codec")
    return imagecodecs


def _make_jpeg() -> Baseline:
    grid = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 65.0, 80.0, 90.0)
    try:
        ic = _imagecodecs("JPEG8")
    except (ImportError, RuntimeError):
        from PIL import Image

        def enc_pil(img: np.ndarray, q: float) -> bytes:
            bio = io.BytesIO()
            Image.fromarray(img).save(bio, format="JPEG", quality=int(q), subsampling=2, optimize=True)
            return bio.getvalue()

        def dec_pil(data: bytes) -> np.ndarray:
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

        return Baseline("jpeg", "JPEG (Pillow/libjpeg), 4:2:0, optimised Huffman", enc_pil, dec_pil, grid, (1, 100))

    def enc(img: np.ndarray, q: float) -> bytes:
        return ic.jpeg8_encode(img, level=int(q), subsampling="420", optimize=True)

    return Baseline("jpeg", "JPEG (libjpeg-turbo via imagecodecs), 4:2:0, optimised Huffman", enc, ic.jpeg8_decode,
                    grid, (1, 100))


def _make_jpeg2000() -> Baseline:
    ic = _imagecodecs("JPEG2K")

    def enc(img: np.ndarray, q: float) -> bytes:
        return ic.jpeg2k_encode(img, level=q, codecformat="JP2", reversible=False)

    # OpenJPEG honours the dB target in ~0.2-0.4 dB steps: treat it as continuous.
    return Baseline("jpeg2000", "JPEG 2000 (OpenJPEG via imagecodecs), JP2 file, 9/7 wavelet, fixed-quality dB target",
                    enc, ic.jpeg2k_decode, (18.0, 20.0, 22.0, 24.0, 26.0, 28.0, 30.0, 32.0, 34.0, 36.0, 39.0),
                    (15.0, 60.0), integer_quality=False)


def _make_webp() -> Baseline:
    ic = _imagecodecs("WEBP")

    def enc(img: np.ndarray, q: float) -> bytes:
        return ic.webp_encode(img, level=int(q), lossless=False)  # lossless=False: see module docstring

    return Baseline("webp", "WebP lossy (libwebp via imagecodecs)", enc, ic.webp_decode,
                    (0.0, 2.0, 5.0, 15.0, 30.0, 50.0, 70.0, 85.0, 95.0), (0, 100))


def _make_avif() -> Baseline:
    ic = _imagecodecs("AVIF")

    def enc(img: np.ndarray, q: float) -> bytes:
        return ic.avif_encode(img, level=int(q), speed=6)

    return Baseline("avif", "AVIF (libavif via imagecodecs), speed 6", enc, ic.avif_decode,
                    (0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0), (0, 100))


def _make_jpegxl() -> Baseline:
    ic = _imagecodecs("JPEGXL")

    def enc(img: np.ndarray, q: float) -> bytes:
        return ic.jpegxl_encode(img, level=q)

    return Baseline("jpegxl", "JPEG XL (libjxl via imagecodecs), default effort", enc, ic.jpegxl_decode,
                    (0.0, 10.0, 25.0, 40.0, 55.0, 70.0, 80.0, 90.0), (0.0, 99.0), integer_quality=False)


def _make_heic() -> Baseline:
    try:
        import pillow_heif
    except ImportError as e:
        raise ImportError(f"pillow-heif is not installed ({e}); pip install pillow-heif") from None
    encoders = pillow_heif.libheif_info().get("encoders", {})
    if not any(k in encoders for k in ("x265", "kvazaar", "uvg266")) and not any(
            "hevc" in str(v).lower() for v in encoders.values()):
        raise RuntimeError(f"pillow-heif has no HEVC encoder (encoders: {sorted(encoders)})")

    def enc(img: np.ndarray, q: float) -> bytes:
        h, w, _ = img.shape
        heif = pillow_heif.from_bytes(mode="RGB", size=(w, h), data=img.tobytes())
        bio = io.BytesIO()
        heif.save(bio, quality=int(q), chroma=420)
        return bio.getvalue()

    def dec(data: bytes) -> np.ndarray:
        heif = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=True)
        if heif.mode != "RGB":
            raise RuntimeError(f"HEIC decoded to mode {heif.mode}")
        return np.asarray(heif)

    return Baseline("heic", "HEVC-intra in HEIF (x265 via pillow-heif), 4:2:0", enc, dec,
                    (1.0, 5.0, 12.0, 20.0, 27.0, 35.0, 42.0, 50.0, 60.0), (0, 100))


_FACTORIES: dict[str, Callable[[], Baseline]] = {
    "jpeg": _make_jpeg,
    "jpeg2000": _make_jpeg2000,
    "webp": _make_webp,
    "avif": _make_avif,
    "jpegxl": _make_jpegxl,
    "heic": _make_heic,
}

ALIASES: dict[str, str] = {"jpg": "jpeg", "j2k": "jpeg2000", "jp2": "jpeg2000", "jxl": "jpegxl",
                           "heif": "heic", "hevc": "heic", "bpg": "heic"}

BASELINES: dict[str, Baseline] = {}
UNAVAILABLE: dict[str, str] = {}
for _name, _factory in _FACTORIES.items():
    try:
        BASELINES[_name] = _factory()
    except (ImportError, RuntimeError, OSError) as _e:
        UNAVAILABLE[_name] = str(_e)


def get_baseline(name: str) -> Baseline:
    """The baseline called ``name`` (aliases accepted); a clear error if unknown or unavailable here."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in BASELINES:
        return BASELINES[key]
    if key in UNAVAILABLE:
        raise KeyError(f"baseline {name!r} is unavailable here: {UNAVAILABLE[key]}")
    raise KeyError(f"unknown baseline {name!r}; known: {', '.join(_FACTORIES)}")


def select_baselines(names: Iterable[str] | None = None) -> tuple[dict[str, Baseline], dict[str, str]]:
    """Available baselines among ``names`` (all when None) and ``{name: reason}`` for the skipped ones.

    Unknown names are an error (a typo should not silently shrink a benchmark); unavailable ones are
    returned as skipped so the caller can print why and carry on."""
    chosen: dict[str, Baseline] = {}
    skipped: dict[str, str] = {}
    for name in (list(_FACTORIES) if names is None else names):
        key = ALIASES.get(name.lower(), name.lower())
        if key in BASELINES:
            chosen[key] = BASELINES[key]
        elif key in UNAVAILABLE:
            skipped[key] = UNAVAILABLE[key]
        else:
            raise KeyError(f"unknown baseline {name!r}; known: {', '.join(_FACTORIES)}")
    return chosen, skipped


# --------------------------------------------------------------------------------------------------
# Rate targeting
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualitySearch:
    """Result of :func:`find_quality`: the chosen quality, its mean whole-file bpp and how many encodes it took."""

    quality: float
    bpp: float
    target_bpp: float
    evaluations: int

    @property
    def rel_error(self) -> float:
        return abs(self.bpp - self.target_bpp) / self.target_bpp


def _mean_bpp(baseline: Baseline, images: Sequence[np.ndarray], quality: float) -> float:
    bits = [8.0 * len(bytes(baseline.encode(img, baseline._clip_quality(quality)))) for img in images]
    return float(np.mean([b / (img.shape[0] * img.shape[1]) for b, img in zip(bits, images)]))


def find_quality(baseline: Baseline, images: np.ndarray | Sequence[np.ndarray], target_bpp: float, *,
                 rel_tol: float = 0.01, quality_tol: float = 0.01, max_iter: int = 30) -> QualitySearch:
    """Quality whose mean whole-file bpp over ``images`` is closest to ``target_bpp``, by bisection.

    Why: RD curves of different codecs sampled at matching rates can be compared point by point (and
    visually) without interpolation.  Bisection assumes rate grows with quality, true up to small
    non-monotone wiggles, so the closest point seen during the search is returned rather than the last
    bracket end.  It stops at ``rel_tol`` relative error, when the bracket closes (adjacent integers, or
    narrower than ``quality_tol`` for a continuous parameter, whose rate may still jump in steps), or after
    ``max_iter`` encodes; a target outside the codec's range returns the nearest end point.
    One quality is used for the whole set (as for the grid points of an RD curve), so individual
    images' rates scatter around the target.  Only encoding is timed here, no decoding.
    """
    imgs = [_check_rgb(images)] if isinstance(images, np.ndarray) and images.ndim == 3 else [
        _check_rgb(im) for im in images]
    if not imgs or not (target_bpp > 0 and math.isfinite(target_bpp)):
        raise ValueError("need at least one image and a positive finite target bpp")
    lo, hi = (float(v) for v in baseline.quality_range)
    seen: dict[float, float] = {}

    def rate(q: float) -> float:
        q = baseline._clip_quality(q)
        if q not in seen:
            seen[q] = _mean_bpp(baseline, imgs, q)
        return seen[q]

    def best() -> QualitySearch:
        q = min(seen, key=lambda k: (abs(seen[k] - target_bpp), k))
        return QualitySearch(quality=q, bpp=seen[q], target_bpp=float(target_bpp), evaluations=len(seen))

    r_lo, r_hi = rate(lo), rate(hi)
    if target_bpp <= r_lo or target_bpp >= r_hi:
        return best()
    for _ in range(max_iter):
        if hi - lo <= (1.0 if baseline.integer_quality else quality_tol):
            break
        mid = (lo + hi) / 2.0
        if baseline.integer_quality:
            mid = float(math.floor(mid))
        r = rate(mid)
        if abs(r - target_bpp) <= rel_tol * target_bpp:
            break
        if r < target_bpp:
            lo = mid
        else:
            hi = mid
    return best()
