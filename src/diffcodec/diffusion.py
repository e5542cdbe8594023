"""The diffusion core shared by the progressive codecs (uqdm, diffc).

``DiffusionModel`` owns a learned gamma schedule and a denoiser.  It provides

* training-time helpers in torch (x_hat, the 256-way p(x|z_0) likelihood);
* coding-time helpers in float64 numpy whose results are exactly reproducible: the network is
  evaluated in float64 and its outputs rounded to a fixed grid (see ``entropy.quantize_to_grid``);
* the three reconstructions every progressive codec offers from a received latent z_t:
  ``denoise`` (x_hat(z_t)), ``ancestral`` (sample the model's reverse steps) and ``flow``
  (deterministic probability-flow / DDIM steps).  ``ancestral`` needs the codec's own reverse
  step, supplied by subclasses via :meth:`sample_reverse_step`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .codecs.base import Section
from .entropy import decode_categorical, encode_categorical, quantize_to_grid, symbols_crc
from .errors import DecodeError, FormatError
from .networks import DenoiserUNet, UNetConfig
from .rng import Z_T, SeededStream
from .schedule import LinearGammaSchedule, alpha_sigma, pixel_to_unit, unit_to_pixel
from .threads import pool

EPS_GRID_BITS = 12  # eps_hat is O(1): 2^-12 grid keeps x_hat exact enough and rounding robust
AUX_GRID_BITS = 8  # raw log-scale outputs


RECONSTRUCTION_METHODS = ("denoise", "ancestral", "flow")
KIND_STEP, KIND_FINAL = 0, 1  # section kinds of the progressive codecs
KIND_PART = 4  # a leading part of a step written as several sections (UQDM step parts); its last part is a step

# Tiled evaluation (multiples of every supported network's downscale factor).  A halo of 32
# pixels covers the effective receptive field of the full-resolution denoisers well; networks
# with a pixel-unshuffle stem of factor p use p times both (same memory per tile, same halo in
# feature cells).  Changing these changes decoded bits: they are part of the format.
TILE = 384
HALO = 32

# Latents up to this many elements have a step's entropy coding overlapped with the next network
# evaluation (DiffusionModel.encode); larger ones code in step, so that the pending step's coding
# inputs (three latent-sized arrays for UQDM) never sit beside the next evaluation's memory.
PIPELINE_MAX_ELEMENTS = 1 << 23


class StepEncoding(NamedTuple):
    """An encoder's step (:meth:`DiffusionModel.begin_encode_step`): the chain latent ``z_s`` now, its
    entropy coding later (``finish()``: the Section, or the list of a step written in parts), and
    ``box(prev_box)``: the box the step puts x in within the earlier steps' one (:meth:`step_box`),
    from what the step itself knows (UQDM: which coordinates it coded)."""

    z_s: np.ndarray
    finish: Any
    box: Any


class StepRecoder:
    """The last two steps an encode stopped by rate control coded, recodable with other encoder options.

    Why: a budget between two steps is met best by a step coding only a share of its coordinates (UQDM
    kept coordinates), the share being the largest that fits; only the step's entropy coding depends on
    it, so the recoding starts from the chain latent the encoder already had, not from z_T.
    ``steps``: the step indices i (step t_i -> t_{i-1}) that can be recoded, the over-budget one first.
    """

    def __init__(self, model: DiffusionModel, x: np.ndarray, gam: np.ndarray, seed: int, options: dict,
                 history: list[tuple[int, np.ndarray, dict, int]], sections: list[Section]):
        self._model, self._x, self._gam, self._seed, self._options = model, x, gam, seed, options
        self._history = {i: (z, given, n) for i, z, given, n in history}
        self.coded = sections  # the file's sections as the encode coded them, the step over budget last
        self.steps = [i for i, *_ in reversed(history)]

    def before(self, i: int) -> list[Section]:
        """The file's sections before step i, as coded."""
        return self.coded[: self._history[i][2]]

    def recode(self, i: int, **options) -> list[Section]:
        """The file's sections up to step i, step i coded with ``options`` overriding the encode's."""
        z, given, n = self._history[i]
        step = self._model.begin_encode_step(z, self._x, i, self._gam, self._seed, **given,
                                             **{**self._options, **options})
        sec = step.finish()
        return self.coded[:n] + (sec if isinstance(sec, list) else [sec])

    def decoded(self, i: int, sections: list[Section], keep: Any = None) -> Received:
        """The decoder's state at the end of ``sections`` (a file from :meth:`recode` or :meth:`before`),
        replayed from step i with the encoder's latent and box before it: what decoding the whole file
        gives, without the network evaluations of the steps before (a box-prior encode: its box is the
        decoder's)."""
        z, given, n = self._history[i]
        states = self._model.iter_latents(z.shape, self._seed, sections[n:], keep=keep,
                                          start=(i, z, given.get("prior_box")))
        return collections.deque(states, maxlen=1)[0]


