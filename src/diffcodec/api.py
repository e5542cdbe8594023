"""The library API: compress, decompress, info, models.  The CLI is a thin layer over this.

Example::

    import diffcodec
    res = diffcodec.compress("photo.png", steps=2)          # default model
    open("photo.dfc", "wb").write(res.data)
    img = diffcodec.decompress(res.data, method="flow")     # uint8 (H, W, C)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import container
from .codecs.uqdm import KEEP_ALL
from .diffusion import RECONSTRUCTION_METHODS, DiffusionModel
from .errors import DecodeError, DiffcodecError, ImageError, ModelError
from .imageio import read_image
from .models import (
    DEFAULT_MODELS,
    MODEL_PATH_ENV,
    RETIRED_MODELS,
    bundled_models,
    find_model,
    load_model,
    path_models,
    read_metadata,
    retired_hint,
)
from .rng import ANCESTRAL, SeededStream

__all__ = ["EncodeResult", "compress", "decompress", "decode_steps", "info", "list_models", "get_model"]

KIND_NAMES = {0: "step", 1: "lossless", 2: "hyper-latent", 3: "latent", 4: "part"}
DEFAULT_PARTS = (0.5,)  # uqdm step parts of a file coded to a bpp target (README, UQDM step parts)
# What compress(bpp=...) does, per codec, named for the evaluation's record cache (a change of the rate control
# changes the files: bump the name): uqdm ends the file with one step at the largest kept share that fits
# (_KeptFit); diffc keeps the longest prefix of whole steps
RATE_CONTROL = {"uqdm": "kept-fit-1", "diffc": "prefix-1"}
MAX_CODE_PIXELS = 25 * 10**6  # a 24 MP photo; = container.DEFAULT_MAX_PIXELS (benchmarks/large_image.py: RAM)


@dataclass
class EncodeResult:
    data: bytes
    codec: str
    model: str
    width: int
    height: int
    steps: int
    lossless: bool
    sections: list[dict] = field(default_factory=list)
    q: float | None = None  # rvgc: the quantisation step used
    keep: tuple[int, ...] | None = None  # uqdm: the steps' kept shares in 255ths (rate control may change one)

    @property
    def file_bytes(self) -> int:
        return len(self.data)

    @property
    def bpp(self) -> float:
        return 8.0 * len(self.data) / (self.width * self.height)

    @property
    def ideal_bits_total(self) -> float:
        return float(sum(s["ideal_bits"] for s in self.sections))

    def summary(self) -> dict:
        return {
            "codec": self.codec, "model": self.model, "width": self.width, "height": self.height,
            "steps": self.steps, "lossless": self.lossless, "q": self.q, "file_bytes": self.file_bytes,
            "bpp": self.bpp, "ideal_bits_total": self.ideal_bits_total, "keep": self.keep, "sections": self.sections,
        }


@functools.lru_cache(maxsize=8)
def get_model(name_or_path: str | None = None, codec: str = "uqdm"):
    """Load (and cache) a model by bundled name or path; ``None`` = the codec's default model."""
    if name_or_path is None:
        if codec not in DEFAULT_MODELS:
            raise ModelError(f"no default model for codec {codec!r}")
        name_or_path = DEFAULT_MODELS[codec]
    return load_model(str(name_or_path))


def _as_model(model, codec: str):
    if model is None or isinstance(model, (str, Path)):
        return get_model(None if model is None else str(model), codec)
    return model


def _prepare(image, alpha: str, model) -> tuple[np.ndarray, int, int, int]:
    """uint8 (C, Hp, Wp) padded for the network; returns (pixels, h, w, channels)."""
    arr = image if isinstance(image, np.ndarray) else read_image(image, alpha=alpha)
    if arr.dtype != np.uint8:
        raise DiffcodecError("image arrays must be uint8")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise DiffcodecError("image arrays must be (H, W), (H, W, 1) or (H, W, 3)")
    h, w, ch = arr.shape
    if h * w > MAX_CODE_PIXELS or max(h, w) > container.MAX_SIDE:
        raise ImageError(f"image {w}x{h} is too large to code here (limit {MAX_CODE_PIXELS // 10**6} "
                         f"megapixels, {container.MAX_SIDE} per side); downscale or split it")
    if ch != model.channels:
        arr = np.repeat(arr, model.channels, axis=2) if ch == 1 else arr
    m = model.downscale
    ph, pw = -h % m, -w % m
    x = np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="edge").transpose(2, 0, 1)
    return np.ascontiguousarray(x), h, w, ch