class PartView(NamedTuple):
    """A step decoded part by part, so far (:meth:`DiffusionModel.part_view`): the chain latent ``z_s`` once
    the step is complete (else None), the latent reconstructions start from (``z_view``), what the step says
    about x (``box``), and ``z_denoise``: where the denoise reconstruction starts instead, or None."""

    z_s: np.ndarray | None
    z_view: np.ndarray
    box: Any
    z_denoise: np.ndarray | None = None


class Received(NamedTuple):
    """The decoder's state after a step section.

    ``z`` at ``gamma`` is the chain latent: what the next step and the lossless section condition on,
    bit for bit the encoder's.  ``z_view`` at ``gamma_view`` is what reconstructions start from: the
    same latent for an exact channel (UQDM), for DiffC the chain latent with the channel coder's
    shortfall undone (:meth:`diffcodec.codecs.diffc.DiffC.decode_step_view`).  ``z_prev`` is the chain
    latent before the last decoded step, kept only for a model whose lossless section conditions on it
    (UQDM with a final basis; otherwise None).  ``box`` is what the last step says about x beyond the
    latent, for a channel-aware reconstruction (UQDM: :class:`diffcodec.codecs.box.StepBox`; else None).
    ``part`` marks the state after a leading part of a step: ``z``, ``gamma`` and ``remaining`` are still
    those before the step, and the view holds what its parts so far sent.
    """

    z: np.ndarray
    gamma: float
    remaining: int
    z_view: np.ndarray
    gamma_view: float
    z_prev: np.ndarray | None = None
    box: Any = None
    part: bool = False
    z_denoise: np.ndarray | None = None  # the denoise reconstruction's start instead of z_view (UQDM kept steps)

    def latent(self, channel_aware: bool = True, method: str = "denoise") -> tuple[np.ndarray, float]:
        """(latent, gamma) to reconstruct from: the view (for ``denoise`` ``z_denoise`` where there is one),
        or the chain latent as received."""
        if not channel_aware:
            return self.z, self.gamma
        if method == "denoise" and self.z_denoise is not None:
            return self.z_denoise, self.gamma_view
        return self.z_view, self.gamma_view