def _section_report(sec, size: int, step: int) -> dict:
    return {"step": step, "kind": KIND_NAMES.get(sec.kind, str(sec.kind)), "bytes": size,
            "payload_bytes": len(sec.payload), "ideal_bits": float(sec.ideal_bits)}


def compress(image, model=None, codec: str | None = None, steps: int | None = None, bpp: float | None = None,
             lossless: bool = False, seed: int = 0, alpha: str = "error", progress=None,
             **options) -> EncodeResult:
    """Compress an image (path, bytes or uint8 array) to .dfc bytes.

    ``model``: a loaded model, a bundled name or a .safetensors path; ``None`` = the default model
    of ``codec`` (default codec: uqdm).

    Quality is chosen by exactly one of ``steps`` (diffusion steps sent, 1..T), ``bpp`` (the
    longest prefix of the file that fits) or ``lossless`` (every step plus the exact final
    section).  With none, the model card's ``default_steps`` is used.  ``options`` are the codec's
    encoder choices (diffc: ``c_max``, ``pad``; uqdm: ``parts``, the fractions of each step's
    coordinates after which the file may be cut, default :data:`DEFAULT_PARTS` with ``bpp`` and none
    otherwise, and ``box_prior``, default True: code each step under its prior restricted to the box
    the steps before put x in; False writes the format of diffcodec before 2026-12-07, bigger but
    readable by those versions; and ``keep``: the fraction of its coordinates (largest prior scale
    first) every step but the last two codes, the others drawn from the step's prior, or one fraction
    per step but the last; 1 codes every coordinate (the files written before kept coordinates were the
    default); default: the model's
    :meth:`~diffcodec.codecs.uqdm.UQDM.default_keep` (all with ``box_prior=False``); README, UQDM kept
    coordinates); ``None`` values are ignored.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if sum(v is not None and v is not False for v in (steps, bpp, lossless)) > 1:
        raise DiffcodecError("give at most one of steps, bpp, lossless")
    model = _as_model(model, codec or "uqdm")
    if codec is not None and model.codec_id != codec:
        raise ModelError(f"model {model.model_id} is a {model.codec_id} model, not {codec}")
    codec = model.codec_id
    pixels, h, w, ch = _prepare(image, alpha, model)
    if codec == "rvgc":
        if steps is not None or lossless:
            raise DiffcodecError("rvgc has no steps and no lossless mode: choose the rate with q or bpp")
        return _compress_rvgc(model, pixels, h, w, ch, seed, bpp, options.pop("q", None), progress, options)
    if "q" in options:
        raise DiffcodecError(f"q applies to rvgc models, not {codec}")
    T = model.num_steps
    if "box_prior" in options and codec != "uqdm":
        raise DiffcodecError(f"box_prior applies to uqdm models, not {codec}")
    keep = options.pop("keep", None)
    if keep is not None and codec != "uqdm":
        raise DiffcodecError(f"keep applies to uqdm models, not {codec}")
    if codec == "uqdm":
        box_prior = bool(options.get("box_prior", True))
        keep = _keep_shares(model, keep, box_prior=box_prior)
        if keep is not None:
            options["keep"] = keep
        params = model.header_params(box_prior=box_prior, keep=keep)
    else:
        params = model.header_params()
    header = container.Header(codec, model.model_id, model.model_hash, w, h, ch, int(seed), params=params)
    if "parts" in options:
        options["parts"] = _check_parts(options["parts"], codec)
    # rate control by a kept share (_KeptFit) for the default uqdm files; files coding every coordinate, or
    # written without box priors, keep the rule before: the longest prefix of a file in parts
    kept_fit = codec == "uqdm" and bpp is not None and "parts" not in options and keep is not None and box_prior
    if codec == "uqdm" and bpp is not None and "parts" not in options and not kept_fit:
        options["parts"] = DEFAULT_PARTS
    if bpp is not None:
        if bpp <= 0:
            raise DiffcodecError("bpp must be positive")
        head = len(container.header_bytes(header))  # the same for every kept share: one byte per step
        budget = bpp * h * w / 8.0
        sizes: list[int] = []  # the sections' sizes in the file, as they arrive

        def over_budget(secs) -> bool:
            sizes.extend(container.section_size(sec) for sec in secs[len(sizes):])
            return head + sum(sizes) > budget

        fit = _KeptFit(model, header, keep, budget, pixels[:ch, :h, :w]) if kept_fit else None
        sections = model.encode(pixels, seed, T, lossless=False, region=(ch, h, w), progress=progress,
                                stop=over_budget, fit=fit, **options)
        if fit is not None and fit.chosen is not None:
            header, sections = fit.chosen
        else:
            over_budget(sections)
            # encoding stops after the first step over budget: keep the longest prefix that fits
            total, n = head, 0
            while n < len(sections) and total + sizes[n] <= budget:
                total += sizes[n]
                n += 1
            if n == 0:
                raise DiffcodecError(f"cannot reach {bpp} bpp with model {model.model_id}: its first section "
                                     f"already takes {8.0 * (head + sizes[0]) / (h * w):.3f} bpp")
            sections = sections[:n]
    else:
        if steps is None and not lossless:
            steps = int(getattr(model, "card", {}).get("default_steps", max(1, T // 2)))
        if not lossless and not 1 <= steps <= T:
            raise DiffcodecError(f"steps must be in 1..{T} for model {model.model_id}")
        sections = model.encode(pixels, seed, steps or T, lossless=lossless, region=(ch, h, w),
                                progress=progress, **options)
    data = container.pack(header, sections)
    steps_of = _section_steps(sections)
    reports = [_section_report(s, container.section_size(s), k) for s, k in zip(sections, steps_of)]
    n_steps = sum(1 for s in sections if s.kind == 0)
    keep = _codec_params(header).get("keep") if codec == "uqdm" else None
    return EncodeResult(data, codec, model.model_id, w, h, n_steps, bool(lossless), reports,
                        keep=None if keep is None else tuple(keep))


class _KeptFit:
    """Rate control of a uqdm file with kept shares (``compress(bpp=...)``): once a step is over budget, the
    file ends with one step coding the largest share of its coordinates that fits.

    Candidates (:class:`~diffcodec.diffusion.StepRecoder`): the step over budget at a smaller share; the step
    before it at the larger share that fits; the file without the step over budget.  The first is better
    far from the steps before, the second close to them, and the third where a step's extra coordinates
    would cost PSNR (a coded coordinate whose prior is narrower than its quantisation noise is worse than
    the prior mean: step 3 of ``uqdm-medium12`` reconstructs better at its 80% than at 100%).  The encoder
    decodes them and keeps the one nearest the image (mean squared error: the choice is the encoder's, any
    file decodes).  Shares are searched by bisection (bits grow with the share); only the recoded step's
    entropy coding is repeated.
    ``chosen``: (header, sections) once fitted, None if the encode ended without going over budget.
    """

    def __init__(self, model, header: container.Header, keep: tuple[int, ...], budget: float, image: np.ndarray):
        self.model, self.header, self.keep, self.budget, self.image = model, header, keep, budget, image
        self.head = len(container.header_bytes(header))
        self.chosen: tuple[container.Header, list] | None = None

    def _header(self, keep: tuple[int, ...]) -> container.Header:
        params = self.model.header_params(box_prior=True, keep=keep)
        return dataclasses.replace(self.header, params=params)

    def _size(self, sections) -> int:
        return self.head + sum(container.section_size(s) for s in sections)

    def _largest(self, recoder, i: int, lo: tuple[int, int], hi: tuple[int, int] | None):
        """(keep, sections) with step i at the largest share whose file fits, or None.  ``lo`` = (share,
        file bytes) known to fit (share 0: the file without step i), ``hi`` the same known not to (None:
        share 255 is tried first).  Interpolation in bytes for two guesses, then bisection."""
        T, best, guesses = self.model.num_steps, None, 0

        def code(v: int):
            keep = (*self.keep[: T - i], v, *self.keep[T - i + 1:])
            secs = recoder.recode(i, keep=keep)
            return keep, secs, self._size(secs)

        if hi is None:
            keep, secs, size = code(KEEP_ALL)
            if size <= self.budget:
                return keep, secs
            hi = (KEEP_ALL, size)
        while hi[0] - lo[0] > 1:
            if guesses < 2 and hi[1] > lo[1]:
                v = lo[0] + int((self.budget - lo[1]) / (hi[1] - lo[1]) * (hi[0] - lo[0]))
                v = min(max(v, lo[0] + 1), hi[0] - 1)
                guesses += 1
            else:
                v = (lo[0] + hi[0]) // 2
            keep, secs, size = code(v)
            if size <= self.budget:
                best, lo = (keep, secs), (v, size)
            else:
                hi = (v, size)
        return best

    def _error(self, recoder, i: int, keep: tuple[int, ...], sections) -> float:
        """Mean squared error of the image the file decodes to (denoise, channel-aware)."""
        header = self._header(keep)
        out = _to_image(self.model, header, recoder.decoded(i, sections, keep), "denoise", None, True)
        ref = self.image.transpose(1, 2, 0)[:, :, : out.shape[2]]
        return float(np.mean((out.astype(np.float64) - ref) ** 2))

    def __call__(self, recoder) -> list:
        T, over = self.model.num_steps, recoder.steps[0]
        before = recoder.before(over)
        several = len(recoder.steps) > 1  # the file without the step over budget is a candidate too
        cands = []  # (error, keep, sections): the step over budget first, so that it wins a tie
        if over >= 2:  # the last step codes every coordinate: its latent is z_0
            share = self.keep[T - over]
            found = self._largest(recoder, over, (0, self._size(before)), (share, self._size(recoder.coded)))
            if found is not None:
                cands.append((self._error(recoder, over, *found) if several else 0.0, *found))
        if several:
            prev = recoder.steps[1]
            if prev >= 2:
                found = self._largest(recoder, prev, (self.keep[T - prev], self._size(before)), None)
                if found is not None and found[0] != self.keep:
                    cands.append((self._error(recoder, prev, *found), *found))
            cands.append((self._error(recoder, prev, self.keep, before), self.keep, before))
        if not cands:
            raise DiffcodecError(f"cannot reach {8.0 * self.budget / self.image[0].size:g} bpp with model "
                                 f"{self.model.model_id}: its first step takes more even at its smallest share")
        _, keep, sections = min(cands, key=lambda c: c[0])
        self.chosen = (self._header(keep), sections)
        return sections


def _check_parts(parts, codec: str) -> tuple[float, ...]:
    """uqdm step parts as a tuple of increasing fractions in (0, 1) (a comma list or a sequence; "none" or
    an empty sequence: whole steps)."""
    if codec != "uqdm":
        raise DiffcodecError(f"parts apply to uqdm models, not {codec}")
    if isinstance(parts, str) and parts.strip().lower() in ("", "none"):
        return ()  # whole steps only
    try:
        fr = tuple(float(f) for f in (parts.split(",") if isinstance(parts, str) else parts))
    except (TypeError, ValueError):
        raise DiffcodecError(f"parts must be fractions in (0, 1), got {parts!r}") from None
    if not all(0.0 < f < 1.0 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
        raise DiffcodecError(f"parts must be increasing fractions in (0, 1), got {parts!r}")
    return fr


def _section_steps(sections) -> list[int | None]:
    """The step each section belongs to (a part: the step it is part of; the lossless section: None)."""
    out, done = [], 0
    for sec in sections:
        if sec.kind == 0:
            done += 1
            out.append(done)
        else:
            out.append(done + 1 if sec.kind == 4 else None)
    return out


def _compress_rvgc(model, pixels, h, w, ch, seed, bpp, q, progress, options) -> EncodeResult:
    """RVGC: one latent coded at step q, or the smallest q in the model's range whose file fits ``bpp``."""
    if options:
        raise DiffcodecError(f"rvgc has no encoder options {sorted(options)}")
    if bpp is not None and q is not None:
        raise DiffcodecError("give q or bpp, not both")
    y = model.analyse(pixels)

    def encode_at(qv: float):
        header = container.Header("rvgc", model.model_id, model.model_hash, w, h, ch, int(seed),
                                  params=model.header_params(qv))
        sections, _ = model.encode_latent(y, qv)
        return container.pack(header, sections), sections

    if bpp is not None:
        if not bpp > 0:
            raise DiffcodecError("bpp must be positive")
        budget = bpp * h * w / 8.0
        lo, hi = (math.log(v) for v in model.q_range)
        data, sections = encode_at(model.q_range[1])
        if len(data) > budget:
            raise DiffcodecError(f"cannot reach {bpp} bpp with model {model.model_id}: its largest q "
                                 f"({model.q_range[1]:g}) gives {8.0 * len(data) / (h * w):.4f} bpp")
        best = (model.q_range[1], data, sections)
        data, sections = encode_at(model.q_range[0])
        if len(data) <= budget:
            best = (model.q_range[0], data, sections)
        else:  # bisection on log q; the rate decreases with q (up to coding noise, so keep the best fit)
            for _ in range(14):
                mid = 0.5 * (lo + hi)
                qm = math.exp(mid)
                data, sections = encode_at(qm)
                if len(data) <= budget:
                    hi = mid
                    if qm < best[0]:
                        best = (qm, data, sections)
                else:
                    lo = mid
        q, data, sections = best
    else:
        if q is None:
            q = float(getattr(model, "card", {}).get("default_q", math.sqrt(model.q_range[0] * model.q_range[1])))
        q = model.check_q(float(q))
        data, sections = encode_at(q)
    if progress:
        progress(len(sections))
    reports = [_section_report(s, container.section_size(s), i + 1) for i, s in enumerate(sections)]
    return EncodeResult(data, "rvgc", model.model_id, w, h, 0, False, reports, q=q)


def _codec_params(header: container.Header) -> dict:
    """The codec parameters of a file header, validated, as a dict (for info; no model is loaded)."""
    from .models import _codec_classes

    return _codec_classes().get(header.codec, DiffusionModel).parse_header_params(header.params)


def _model_for(header: container.Header, model):
    if model is None:
        # a file's model name is looked up, never opened as a path
        if find_model(header.model_id) is None:
            if RETIRED_MODELS.get(header.model_id) == header.model_hash:
                raise ModelError(f"file was encoded with model {header.model_id!r} (hash {header.model_hash}), which "
                                 f"{retired_hint(header.model_id)}, or pass it with --model PATH")
            raise ModelError(f"file was encoded with model {header.model_id!r} (hash {header.model_hash}), which is "
                             f"neither bundled nor in ${MODEL_PATH_ENV}: put its .safetensors in a directory on "
                             "that path (a retired model: scripts/archived_model.py in the repository) or pass "
                             "it with --model PATH")
        m = get_model(header.model_id)
    else:
        m = _as_model(model, header.codec)
    if m.model_hash != header.model_hash:
        raise ModelError(f"wrong model: file needs {header.model_id!r} (hash {header.model_hash}), "
                         f"got {m.model_id!r} (hash {m.model_hash})")
    if m.codec_id != header.codec:
        raise ModelError(f"file is {header.codec} but model {m.model_id} is {m.codec_id}")
    m.check_header_params(header.params)
    return m