class DiffusionModel(nn.Module):
    """Schedule + denoiser; subclasses add the codec-specific loss and coding."""

    codec_id: str = ""

    def __init__(
        self,
        unet: UNetConfig | None = None,
        gamma_min: float = -12.3,
        gamma_max: float = 6.0,
        learn_gamma_min: bool = True,
        num_steps: int = 4,
    ):
        super().__init__()
        if not 1 <= num_steps <= 255:
            raise ValueError("num_steps must be in 1..255")
        self.num_steps = num_steps
        self.schedule = LinearGammaSchedule(gamma_min, gamma_max, learn_min=learn_gamma_min)
        self.net = DenoiserUNet(unet or UNetConfig())
        self._eval_memos: dict[int, dict] = {}  # per thread, see reuse_evaluations

    # ------------------------------------------------------------------ config
    def config_dict(self) -> dict:
        return {
            "codec": self.codec_id,
            "unet": self.net.config.to_dict(),
            "gamma_max": float(self.schedule.gamma_max),
            "num_steps": self.num_steps,
        }

    def header_params(self) -> bytes:
        """Codec parameters stored in the .dfc header (first byte: the step count T)."""
        return bytes([self.num_steps])

    @staticmethod
    def parse_header_params(params: bytes) -> dict:
        """The header's codec parameters as a dict (no model needed: for ``info``)."""
        if len(params) < 1 or params[0] < 1:
            raise FormatError("malformed codec parameters")
        return {"total_steps": params[0]}

    def check_header_params(self, params: bytes) -> dict:
        """Parse and check a file's codec parameters against this model (each codec has its own)."""
        if params != self.header_params():
            raise FormatError("the file's codec parameters do not match its model")
        return self.parse_header_params(params)

    @property
    def channels(self) -> int:
        return self.net.config.in_channels

    @property
    def downscale(self) -> int:
        return self.net.downscale

    # ------------------------------------------------------------------ torch (training)
    autocast_bf16: bool = False
    """Run the network under bf16 autocast in training (2x faster on CPU); losses stay fp32."""

    def net_train(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        if self.autocast_bf16:
            with torch.autocast(z.device.type, dtype=torch.bfloat16):
                out = self.net(z, gamma)
            return out.float()
        return self.net(z, gamma)

    def split_output(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.channels
        return out[:, :c], out[:, c : 2 * c]

    def x_hat_from_eps(self, z: torch.Tensor, eps: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(gamma)
        return torch.clamp((z - sigma * eps) / alpha, -1.0, 1.0)

    @staticmethod
    def data_log_probs(z0: torch.Tensor, gamma0: torch.Tensor) -> torch.Tensor:
        """log p(x = k | z_0) for k = 0..255, shape z0.shape + (256,).

        logits_k = -0.5 e^{-gamma_0} (z_0/alpha_0 - x_k)^2 (DESIGN §1); no network is involved.
        """
        alpha0, _ = alpha_sigma(gamma0)
        levels = pixel_to_unit(torch.arange(256, dtype=z0.dtype, device=z0.device))
        logits = -0.5 * torch.exp(-gamma0) * (z0[..., None] / alpha0 - levels) ** 2
        return torch.log_softmax(logits, dim=-1)

    TRAIN_DATA_WINDOW = 16
    """Training computes p(x | z_0)'s normaliser over the levels within this many of x only: the
    full 256-way softmax was 2/3 of a training step.  The levels left out sit >= 16 - |noise|
    levels from z_0 / alpha_0; the error is < 1e-9 nats per pixel at gamma_0 = -12 (where the
    schedules start and stay) and ~1e-4 at -8 (tests/test_networks.py).  Validation (eval mode)
    and coding always use all 256 levels."""

    def data_nll(self, z0: torch.Tensor, gamma0: torch.Tensor, x_int: torch.Tensor) -> torch.Tensor:
        """-log p(x | z_0) per element (nats) for integer pixels ``x_int`` (same shape as z0)."""
        if not self.training:
            return -torch.gather(self.data_log_probs(z0, gamma0), -1, x_int[..., None])[..., 0]
        w = self.TRAIN_DATA_WINDOW
        alpha0, _ = alpha_sigma(gamma0)
        k = x_int[..., None] + torch.arange(-w, w + 1, device=z0.device)
        levels = pixel_to_unit(k.to(z0.dtype))
        logits = -0.5 * torch.exp(-gamma0) * (z0[..., None] / alpha0 - levels) ** 2
        logits = logits.masked_fill((k < 0) | (k > 255), float("-inf"))
        return torch.logsumexp(logits, dim=-1) - logits[..., w]

    # ------------------------------------------------------------------ float64 (coding)
    def eval_f64(self, z: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
        """Network outputs (eps_hat, aux) at (z, gamma), float64, rounded to fixed grids.

        Inside :meth:`reuse_evaluations` a repeated call with the same gamma and the same z (compared
        by a 128-bit digest) returns the previous, read-only result instead of running the network.
        """
        memo = self._eval_memo
        if memo is None:
            return self.evaluate_network(z, gamma)
        key = (z.shape, float(gamma),
               hashlib.blake2b(np.ascontiguousarray(z, dtype=np.float64).data, digest_size=16).digest())
        if memo.get("key") != key:
            memo.clear()
            out = self.evaluate_network(z, gamma)
            for a in out:
                a.flags.writeable = False
            memo.update(key=key, out=out)
        return memo["out"]

    @property
    def _eval_memo(self) -> dict | None:
        """The calling thread's memo (None outside :meth:`reuse_evaluations`): a model shared by threads
        (``api.get_model`` caches models) never returns one thread's evaluation to another."""
        return self._eval_memos.get(threading.get_ident())

    @contextlib.contextmanager
    def reuse_evaluations(self) -> Iterator[None]:
        """Remember the last network evaluation while inside this context.

        Why: progressive decoding (:func:`diffcodec.decode_steps`) shows x_hat(z_k) after step k
        and then evaluates the network at the very same (z_k, gamma_k) for step k+1's prior, so
        half of its evaluations are repeats (for UQDM, and for DiffC with ``channel_aware=False``: DiffC's
        default reconstructions start from another latent, see :class:`Received`).  Off by default: the
        memo holds two latent-sized arrays.
        A cached result is the same array a fresh evaluation would return (same process, same input).
        """
        key = threading.get_ident()
        prev = self._eval_memos.get(key)
        self._eval_memos[key] = {}
        try:
            yield
        finally:
            if prev is None:
                self._eval_memos.pop(key, None)
            else:
                self._eval_memos[key] = prev

    @torch.inference_mode()
    def evaluate_network(self, z: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
        """One evaluation of the denoiser behind :meth:`eval_f64` (no memo).

        Large latents are processed in tiles of TILE x TILE pixels with a HALO of context on
        each side, so memory stays bounded for any image size.  The tiling depends only on the
        image size, so encoder and decoder compute exactly the same thing.
        """
        net = self.net
        if next(net.parameters()).dtype != torch.float64:
            net.double()
        g = torch.tensor([gamma], dtype=torch.float64)
        _, _, H, W = z.shape
        tile, halo = TILE * net.config.patch, HALO * net.config.patch
        if H <= tile + 2 * halo and W <= tile + 2 * halo:
            out = net(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float64)), g).numpy()
        else:
            out = np.empty((z.shape[0], net.config.out_channels, H, W), dtype=np.float64)
            for y0 in range(0, H, tile):
                for x0 in range(0, W, tile):
                    y1, x1 = min(H, y0 + tile), min(W, x0 + tile)
                    ya, xa = max(0, y0 - halo), max(0, x0 - halo)
                    yb, xb = min(H, y1 + halo), min(W, x1 + halo)
                    part = torch.from_numpy(np.ascontiguousarray(z[:, :, ya:yb, xa:xb], dtype=np.float64))
                    o = net(part, g).numpy()
                    out[:, :, y0:y1, x0:x1] = o[:, :, y0 - ya : y1 - ya, x0 - xa : x1 - xa]
        c = self.channels
        return quantize_to_grid(out[:, :c], EPS_GRID_BITS), quantize_to_grid(out[:, c : 2 * c], AUX_GRID_BITS)

    @staticmethod
    def x_hat_f64(z: np.ndarray, eps: np.ndarray, gamma: float) -> np.ndarray:
        alpha, sigma = alpha_sigma(np.float64(gamma))
        return np.clip((z - sigma * eps) / alpha, -1.0, 1.0)

    def gamma_grid(self, num_steps: int) -> np.ndarray:
        """gamma_i at t_i = i/T, i = 0..T, in float64."""
        return self.schedule.gammas_f64(np.arange(num_steps + 1, dtype=np.float64) / num_steps)

    @staticmethod
    def data_table_f64(z0: np.ndarray, gamma0: float) -> np.ndarray:
        """(n, 256) float64 table of p(x | z_0) for flat z0 (exactly reproducible)."""
        alpha0, _ = alpha_sigma(np.float64(gamma0))
        levels = pixel_to_unit(np.arange(256, dtype=np.float64))
        logits = -0.5 * np.exp(-gamma0) * (z0[:, None] / alpha0 - levels[None, :]) ** 2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    @staticmethod
    def z0_to_unit(z0: np.ndarray, gamma0: float) -> np.ndarray:
        """z_0 / alpha_0: rounded to the pixel grid (:func:`unit_to_pixel`), the mode of p(x | z_0)."""
        alpha0, _ = alpha_sigma(np.float64(gamma0))
        return z0 / alpha0

    @classmethod
    def z0_to_pixels(cls, z0: np.ndarray, gamma0: float) -> np.ndarray:
        """Mode of p(x | z_0): the pixel level nearest to z_0 / alpha_0."""
        return unit_to_pixel(cls.z0_to_unit(z0, gamma0))

    # ------------------------------------------------------------------ reconstructions
    def sample_reverse_step(
        self, z: np.ndarray, eps: np.ndarray, aux: np.ndarray, gamma_s: float, gamma_t: float, rng: SeededStream
    ) -> np.ndarray:
        """Draw z_s ~ p(z_s | z_t) (codec-specific)."""
        raise NotImplementedError

    def reconstruct(
        self,
        z: np.ndarray,
        gamma_t: float,
        method: str = "denoise",
        nfe: int | None = None,
        rng: SeededStream | None = None,
        default_steps: int = 1,
        box: Any = None,
    ) -> np.ndarray:
        """Pixels (uint8, N C H W) from a received latent z at gamma_t.

        ``nfe`` is the number of network evaluations for ``ancestral``/``flow``: the remaining
        interval [0, t] is split uniformly in t into that many steps (default ``default_steps``,
        the codec's remaining step count).  ``box``: the last step's :attr:`Received.box`, which a
        codec may use (UQDM, :meth:`diffcodec.codecs.uqdm.UQDM.reconstruct_unit`); this default ignores it.
        """
        return unit_to_pixel(self.reconstruct_unit(z, gamma_t, method, nfe, rng, default_steps, box))

    def reconstruct_unit(self, z: np.ndarray, gamma_t: float, method: str = "denoise", nfe: int | None = None,
                         rng: SeededStream | None = None, default_steps: int = 1, box: Any = None) -> np.ndarray:
        """:meth:`reconstruct` before rounding: x at unit scale (float64, N C H W; clipped by the rounding)."""
        if method not in RECONSTRUCTION_METHODS:
            raise ValueError(f"unknown reconstruction method {method!r}; choose from {RECONSTRUCTION_METHODS}")
        g0 = float(self.schedule.gammas_f64([0.0])[0])
        g1 = float(self.schedule.gammas_f64([1.0])[0])
        if method == "denoise" or gamma_t <= g0:
            if gamma_t <= g0:
                return self.z0_to_unit(z, g0)
            eps, _ = self.eval_f64(z, gamma_t)
            return self.x_hat_f64(z, eps, gamma_t)
        n = max(1, int(nfe or default_steps))
        t_now = (gamma_t - g0) / (g1 - g0)
        ts = np.linspace(t_now, 0.0, n + 1)
        gammas = g0 + (g1 - g0) * ts
        for gt, gs in zip(gammas[:-1], gammas[1:]):
            eps, aux = self.eval_f64(z, float(gt))
            if method == "flow":
                x_hat = self.x_hat_f64(z, eps, float(gt))
                a_t, s_t = alpha_sigma(np.float64(gt))
                a_s, s_s = alpha_sigma(np.float64(gs))
                z = (s_s / s_t) * z + (a_s - a_t * s_s / s_t) * x_hat
            else:
                if rng is None:
                    raise ValueError("ancestral reconstruction needs a random stream")
                z = self.sample_reverse_step(z, eps, aux, float(gs), float(gt), rng)
        return self.z0_to_unit(z, g0)

    # ------------------------------------------------------------------ progressive coding
    def encode_step(self, z: np.ndarray, x: np.ndarray, i: int, gam: np.ndarray, seed: int, **options):
        """Code step t_i -> t_{i-1} of image x from the shared z_t; returns (z_s, Section).

        ``options`` are encoder-only choices of the codec (e.g. DiffC's ``c_max``): whatever the
        decoder needs from them is written into the section.
        """
        raise NotImplementedError

    def decode_step(self, z: np.ndarray, sec: Section, i: int, gam: np.ndarray, seed: int) -> np.ndarray:
        """Inverse of :meth:`encode_step`: the same z_s, bit for bit."""
        raise NotImplementedError

    def decode_step_view(self, z: np.ndarray, sec: Section, i: int, gam: np.ndarray, seed: int, **kw
                         ) -> tuple[np.ndarray, np.ndarray, float]:
        """(z_s, z_view, gamma_view): :meth:`decode_step` plus the latent reconstructions start from.

        The default is z_s itself at gamma_s, right when z_s is an exact sample of q(z_s | z_t, x).
        ``kw``: what the encoder's step was given besides its options (UQDM: ``prior_box``).
        """
        z_s = self.decode_step(z, sec, i, gam, seed, **kw)
        return z_s, z_s, float(gam[i - 1])

    def begin_encode_step(self, z: np.ndarray, x: np.ndarray, i: int, gam: np.ndarray, seed: int,
                          **options) -> StepEncoding:
        """Like :meth:`encode_step`, but returns a :class:`StepEncoding` whose ``finish()`` returns the
        Section (or the list of sections of a step written in parts: UQDM's ``parts`` option).

        A codec whose z_s does not depend on the coded bits (UQDM: z_s follows from the symbols, the
        range coder only writes them) leaves the entropy coding to ``finish``, so :meth:`encode`
        can run it while the network evaluates the next step.  The default finishes at once.
        """
        z_s, sec = self.encode_step(z, x, i, gam, seed, **options)
        return StepEncoding(z_s, lambda: sec, lambda prev_box: self.step_box(z, z_s, i, gam, prev_box))

    def initial_latent(self, shape: tuple[int, ...], seed: int) -> np.ndarray:
        """z_T ~ N(0, I) from the shared seed: costs 0 bits."""
        return SeededStream(seed, Z_T).normal(shape)

    def encode(self, pixels: np.ndarray, seed: int, num_steps: int, lossless: bool,
               region: tuple[int, int, int] | None = None, progress=None, stop=None, box_prior: bool = True,
               fit=None, **options) -> list[Section]:
        """Code ``num_steps`` steps (and the final lossless section if ``lossless``).

        ``box_prior``: code each step under its prior restricted to the symbols whose box meets the box
        the steps before put x in (UQDM, :meth:`step_box`; the file's header says so, and
        :meth:`iter_latents` must be given the same choice).  Codecs without boxes ignore it.

        ``stop(sections)``, if given, is asked after every step whether to stop early (rate
        control: once the file is over budget the finer, costlier steps need not be coded).  ``fit``, if
        given with ``stop``, then returns the file's sections from a :class:`StepRecoder` of the last two
        steps (the one over budget and the one before), under which network evaluations are remembered.
        ``progress(1)`` is called as each step's sections are complete (from the coder thread, see below).

        ``pixels``: uint8 (C, H, W), already padded to a multiple of ``downscale`` (gray images
        repeated to the model's channels); ``region`` is the (channels, height, width) of the real
        image: the lossless section codes only those pixels.

        Pipelining: a step's ``finish`` (its entropy coding) runs in a coder thread while the main
        thread evaluates the network for the next step; at most one step is pending, so the extra
        memory is one step's coding inputs, and only for latents up to ``PIPELINE_MAX_ELEMENTS``.
        Rate control (``stop``) needs every section's size at once, so it codes in step.  The
        sections, and so the file, are the same either way (tested).
        """
        T = self.num_steps
        if lossless:
            num_steps = T
        if not 1 <= num_steps <= T:
            raise ValueError(f"steps must be in 1..{T}")
        x = pixel_to_unit(pixels.astype(np.float64))[None]
        gam = self.gamma_grid(T)
        z = self.initial_latent(x.shape, seed)
        pipelined = (stop is None or lossless) and x.size <= PIPELINE_MAX_ELEMENTS

        def finished(finish) -> list[Section]:
            sec = finish()  # a section, or a step's parts
            if progress:
                progress(1)
            return sec if isinstance(sec, list) else [sec]

        sections: list[Section] = []
        pending = None
        final = None
        coder = pool("coder", 1)
        z_prev = None  # the latent before the last step, kept only for a lossless section (memory)
        box = None  # what the steps so far say about x (the decoder's Received.box)
        # a lossless section that conditions on the last step's prior remembers its network evaluation, and so
        # does a fit (its recodes of the step over budget start from the latent the step was coded from)
        remember = (lossless and self.final_uses_last_step) or fit is not None
        with self.reuse_evaluations() if remember else contextlib.nullcontext():
            try:
                last = T - num_steps + 1
                history: list = []  # (i, z_t, the step's prior box, sections before it) of the last two steps
                for i in range(T, last - 1, -1):
                    z_prev = z if lossless else None
                    given = {"prior_box": box} if box is not None else {}
                    if fit is not None:
                        history = [*history[-1:], (i, z, given, len(sections))]
                    z, finish, box_of = self.begin_encode_step(z, x, i, gam, seed, **given, **options)
                    if box_prior and i > last:  # only the next step's prior uses the box
                        box = box_of(box)
                    if pending is not None:
                        sections.extend(pending.result())
                        pending = None
                    if pipelined:
                        pending = coder.submit(finished, finish)
                        continue
                    sections.extend(finished(finish))
                    if stop is not None and not lossless and stop(sections):
                        if fit is not None:
                            sections = fit(StepRecoder(self, x, gam, seed, options, history, sections))
                        break
                if lossless:  # coded here while the last step finishes in the coder thread
                    final = self.encode_final(pixels, region or pixels.shape, z_prev, z, gam, seed)
                if pending is not None:
                    sections.extend(pending.result())
                    pending = None
            finally:
                if pending is not None and not pending.cancel():  # an error in the main thread:
                    pending.exception()  # let the coder finish before unwinding
        if final is not None:
            sections.append(final)
        return sections

    @property
    def final_uses_last_step(self) -> bool:
        """Whether the lossless section conditions on the last step's prior (one network evaluation at
        z_prev, which encoder and decoder then remember from the step instead of repeating it)."""
        return False

    def encode_final(self, pixels: np.ndarray, region: tuple[int, int, int], z_prev: np.ndarray, z0: np.ndarray,
                     gam: np.ndarray, seed: int) -> Section:
        """The lossless section: the ``region`` of uint8 ``pixels`` (C, H, W) under p(x | z_0), given the
        chain's z_0 (and z_prev, the latent before the last step, which this default does not use)."""
        c, h, w = region
        sym = pixels[:c, :h, :w].reshape(-1).astype(np.int64)
        payload, ideal = encode_categorical(sym, 256, self._data_table(z0[0, :c, :h, :w], float(gam[0])))
        return Section(KIND_FINAL, self.num_steps + 1, b"", payload, symbols_crc(sym), ideal)

    def _data_table(self, z0: np.ndarray, gamma0: float):
        flat = z0.reshape(-1)
        return lambda sl: self.data_table_f64(flat[sl], gamma0)

    def iter_latents(self, shape: tuple[int, ...], seed: int, sections: list[Section], box_prior: bool = True,
                     keep: tuple[int, ...] | None = None, start: tuple[int, np.ndarray, Any] | None = None):
        """Replay the step sections, yielding a :class:`Received` state (z, gamma of z, steps remaining
        to t = 0, and the latent reconstructions start from) after each.

        Every prefix of a file is a valid file, so every yielded latent is what a file cut after
        that section decodes to (progressive display, benchmarks).  A step written in parts yields a
        state after each part (``part=True`` before its last one).  ``box_prior``, ``keep``: as the
        encoder's (:meth:`encode`; the file's header says which).  ``start``: (i, z_t, box) to replay
        ``sections`` from step i on, the chain latent and box before it being known (:class:`StepRecoder`).
        """
        T = self.num_steps
        gam = self.gamma_grid(T)
        i, z, box = start if start is not None else (T, self.initial_latent(shape, seed), None)
        keep_prev = self.final_uses_last_step  # z_prev costs a latent's memory: only where it is used
        parts = None  # the step being decoded part by part
        # box: what the complete steps so far say about x (each step's box within the one before)
        for sec in sections:
            if sec.kind not in (KIND_STEP, KIND_PART):
                break
            if i < 1:
                raise DecodeError("step sections out of order")
            given = {"prior_box": box} if box_prior and box is not None else {}  # the step's prior, as encoded
            if keep is not None:
                given["keep"] = keep
            if sec.kind == KIND_PART or parts is not None or self.keeps_part(i, keep):
                if parts is None:
                    parts = self.begin_decode_parts(z, i, gam, seed, **given)
                self.decode_part(parts, sec, gam)
                view = self.part_view(parts, z, gam, box)
                if sec.kind == KIND_PART:
                    yield Received(z, float(gam[i]), i, view.z_view, float(gam[i - 1]), None, view.box, part=True)
                    continue
                box, z_view, z_denoise = view.box, view.z_view, view.z_denoise
                parts = None
                z_before, z, gamma_view = z, view.z_s, float(gam[i - 1])
            else:
                z_before, z_denoise = z, None
                z, z_view, gamma_view = self.decode_step_view(z, sec, i, gam, seed, **given)
                box = self.step_box(z_before, z, i, gam, box)
            i -= 1
            yield Received(z, float(gam[i]), i, z_view, gamma_view, z_before if keep_prev else None, box,
                           z_denoise=z_denoise)

    def keeps_part(self, i: int, keep: Any) -> bool:
        """Whether step t_i -> t_{i-1} codes only part of its coordinates (UQDM's ``keep``): False here."""
        return False

    def begin_decode_parts(self, z: np.ndarray, i: int, gam: np.ndarray, seed: int, **kw) -> Any:
        """Start decoding step t_i -> t_{i-1} written in parts (codecs that write them override this)."""
        raise DecodeError(f"{self.codec_id} files have no step parts (corrupt or foreign section kind)")

    def decode_part(self, state: Any, sec: Section, gam: np.ndarray) -> None:
        raise NotImplementedError

    def part_view(self, state: Any, z_t: np.ndarray, gam: np.ndarray, prev_box: Any = None) -> PartView:
        raise NotImplementedError

    def step_box(self, z_t: np.ndarray, z_s: np.ndarray, i: int, gam: np.ndarray, prev_box: Any = None) -> Any:
        """What decoded step t_i -> t_{i-1} says about x beyond z_s (:attr:`Received.box`), given what the
        steps before said (``prev_box``); None here."""
        return None

    def decode_latent(self, shape: tuple[int, ...], seed: int, sections: list[Section], progress=None,
                      box_prior: bool = True, keep: tuple[int, ...] | None = None) -> Received:
        """Replay the step sections; returns the last :class:`Received` state."""
        state = None
        for state in self.iter_latents(shape, seed, sections, box_prior, keep):  # noqa: B007 (the last one is kept)
            if progress:
                progress(1)
        if state is None:  # no step section: the shared starting latent z_T
            z, g = self.initial_latent(shape, seed), float(self.gamma_grid(self.num_steps)[-1])
            state = Received(z, g, self.num_steps, z, g)
        return state

    def decode_final(self, state: Received, sec: Section, region: tuple[int, int, int], seed: int) -> np.ndarray:
        """Pixels (c, h, w) of ``region`` from the lossless section, given the decoder's state after the
        last step (``state.z`` = z_0); this default codes them under p(x | z_0)."""
        gam0 = float(self.gamma_grid(self.num_steps)[0])
        c, h, w = region
        z0c = state.z[0, :c, :h, :w]
        sym = decode_categorical(sec.payload, z0c.size, 256, self._data_table(z0c, gam0))
        if symbols_crc(sym.astype(np.int64)) != sec.symbols_crc:
            raise DecodeError("lossless section decoded inconsistently (model or platform mismatch)")
        return sym.reshape(z0c.shape).astype(np.uint8)