def _open(data: bytes, model, steps: int | None, max_pixels: int | None = None):
    """Parse a file and pick its model; returns (header, model, step sections, final sections, shape)."""
    cont = container.unpack(bytes(data), limits=container.Limits.default(max_pixels))
    hd = cont.header
    m = _model_for(hd, model)
    d = m.downscale
    if hd.codec == "rvgc":  # hyper-latent and latent sections; the latent shape is (M, H/16, W/16)
        if not cont.sections:
            raise DecodeError("the file holds no complete section to decode")
        if steps is not None:
            raise DiffcodecError("rvgc files have no steps to choose")
        shape = (1, m.M, (hd.height + (-hd.height % d)) // d, (hd.width + (-hd.width % d)) // d)
        return hd, m, cont.sections, [], shape
    step_secs = [s for s in cont.sections if s.kind in (0, 4)]  # steps and step parts
    final = [s for s in cont.sections if s.kind == 1]
    if not step_secs:
        raise DecodeError("the file holds no complete section to decode")
    if steps is not None:
        if steps < 1:
            raise DiffcodecError("steps must be >= 1")
        ends = [n for n, s in enumerate(step_secs, 1) if s.kind == 0]
        if steps > len(ends):
            raise DiffcodecError(f"the file holds only {len(ends)} complete step(s); cannot decode {steps}")
        step_secs, final = step_secs[: ends[steps - 1]], []
    shape = (1, m.channels, hd.height + (-hd.height % d), hd.width + (-hd.width % d))
    return hd, m, step_secs, final, shape


def parse_keep(text: str) -> float | list[float] | None:
    """uqdm kept shares as text (``--keep``, ``train --keep-chain``, ``scripts/val_bpd.py --keep``): one
    fraction, a comma list of them (one per step but the last), or ``default`` (None: the model's default
    shares).  ValueError for anything else; the values are checked against a model by :func:`_keep_shares`."""
    if text.strip() == "default":
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"not 'default', a fraction or a comma list of fractions: {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def _keep_shares(model, keep, box_prior: bool = True) -> tuple[int, ...] | None:
    """uqdm ``keep``: a fraction in (0, 1] for every coding step but the last two (the steps whose
    coordinates the later steps hardly miss, README, UQDM kept coordinates), or one fraction per coding
    step 1..T-1, or None: the model's default (every coordinate without ``box_prior``: the format of the
    versions before both); as 255ths (the header's bytes), or None when every step keeps all (the format
    before)."""
    T = model.num_steps
    if keep is None:
        keep = model.default_keep() if box_prior else 1.0
    fr = [float(keep)] * max(0, T - 2) + [1.0] * min(T - 1, 1) if isinstance(keep, (int, float)) \
        else [float(v) for v in keep]
    if len(fr) != T - 1 or not all(0.0 < f <= 1.0 for f in fr):
        raise DiffcodecError(f"keep: a fraction in (0, 1], or {T - 1} of them (one per step but the last)")
    shares = tuple(max(1, min(255, round(f * 255))) for f in fr)
    return None if all(v == 255 for v in shares) else shares


def _coding(header: container.Header) -> dict:
    """How a uqdm file's steps were coded, from its header, as the decoder's keyword arguments:
    ``box_prior`` (each step's prior restricted to the earlier steps' box, files since 2026-12-07) and
    ``keep`` (the steps' kept shares of their coordinates, or None: every coordinate)."""
    p = _codec_params(header)
    return {"box_prior": bool(p.get("box_prior", False)), "keep": p.get("keep")}


def _check_method(method: str) -> None:
    if method not in RECONSTRUCTION_METHODS:
        raise DiffcodecError(f"unknown method {method!r}; choose from {', '.join(RECONSTRUCTION_METHODS)}")


def _crop(pix: np.ndarray, hd: container.Header) -> np.ndarray:
    """uint8 (H, W, C) of the image region of padded (1, C, Hp, Wp) pixels; gray files averaged to 1 channel."""
    out = pix[0, :, : hd.height, : hd.width].transpose(1, 2, 0)
    if hd.channels == 1:
        out = np.round(out.astype(np.float64).mean(axis=2, keepdims=True)).astype(np.uint8)
    return np.ascontiguousarray(out)


def _to_image(m, hd: container.Header, state, method: str, nfe: int | None, channel_aware: bool):
    """uint8 (H, W, C) reconstruction of a received state, cropped, gray files averaged to 1 channel."""
    rng = SeededStream(hd.seed, ANCESTRAL)
    z, gamma = state.latent(channel_aware, method)
    pix = m.reconstruct(z, gamma, method=method, nfe=nfe, rng=rng, default_steps=max(1, state.remaining),
                        box=state.box if channel_aware else None)
    return _crop(pix, hd)


def decompress(data: bytes, model=None, steps: int | None = None, method: str = "denoise",
               nfe: int | None = None, progress=None, max_pixels: int | None = None,
               deterministic: bool = False, sampler_steps: int | None = None, eta: float | None = None,
               channel_aware: bool = True) -> np.ndarray:
    """Decode .dfc bytes (complete or a truncated prefix) to uint8 (H, W, C).

    ``steps``: use only the first ``steps`` diffusion-step sections (default: all present; a
    present lossless section is then applied).  ``method``: reconstruction from the last
    received latent (``denoise``, ``ancestral`` or ``flow``); ``nfe`` network evaluations for
    ancestral/flow (default: the codec's remaining steps).  ``max_pixels``: refuse files declaring
    a larger image before allocating anything (default: ``$DIFFCODEC_MAX_PIXELS`` or 25 MP);
    ``info(data)["complete"]`` tells whether a file holds all its sections.
    ``channel_aware``: diffc files reconstruct from the last step with the reverse channel coder's
    shortfall undone (:func:`diffcodec.codecs.diffc.undo_shortfall`); uqdm files use the box the last
    step puts x in (``denoise``: the posterior mean inside it, ``flow``/``ancestral``: projected onto
    it; :mod:`diffcodec.codecs.box`).  ``False`` reconstructs from the received latent as it is (what the
    decoder did before channel-aware reconstruction; the files and the lossless finish are the same
    either way).

    rvgc files: the latent is reversed to a sample by the few-step stochastic sampler
    (``sampler_steps`` network evaluations, default from the model; randomness ``eta`` in [0, 1])
    before synthesis; ``deterministic=True`` gives the plain synthesis of the decoded latent.
    A file holding only its hyper-latent section decodes to a preview from the prior mean.
    """
    _check_method(method)
    hd, m, step_secs, final, shape = _open(data, model, steps, max_pixels)
    if hd.codec == "rvgc":
        if not channel_aware:
            raise DiffcodecError("channel_aware applies to diffc and uqdm files (rvgc has no steps)")
        return _decode_rvgc(m, hd, step_secs, shape, deterministic, sampler_steps, eta, progress)
    if deterministic or sampler_steps is not None or eta is not None:
        raise DiffcodecError("deterministic / sampler_steps / eta apply to rvgc files; use method and nfe")
    # a lossless section that conditions on the last step's prior remembers its network evaluation
    with m.reuse_evaluations() if final and m.final_uses_last_step else contextlib.nullcontext():
        state = m.decode_latent(shape, hd.seed, step_secs, progress=progress, **_coding(hd))
        if final and state.remaining == 0:
            pix = m.decode_final(state, final[0], (hd.channels, hd.height, hd.width), hd.seed)
            return np.ascontiguousarray(pix.transpose(1, 2, 0))
    return _to_image(m, hd, state, method, nfe, channel_aware)


def _decode_rvgc(m, hd, sections, shape, deterministic, sampler_steps, eta, progress) -> np.ndarray:
    q = m.check_header_params(hd.params)["q"]
    y_hat = m.decode_latent_rvgc(sections, q, shape)
    if progress:
        progress(len(sections))
    pix = m.reconstruct_rvgc(y_hat, q, deterministic=deterministic, sampler_steps=sampler_steps, eta=eta,
                             rng=SeededStream(hd.seed, ANCESTRAL), pixels=hd.height * hd.width)
    return _crop(pix, hd)


def decode_steps(data: bytes, model=None, methods: tuple[str, ...] = ("denoise",), nfe: int | None = None,
                 at: set[int] | None = None, max_pixels: int | None = None, channel_aware: bool = True,
                 parts: bool = False):
    """Decode the step sections once, yielding ``(k, {method: image})`` after step k.

    Each image equals ``decompress(data, steps=k, method=method, nfe=nfe, channel_aware=...)`` (a file cut after
    step k), without decoding the file again for every k: for progressive display and RD
    measurements.  ``at`` restricts which k are reconstructed (all are still decoded).  ``parts=True``
    yields after every section instead, k counting the sections (uqdm step parts included): each image
    is what the file cut after its k-th section decodes to.
    """
    for method in methods:
        _check_method(method)
    hd, m, step_secs, _, shape = _open(data, model, None, max_pixels)
    if hd.codec == "rvgc":
        raise DiffcodecError("rvgc files are not progressive; use decompress")
    # x_hat(z_k) and step k+1's prior evaluate the network at the same z_k (unless a diffc reconstruction
    # starts from the channel-aware latent instead)
    with m.reuse_evaluations():
        k = 0
        for n, state in enumerate(m.iter_latents(shape, hd.seed, step_secs, **_coding(hd)), 1):
            if not parts and state.part:
                continue
            k = n if parts else k + 1
            if at is None or k in at:
                yield k, {method: _to_image(m, hd, state, method, nfe, channel_aware) for method in methods}


def info(data: bytes, max_pixels: int | None = None) -> dict:
    """Describe a .dfc file without decoding it (checksums and limits are verified, as by decompress).

    ``complete`` is false for a partial file (``sections_in_file`` of ``sections_encoded``;
    ``truncated``: it ends inside a section, which is not counted).
    """
    cont = container.unpack(bytes(data), limits=container.Limits.default(max_pixels))
    hd = cont.header
    secs = []
    for sec, step, off, size in zip(cont.sections, _section_steps(cont.sections), cont.offsets, cont.sizes):
        secs.append({"index": sec.index, "kind": KIND_NAMES.get(sec.kind, str(sec.kind)),
                     "step": step, "offset": off, "bytes": size})
    return {
        "format_version": container.FORMAT_VERSION, "codec": hd.codec, "model": hd.model_id,
        "model_hash": hd.model_hash, "width": hd.width, "height": hd.height, "channels": hd.channels,
        **_codec_params(hd), "sections_in_file": len(cont.sections),
        "sections_encoded": hd.num_sections, "complete": cont.complete, "truncated": cont.truncated,
        "file_bytes": len(data),
        "bpp": 8.0 * len(data) / (hd.width * hd.height), "sections": secs,
    }


def list_models() -> list[dict]:
    """Bundled models, then those on ``$DIFFCODEC_MODEL_PATH``, with their properties (model cards)."""
    out = []
    found = [(n, p, True) for n, p in bundled_models().items()] + [(n, p, False) for n, p in path_models().items()]
    for name, path, bundled in found:
        try:
            meta = read_metadata(path)
        except ModelError as e:
            out.append({"name": name, "bundled": bundled, "error": str(e)})
            continue
        cfg, card = meta["config"], meta["card"]
        extra = {"q_range": cfg["q_range"]} if "q_range" in cfg else {}
        if cfg.get("codec") == "uqdm":
            extra["noise_basis"] = cfg.get("noise_basis", "rgb")
            if cfg.get("final_basis"):
                extra["final_basis"] = cfg["final_basis"]
        out.append({"name": name, "codec": cfg.get("codec"), "steps": cfg.get("num_steps"), **extra,
                    "default": DEFAULT_MODELS.get(cfg.get("codec")) == name, "bundled": bundled,
                    "file_bytes": path.stat().st_size, **{k: v for k, v in card.items() if k != "train"}})
    return out

