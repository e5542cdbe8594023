"""UQDM: progressive compression with universally quantized diffusion (Yang, Will, Mandt, ICLR 2025).

Forward step t -> s (s < t): q(z_s | z_t, x) = U(mu_Q - D/2, mu_Q + D/2), D = sqrt(12) beta, i.e.
the Gaussian posterior's mean and variance with uniform noise.  Reverse step:
p(z_s | z_t) = Logistic(mu_P, scale) * U(-D/2, D/2), with a learned per-pixel scale.

Coding a step with universal quantization: both sides know mu_P, the scale and D (one network
evaluation on the shared z_t) and draw the same dither u ~ U(-1/2, 1/2).  The sender codes
k = round((mu_Q - mu_P)/D + u) under P(k) = G(y_k + D/2) - G(y_k - D/2), y_k = mu_P + (k - u) D;
the receiver sets z_s = mu_P + (k - u) D, an exact sample of q(z_s | z_t, x).  z_T ~ N(0, I) comes
from the shared seed (0 bits).  After the last step x is coded under the 256-way p(x | z_0), so the
same file goes from lossy to lossless.

Noise basis (``noise_basis.py``).  The paper adds the uniform noise, and factorises the prior, along
the RGB sub-pixels.  A model may instead use an orthonormal basis M of the image (opponent colours,
optionally with a 4x4 DCT of each channel): z_s = mu_Q + M^T D u, and M (z_s - mu_P) is what is coded
per coordinate.  The network's errors are smooth and mostly luminance, so far fewer bits are spent
in a basis that compacts them; x, z, x_hat, the lossless term and the reconstructions stay in RGB.

Checkerboard context (``context.py``).  A model may code each step in two passes over the basis
blocks, in one range-coder stream: the second half of the blocks under a prior moved and rescaled
by their decoded neighbours.  k and z_s do not depend on the prior, so only the bits change.

The training loss is the exact expected code length of that procedure, in bits per dimension:
since z_s is exactly uniform around mu_Q, E[-log2 P(k)] = E_{z_s ~ q}[-log2(D p(z_s | z_t))].
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from .. import rng as rngmod
from ..diffusion import KIND_FINAL, KIND_PART, KIND_STEP, DiffusionModel, PartView, StepEncoding
from ..entropy import (
    CategoricalDecoder,
    CategoricalEncoder,
    decode_categorical,
    encode_categorical,
    logistic_bin_probs,
    symbols_crc,
)
from ..errors import DecodeError, FormatError
from ..networks import UNetConfig
from ..schedule import LOG2, pixel_to_unit, posterior_coefficients
from .base import Section
from .box import StepBox, truncated_logistic_mean
from .context import DIRECTIONS, context_np, context_t, from_blocks, second_pass, to_blocks
from .noise_basis import BASES, NoiseBasis, carry_variance

SQRT12 = math.sqrt(12.0)
LOGISTIC_STD_TO_SCALE = math.sqrt(3.0) / math.pi
AUX_MIN, AUX_MAX = -10.0, 5.0
MAX_HALF_WIDTH = 1 << 15
FINAL_BASES = ("rgb", "opponent")  # per-pixel bases: the lossless section can enumerate their boxes
MAX_BOX_RADIUS = 2


def _base_scale(gamma_t, b):
    """Logistic scale for a Wiener-filter guess: x ~ N(0, 1/4) observed at SNR_t.

    Var(x | z_t) = 1 / (4 + SNR_t); the network predicts a log-factor around this (aux = 0 at
    initialisation gives a sensible prior from the first training step).
    """
    if isinstance(gamma_t, torch.Tensor):
        return b * torch.rsqrt(4.0 + torch.exp(-gamma_t)) * LOGISTIC_STD_TO_SCALE
    return b * np.sqrt(1.0 / (4.0 + np.exp(-gamma_t))) * LOGISTIC_STD_TO_SCALE


@dataclass
class _Step:
    """Everything both sides compute for one step t -> s from the shared z_t."""

    mu_p: np.ndarray
    scale: np.ndarray
    delta: float
    a: float
    b: float


@dataclass
class _PartState:
    """A divided step being decoded part by part: its prior, coding order and dither, the symbols and
    first-pass values decoded so far, which coordinates they cover, and how many."""

    st: _Step
    order: np.ndarray
    u: np.ndarray
    k: np.ndarray
    e_first: np.ndarray | None
    known: np.ndarray
    done: int
    shape: tuple
    i: int
    n_keep: int  # the coordinates the step codes (all, or its kept share: the others are drawn from its prior)
    seed: int  # the file's seed (the prior draws of the coordinates it does not code)
    bounds: tuple[np.ndarray, np.ndarray] | None = None


FLAG_BOX_PRIOR = 1  # header flag: steps coded under their priors restricted to the earlier steps' box
FLAG_KEEP = 2  # header flag: T - 1 bytes follow, each step's kept share of its coordinates in 255ths (kept steps)
KEEP_ALL = 255
# The share of its coordinates each step codes by default (:meth:`UQDM.default_keep`), from the last step but
# one (t_2 -> t_1) backwards, the earliest steps all taking the last value: chosen on held-out training photos
# at three sizes (benchmarks/results/uqdm-keep/README.md): the first steps' confident coordinates cost most for
# least.  Step 2 coded 30% until 2026-12-08: 20% measured better against JPEG at every size (the more so the
# larger the image) for at most 0.5% more lossless bits
DEFAULT_KEEP_FROM_END = (0.8, 0.2, 0.1)


def _valid_keep(keep, num_steps: int) -> bool:
    """Kept shares as a header holds them: one per coding step 1..T-1, each in 1..255 (255ths)."""
    return len(keep) == num_steps - 1 and all(1 <= v <= KEEP_ALL for v in keep)
UNBOUNDED = 1e12  # the half-width of a coordinate a cut step has not sent (unit scale; x is in [-1, 1])


def _slices(n: int, block: int = 1 << 18):
    """Slices of ``block`` elements covering n: the box posterior's temporaries stay small."""
    return (slice(a, min(n, a + block)) for a in range(0, n, block))


class UQDM(DiffusionModel):
    codec_id = "uqdm"

    def __init__(self, unet: UNetConfig | None = None, num_steps: int = 4, gamma_min: float = -12.3,
                 gamma_max: float = 6.0, noise_basis: str = "rgb", scale_offsets: bool = False,
                 scale_offset_steps: int | None = None, context: str | None = None,
                 context_steps: int | None = None, final_basis: str | None = None):
        super().__init__(unet, gamma_min=gamma_min, gamma_max=gamma_max, num_steps=num_steps)
        if noise_basis not in BASES:
            raise ValueError(f"unknown noise basis {noise_basis!r} (choose from {', '.join(BASES)})")
        if noise_basis != "rgb" and self.channels != 3:
            raise ValueError(f"noise basis {noise_basis!r} needs a 3-channel network")
        self.noise_basis = noise_basis
        self.basis = NoiseBasis(noise_basis)
        if not self.basis.identity:
            # the basis as integers in a buffer, so that the model hash (over the tensors) covers it and
            # a file made with one basis is never decoded with another (integers: fp16 export cannot
            # round them; the codec computes with the float64 constants of noise_basis.py)
            self.register_buffer("noise_basis_code", torch.tensor(self.basis.code, dtype=torch.int8))
        self.scale_offsets = bool(scale_offsets)
        if self.scale_offsets:
            # log-scale offsets per coded coordinate of a basis block (channel, row, column), one set per
            # step of the model's grid, interpolated in gamma between them: a calibration of the learned
            # per-frequency scales, which uqdm-medium3 had learned least for its coarsest step (its card;
            # scripts/fit_scale_offsets.py fits them).  The offsets keep the grid they were fitted on
            # (``scale_offset_steps``, default T) when the model is run or fine-tuned at another T.
            p = self.basis.block
            n = int(scale_offset_steps or num_steps)
            self.scale_offset = torch.nn.Parameter(torch.zeros(n, self.channels, p, p))
        if context not in (None, "checkerboard"):
            raise ValueError(f"unknown uqdm context {context!r} (choose from: checkerboard)")
        self.final_basis = final_basis
        self.final = None
        if final_basis is not None:
            # the last step (to z_0) in a per-pixel basis, so that the lossless section can code x under
            # the exact posterior given that step's box (``encode_final``); the prior scales the network
            # predicts in the model's basis are carried over (noise_basis.carry_variance)
            if final_basis not in FINAL_BASES:
                raise ValueError(f"unknown final basis {final_basis!r} (choose from {', '.join(FINAL_BASES)})")
            if self.channels != 3:
                raise ValueError("a final basis needs a 3-channel network")
            self.final = NoiseBasis(final_basis)
            self.register_buffer("final_basis_code", torch.tensor(self.final.code, dtype=torch.int8))
            # the box term has no gradient in gamma_0 (which sets the box's width): trained, gamma_min
            # would only follow the steps' costs, which fall as it rises; it stays where it was fitted
            self.schedule.gamma_min.requires_grad_(False)
        self.context = context
        if context:
            # two-pass (checkerboard) step priors, context.py: per step of the grid they were fitted on
            # (``context_steps``, default T; interpolated in gamma), zero = no change of the prior
            p, c = self.basis.block, self.channels
            n = int(context_steps or num_steps)
            self.context_weight = torch.nn.Parameter(torch.zeros(n, c, p, p, len(DIRECTIONS), p, p))
            self.context_adapt = torch.nn.Parameter(torch.zeros(n, c, p, p, 2))

    @property
    def downscale(self) -> int:
        """Latent sizes must be multiples of the network's factor and of the basis block."""
        return math.lcm(self.net.downscale, self.basis.block)

    @classmethod
    def from_config(cls, cfg: dict) -> UQDM:
        return cls(UNetConfig.from_dict(cfg["unet"]), num_steps=int(cfg["num_steps"]),
                   gamma_max=float(cfg.get("gamma_max", 6.0)), noise_basis=cfg.get("noise_basis", "rgb"),
                   scale_offsets=bool(cfg.get("scale_offsets", False)),
                   scale_offset_steps=cfg.get("scale_offset_steps"), context=cfg.get("context"),
                   context_steps=cfg.get("context_steps"), final_basis=cfg.get("final_basis"))

    def config_dict(self) -> dict:
        out = super().config_dict()
        if self.noise_basis != "rgb":  # older models' configs (and hashes) stay as they were
            out["noise_basis"] = self.noise_basis
        if self.scale_offsets:
            out["scale_offsets"] = True
            if self.scale_offset.shape[0] != self.num_steps:
                out["scale_offset_steps"] = int(self.scale_offset.shape[0])
        if self.context:
            out["context"] = self.context
            if self.context_weight.shape[0] != self.num_steps:
                out["context_steps"] = int(self.context_weight.shape[0])
        if self.final_basis:
            out["final_basis"] = self.final_basis
        return out

    def header_params(self, box_prior: bool = True, keep: tuple[int, ...] | None = None) -> bytes:
        """The step count T, then format flags: files written since 2026-12-07 code each step under its
        prior restricted to the box of the steps before (:data:`FLAG_BOX_PRIOR`, :meth:`_k_bounds`); files
        with the one byte T (``box_prior=False``: the format before) code them under the whole prior.
        ``keep`` (:data:`FLAG_KEEP`): for coding steps 1..T-1, the share of its coordinates each step
        codes, in 255ths (:meth:`kept_count`; 255 = all)."""
        if keep is None:
            return bytes([self.num_steps, FLAG_BOX_PRIOR]) if box_prior else bytes([self.num_steps])
        keep = self.check_keep(keep)
        return bytes([self.num_steps, (FLAG_BOX_PRIOR if box_prior else 0) | FLAG_KEEP, *keep])

    def check_keep(self, keep) -> tuple[int, ...]:
        keep = tuple(int(v) for v in keep)
        if not _valid_keep(keep, self.num_steps):
            raise ValueError(f"keep: {self.num_steps - 1} values in 1..{KEEP_ALL} (255ths of a step's coordinates)")
        return keep

    @staticmethod
    def parse_header_params(params: bytes) -> dict:
        if not params or params[0] < 1:
            raise FormatError("malformed uqdm parameters")
        flags = params[1] if len(params) >= 2 else 0
        if flags & ~(FLAG_BOX_PRIOR | FLAG_KEEP):
            raise FormatError(f"unknown uqdm format flags {flags:#x} (a file from a newer diffcodec?)")
        T = params[0]
        size = 2 + T - 1 if flags & FLAG_KEEP else min(len(params), 2)
        if len(params) != size or (flags & FLAG_KEEP and not _valid_keep(params[2:], T)):
            raise FormatError("malformed uqdm parameters")
        keep = tuple(params[2:]) if flags & FLAG_KEEP else None
        return {"total_steps": T, "box_prior": bool(flags & FLAG_BOX_PRIOR), "keep": keep}

    def default_keep(self) -> tuple[float, ...]:
        """The kept shares (fractions) of coding steps 1..T-1 in files written with the defaults:
        :data:`DEFAULT_KEEP_FROM_END` counted back from step T-1."""
        T, last = self.num_steps, len(DEFAULT_KEEP_FROM_END) - 1
        return tuple(DEFAULT_KEEP_FROM_END[min(T - 1 - j, last)] for j in range(1, T))

    def kept_count(self, n: int, i: int, keep: tuple[int, ...] | None) -> int:
        """How many of its n coordinates step t_i -> t_{i-1} codes (the largest prior scales first, the
        parts' order): all, or keep[T - i] 255ths of them (at least one).  The others are drawn from the
        step's prior with randomness both sides share (:meth:`_kept_z_s`): a coordinate whose prior is
        confident costs a fraction of a bit under universal quantization for next to no information, and the
        later steps hardly miss it (README, UQDM kept coordinates).  The last step codes all."""
        if keep is None or i < 2 or keep[self.num_steps - i] == KEEP_ALL:
            return n
        return max(1, (n * keep[self.num_steps - i] + 127) // KEEP_ALL)

    def _kept_z_s(self, st: _Step, basis: NoiseBasis, k: np.ndarray, u: np.ndarray, known: np.ndarray, seed: int,
                  i: int, shape) -> np.ndarray:
        """z_s of a step that codes only the ``known`` coordinates: those from their symbols as in
        :meth:`_z_s`, the others a draw from the step's prior (logistic of its scale plus the uniform of
        width D, as the ancestral sampler draws) from a stream keyed by the seed and the step."""
        stream = rngmod.SeededStream(seed, rngmod.KEPT, i)
        n = k.size
        drawn = st.scale.reshape(-1) * stream.logistic((n,)) + st.delta * (stream.uniform((n,)) - 0.5)
        y = np.where(known, (k - u) * st.delta, drawn)
        return st.mu_p + basis.inverse(y.reshape(shape))

    def _kept_box(self, z_t: np.ndarray, z_s: np.ndarray, i: int, gam: np.ndarray, known: np.ndarray,
                  prev_box: StepBox | None) -> StepBox | None:
        """The box of a step that coded (or, cut, has sent so far) only the ``known`` coordinates: theirs,
        and the earlier steps' box (unbounded without one) for the others (:meth:`part_view`)."""
        box = self.step_box(z_t, z_s, i, gam)
        if box is None:
            return None
        hw = np.where(known.reshape(z_s.shape), box.half_width, UNBOUNDED)
        return StepBox(box.basis, box.center, hw, box.gamma_next, box.next_in_basis).within(prev_box)

    def check_header_params(self, params: bytes) -> dict:
        p = self.parse_header_params(params)
        if p["total_steps"] != self.num_steps:
            raise FormatError("the file's codec parameters do not match its model")
        return p

    def step_basis(self, i: int) -> NoiseBasis:
        """The basis step t_i -> t_{i-1} is coded in: the final basis for the last step (i = 1), if any."""
        return self.final if self.final is not None and i == 1 else self.basis

    def _blend(self, knots: int, gamma) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For gamma values: the steps of a ``knots``-step grid whose per-step parameters blend, (i, j),
        and the weight w of j, linear in gamma between the grid's steps and held beyond them.  np.interp
        is exact at its knots, so at a step of that grid w = 0 and the parameters are that step's own,
        bit for bit."""
        grid = self.gamma_grid(knots)[1:]
        f = np.interp(np.asarray(gamma, dtype=np.float64), grid, np.arange(len(grid), dtype=np.float64))
        i = np.floor(f).astype(np.int64)
        return i, np.minimum(i + 1, len(grid) - 1), f - i

    def param_at(self, param: torch.Tensor, gamma_t):
        """A per-step parameter (scale offsets, context) at gamma_t: float64 numpy for a float gamma_t
        (coding), or torch (training, differentiable) with one row per gamma of a tensor."""
        if isinstance(gamma_t, torch.Tensor):
            i, j, w = self._blend(param.shape[0], gamma_t.detach().reshape(-1).cpu().double().numpy())
            w = torch.as_tensor(w, dtype=param.dtype, device=param.device).view(-1, *[1] * (param.dim() - 1))
            return ((1 - w) * param[torch.as_tensor(i)] + w * param[torch.as_tensor(j)]).to(gamma_t.dtype)
        i, j, w = self._blend(param.shape[0], float(gamma_t))
        v = param.detach().to(torch.float64).numpy()
        return (1.0 - w) * v[i] + w * v[j]

    def log_scale_offset(self, gamma_t, shape):
        """The scale offsets at gamma_t tiled over latents of ``shape`` (0 without offsets).

        numpy (coding) for a float gamma_t; torch (training, differentiable in the offsets) for a
        tensor of per-example gammas."""
        if not self.scale_offsets:
            return 0.0
        p = self.basis.block
        reps = (1, 1, shape[2] // p, shape[3] // p)
        off = self.param_at(self.scale_offset, gamma_t)
        return off.repeat(*reps) if isinstance(off, torch.Tensor) else np.tile(off[None], reps)

    def _scale_np(self, aux: np.ndarray, gamma_t: float, b: float, final: bool = False) -> np.ndarray:
        """Prior scales of the coded coordinates; ``final``: of the last step in the final basis (the
        network's scales carried over, then the scale offsets, which act on the coded coordinates)."""
        if final:
            s = _base_scale(np.float64(gamma_t), b) * np.exp(np.clip(aux, AUX_MIN, AUX_MAX))
            s = np.sqrt(carry_variance(self.basis, self.final, s * s))
            return s * np.exp(self.log_scale_offset(gamma_t, aux.shape)) if self.scale_offsets else s
        aux = aux + self.log_scale_offset(gamma_t, aux.shape) if self.scale_offsets else aux
        return _base_scale(np.float64(gamma_t), b) * np.exp(np.clip(aux, AUX_MIN, AUX_MAX))

    def _scale_t(self, aux: torch.Tensor, gamma_t: torch.Tensor, b, final: torch.Tensor | None = None):
        """torch version of :meth:`_scale_np` for per-example gammas (B,); ``final`` (B,) bool marks the
        examples whose step is the last one, coded in the final basis."""
        off = self.log_scale_offset(gamma_t, aux.shape) if self.scale_offsets else 0.0
        g = gamma_t.view(-1, 1, 1, 1)
        scale = _base_scale(g, b) * torch.exp(torch.clamp(aux + off, AUX_MIN, AUX_MAX))
        if self.final is None or final is None or not bool(final.any()):
            return scale
        s = _base_scale(g, b) * torch.exp(torch.clamp(aux, AUX_MIN, AUX_MAX))
        s = torch.sqrt(carry_variance(self.basis, self.final, s * s)) * torch.exp(torch.as_tensor(off))
        return torch.where(final.view(-1, 1, 1, 1), s, scale)

    # ------------------------------------------------------------------ training loss
    @staticmethod
    def chain_step_weights(step_weights, num_steps: int) -> torch.Tensor:
        """``forward``'s step weights (coding order) indexed by the chain: entry j weights z_j -> z_{j-1},
        which is coding step T - j + 1; normalised to mean 1 (entry 0 unused).  Raises ValueError unless
        there are T non-negative, finite values, not all zero."""
        w = torch.as_tensor(step_weights, dtype=torch.float64).flatten()
        if w.numel() != num_steps or not bool(torch.isfinite(w).all() and (w >= 0).all()) or float(w.sum()) <= 0:
            raise ValueError(f"step weights need {num_steps} finite non-negative numbers (one per step, in coding "
                             f"order), not all zero; got {w.tolist()}")
        return torch.cat([w.new_zeros(1), w.flip(0)]) * (num_steps / w.sum())

    def forward(self, x: torch.Tensor, all_steps: bool = False, num_steps: int | None = None,
                step_weights: torch.Tensor | None = None, keep: tuple[int, ...] | None = None,
                uncoded_weight: float = 0.0) -> dict[str, torch.Tensor]:
        """Code length of x (float in [-1, 1], pixel-centred) in bits per dimension.

        Simulates the forward chain from z_T ~ N(0, I) (no network calls), then evaluates the
        network at one random step per example (unbiased estimate: T times that step's cost) or,
        with ``all_steps``, at every step (exact, T network calls; used for validation).
        ``num_steps`` runs the chain on another step count's grid than the model's own T (training
        on several grids, ``train --train-steps``): the network is conditioned on gamma and the
        learned scale is relative to the step's own coefficient b, so one network serves several T.
        ``step_weights`` (T values, the steps in coding order, the last one also weighting the lossless
        term; normalised to mean 1) adds ``loss``: the code length with each step's bits weighted, for
        training a model towards the rates where a file is cut (``train --step-weights``).  The network
        is shared by all steps, so the weights move its capacity between noise levels; ``bpd`` stays the
        true code length.
        ``keep`` (kept shares in 255ths, one per coding step 1..T-1, as a file's header holds them): the
        chain and the code length of files that code only those shares of their steps' coordinates
        (:meth:`kept_count`; ``train --keep-chain``): the network then learns on the latents it meets in
        such files, whose uncoded coordinates are draws from its own prior (:meth:`_kept_chain`).
        ``uncoded_weight`` W > 0 adds W times the code length the uncoded coordinates' posterior samples
        would cost (``train --keep-chain-uncoded``): what the reconstruction after a kept step lacks, which
        the kept files' code length alone leaves untrained (the prior mean of those coordinates).
        Returns a dict with ``bpd`` (per-example, for the optimiser unless ``loss``), and diagnostics.
        """
        T = num_steps or self.num_steps
        basis = self.basis
        B = x.shape[0]
        dims = x[0].numel()
        t = torch.arange(T + 1, dtype=x.dtype, device=x.device) / T
        gam = self.schedule(t)
        if keep is not None:
            if T != self.num_steps:
                raise ValueError("kept shares are for the model's own step count")
            chain, kept, targets = self._kept_chain(x, gam.detach(), self.check_keep(keep), uncoded_weight > 0)
        else:
            z = torch.randn_like(x)
            chain, kept, targets = [None] * (T + 1), None, None
            chain[T] = z
            for j in range(T, 0, -1):
                a, b, beta = posterior_coefficients(gam[j - 1], gam[j])
                mu_q = a * z + b * x
                z = mu_q + SQRT12 * beta * self.step_basis(j).inverse_t(torch.rand_like(x) - 0.5)
                chain[j - 1] = z
        if all_steps:
            steps = [torch.full((B,), j, device=x.device, dtype=torch.long) for j in range(1, T + 1)]
            weight = 1.0
        else:
            steps = [torch.randint(1, T + 1, (B,), device=x.device)]
            weight = float(T)
        zs_all = torch.stack(chain)  # (T+1, B, C, H, W)
        # the posterior samples the loss measures: the chain's own, or with W > 0 a kept step's uncoded ones too
        zq_all = zs_all if targets is None else torch.stack(targets)
        ar = torch.arange(B, device=x.device)
        step_nats = torch.zeros(B, dtype=x.dtype, device=x.device)
        if step_weights is not None:
            w_chain = self.chain_step_weights(step_weights, T).to(x)
            weighted_nats = torch.zeros_like(step_nats)
        last_prior = None  # (mu_P, scale) of the last step, where every example evaluated it
        for idx in steps:
            z_t, z_s = zs_all[idx, ar], zq_all[idx - 1, ar]
            g_t = gam[idx].view(B, 1, 1, 1)
            g_s = gam[idx - 1].view(B, 1, 1, 1)
            eps, aux = self.split_output(self.net_train(z_t, gam[idx]))
            x_hat = self.x_hat_from_eps(z_t, eps, g_t)
            a, b, beta = posterior_coefficients(g_s, g_t)
            mu_p = a * z_t + b * x_hat
            half = 0.5 * SQRT12 * beta
            fin = idx == 1 if self.final is not None else None
            scale = self._scale_t(aux, gam[idx], b, fin)
            d = basis.forward_t(z_s - mu_p)  # the coded coordinates
            if fin is not None and bool(fin.any()):
                d = torch.where(fin.view(B, 1, 1, 1), self.final.forward_t(z_s - mu_p), d)
                if bool(fin.all()):
                    last_prior = (mu_p, scale)
            coded = None if kept is None else kept[idx, ar]  # (B, C, H, W) 0/1: the coordinates the file codes
            if self.context:  # the second pass's prior, moved and rescaled by the first pass's values
                p = basis.block
                db, sb = to_blocks(d, p), to_blocks(scale, p)
                # the coder's context sees zero for a first-pass coordinate it has not decoded (never, uncoded)
                seen = db if coded is None else to_blocks(d * coded, p)
                m, s2 = context_t(seen, sb, self.param_at(self.context_weight, gam[idx]),
                                  self.param_at(self.context_adapt, gam[idx]))
                sel = torch.as_tensor(second_pass(*db.shape[-2:]), device=d.device)
                d = from_blocks(torch.where(sel, db - m, db))
                scale = from_blocks(torch.where(sel, s2, sb))
            nll = -log_logistic_bin_t((d - half) / scale, (d + half) / scale)
            if coded is not None:
                nll = nll * (coded + uncoded_weight * (1.0 - coded))  # W = 0: the coded coordinates' alone
            nats = nll.flatten(1).sum(1)
            step_nats = step_nats + nats
            if step_weights is not None:
                weighted_nats = weighted_nats + w_chain[idx] * nats
        x_int = torch.round((x + 1.0) * 128.0 - 0.5).long().clamp(0, 255)
        if self.final is not None:
            data_nats = self.box_data_nll(x_int, chain[1], chain[0], gam[0], gam[1], last_prior)
        else:
            data_nats = self.data_nll(chain[0], gam[0], x_int).flatten(1).sum(1)
        total = weight * step_nats + data_nats
        norm = dims * LOG2
        out = {
            "bpd": total / norm,
            "steps_bpd": weight * step_nats / norm,
            "data_bpd": data_nats / norm,
            "gamma_min": gam[0].detach(),
        }
        if step_weights is not None:
            out["loss"] = (weight * weighted_nats + w_chain[1] * data_nats) / norm
        return out

    @torch.no_grad()
    def _kept_chain(self, x: torch.Tensor, gam: torch.Tensor, keep: tuple[int, ...], posterior: bool = False):
        """The forward chain of files with kept shares ``keep`` (255ths): each step codes the share of its
        coordinates with the largest prior scales (per example, as the coder orders a step: :meth:`kept_count`,
        :meth:`_part_order`), whose values follow q(z_s | z_t, x) as in the plain chain, and draws the others
        from its prior p(z_s | z_t) (logistic of its scale plus the uniform of width D, :meth:`_kept_z_s`).
        The draws depend on the network, so the chain is walked step by step (one evaluation per kept step,
        without gradients: the loss differentiates the steps' code lengths given the chain, as for the plain
        chain).  Returns the chain (index j: z_{t_j}), a (T + 1, B, C, H, W) 0/1 tensor of the coordinates
        each step j codes (in its basis; ones for steps coding all), and with ``posterior`` the posterior samples
        given the chain, z_{t_{j-1}} ~ q(. | z_{t_j}, x) with the chain's noise (the chain itself where a step
        codes all; else None)."""
        T, B = self.num_steps, x.shape[0]
        z = torch.randn_like(x)
        chain, targets = [None] * (T + 1), [None] * (T + 1)
        chain[T] = targets[T] = z
        kept = torch.ones((T + 1, *x.shape), dtype=x.dtype, device=x.device)
        for j in range(T, 0, -1):
            a, b, beta = posterior_coefficients(gam[j - 1], gam[j])
            mu_q = a * z + b * x
            delta = SQRT12 * beta
            basis = self.step_basis(j)
            noise = torch.rand_like(x) - 0.5
            n = x[0].numel()
            n_keep = self.kept_count(n, j, keep)
            if n_keep == n:
                z = mu_q + delta * basis.inverse_t(noise)
            else:
                g = gam[j].expand(B)
                eps, aux = self.split_output(self.net_train(z, g))
                mu_p = a * z + b * self.x_hat_from_eps(z, eps, gam[j])
                scale = self._scale_t(aux, g, b)
                flat = scale.reshape(B, -1)
                order = torch.sort(-flat, dim=1, stable=True).indices[:, :n_keep]  # the coder's order
                mask = torch.zeros_like(flat).scatter_(1, order, 1.0).view_as(x)
                logistic = torch.logit(torch.rand_like(x).clamp(1e-7, 1 - 1e-7))
                drawn = scale * logistic + delta * (torch.rand_like(x) - 0.5)
                y = torch.where(mask > 0, basis.forward_t(mu_q - mu_p) + delta * noise, drawn)
                z = mu_p + basis.inverse_t(y)
                kept[j] = mask
                if posterior:  # the plain chain's sample given z_t
                    targets[j - 1] = mu_q + delta * basis.inverse_t(noise)
            chain[j - 1] = z
            if targets[j - 1] is None:
                targets[j - 1] = z
        return chain, kept, targets if posterior else None

    @torch.no_grad()
    def step_residuals(self, x: torch.Tensor):
        """Walk the model's own forward chain on images x (float in [-1, 1]) and yield, for each step
        t_j -> t_{j-1} from the coarsest, (j, r, scale, D): the shift r = mu_Q - mu_P in RGB (the coded
        coordinates are ``basis.forward_t(r)``), the prior scale of every coded coordinate (offsets
        included) and the box width D.  For benchmarks and calibration (scripts/fit_scale_offsets.py);
        draws z_T and the step noise from torch's generator, in x's dtype.  The coded coordinates of
        step j are ``step_basis(j).forward_t(r)``."""
        T = self.num_steps
        gam = self.schedule(torch.arange(T + 1, dtype=x.dtype) / T).detach()
        z = torch.randn_like(x)
        for j in range(T, 0, -1):
            a, b, beta = posterior_coefficients(gam[j - 1], gam[j])
            eps, aux = self.split_output(self.net(z, gam[j]))
            mu_p = a * z + b * self.x_hat_from_eps(z, eps, gam[j])
            mu_q = a * z + b * x
            delta = float(SQRT12 * beta)
            fin = torch.full((x.shape[0],), j == 1 and self.final is not None)
            yield j, mu_q - mu_p, self._scale_t(aux, gam[j].expand(x.shape[0]), b, fin), delta
            z = mu_q + delta * self.step_basis(j).inverse_t(torch.rand_like(x) - 0.5)

    # ------------------------------------------------------------------ coding helpers
    def _step(self, z: np.ndarray, gamma_s: float, gamma_t: float, i: int) -> tuple[_Step, np.ndarray, np.ndarray]:
        """Step t_i -> t_{i-1}'s prior from the shared z_t (one network evaluation)."""
        eps, aux = self.eval_f64(z, gamma_t)
        x_hat = self.x_hat_f64(z, eps, gamma_t)
        a, b, beta = (float(v) for v in posterior_coefficients(np.float64(gamma_s), np.float64(gamma_t)))
        scale = self._scale_np(aux, gamma_t, b, final=self.final is not None and i == 1)
        return _Step(a * z + b * x_hat, scale, SQRT12 * beta, a, b), eps, aux

    @staticmethod
    def _table(scale: np.ndarray, delta: float, u: np.ndarray, half_width: int, mean: np.ndarray | None = None,
               bounds: tuple[np.ndarray, np.ndarray] | None = None):
        """Table function for k in [-R, R] given a step's scale and D and the dither u (flat arrays),
        P(k) logistic * uniform; ``mean``: the prior's shift from mu_P (the context's second pass);
        ``bounds``: (lo, hi) per element, P(k) = 0 outside lo <= k <= hi (:meth:`_k_bounds`)."""
        ks = np.arange(-half_width, half_width + 1, dtype=np.float64)
        scale = scale.reshape(-1)

        def table(sl: slice) -> np.ndarray:
            # Built as (K, n) and returned transposed: with K = 2R+1 often 3-5, an (n, K) layout makes
            # numpy loop per row of K.  Every operation is element-wise, so the values are those of
            # the (n, K) formula bit for bit.
            lo = (ks[:, None] - u[None, sl]) * delta  # y_k - mu_P
            if mean is not None:
                lo -= mean[None, sl]
            hi = lo + 0.5 * delta
            lo -= 0.5 * delta
            s = scale[None, sl]
            lo /= s
            hi /= s
            p = logistic_bin_probs(lo, hi)
            if bounds is not None:
                cut = p * ((ks[:, None] >= bounds[0][None, sl]) & (ks[:, None] <= bounds[1][None, sl]))
                # where every possible k underflows (a prior hundreds of scales off the box) the whole prior
                # is kept, whose other bins hold the coder's mass; both sides test the same float64 values
                p = np.where((cut > 0.0).any(axis=0)[None, :], cut, p)
            return p.T

        return table

    def _k_bounds(self, st: _Step, basis: NoiseBasis, z: np.ndarray, u: np.ndarray,
                  prior_box: StepBox | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The symbols k of step t -> s that x can have, given the box the steps before put it in.

        Symbol k puts M x in a box of half-width D / (2b) around c0 + (k - u) D / b, c0 = M (mu_P - a z_t) / b
        (box.py).  x lies in ``prior_box`` too (the chained boxes of the steps before, in this step's
        basis), so only the k whose box meets it are possible: lo <= k <= hi with
        lo = u + (box_lo - c0) b / D - 1/2 and hi = u + (box_hi - c0) b / D + 1/2, widened by 1e-6 so that
        rounding can never exclude the true k.  Coding under the prior restricted to them (``_table``) costs
        the same bits for the k kept, divided by the prior mass they hold: the network never sees the
        earlier boxes, and its prior spreads past them (README, UQDM box priors).  None: no earlier box
        in this basis (the first step; the last step of a model with a final basis).
        """
        if prior_box is None or prior_box.basis is not basis:
            return None
        c0 = basis.forward(st.mu_p - st.a * z).reshape(-1) / st.b
        r = st.b / st.delta
        lo = (prior_box.center - prior_box.half_width).reshape(-1)
        hi = (prior_box.center + prior_box.half_width).reshape(-1)
        return u + (lo - c0) * r - (0.5 + 1e-6), u + (hi - c0) * r + (0.5 + 1e-6)

    def _max_half_width(self, st: _Step, basis: NoiseBasis) -> int:
        """The largest |k| any image can produce at this step, known to both sides.

        mu_Q - mu_P = b (x - x_hat) with x and x_hat in [-1, 1], so a coded coordinate, a row m of
        the basis applied to it, is at most 2b |m|_1 and |k| <= 2b |m|_1/D + 1/2 (plus the
        rounding).  The decoder refuses wider symbol ranges: table work grows with the range, and a
        forged section must not turn a normal decode into hours.
        """
        return max(1, math.ceil(2.0 * basis.max_row_l1 * st.b / st.delta + 0.5))

    def sample_reverse_step(self, z, eps, aux, gamma_s, gamma_t, rng):
        """A sample of p(z_s | z_t) (ancestral reconstruction); a step that ends at t = 0 is the model's last
        step, in its final basis if it has one."""
        x_hat = self.x_hat_f64(z, eps, gamma_t)
        a, b, beta = (float(v) for v in posterior_coefficients(np.float64(gamma_s), np.float64(gamma_t)))
        final = self.final is not None and gamma_s <= float(self.schedule.gammas_f64([0.0])[0])
        scale = self._scale_np(aux, gamma_t, b, final=final)
        mu_p = a * z + b * x_hat
        noise = scale * rng.logistic(z.shape) + SQRT12 * beta * (rng.uniform(z.shape) - 0.5)
        return mu_p + (self.final if final else self.basis).inverse(noise)

    def encode_step(self, z: np.ndarray, x: np.ndarray, i: int, gam: np.ndarray, seed: int, **options):
        """Universal quantization of step t_i -> t_{i-1}; returns (z_s, section)."""
        step = self.begin_encode_step(z, x, i, gam, seed, **options)
        return step.z_s, step.finish()

    def begin_encode_step(self, z: np.ndarray, x: np.ndarray, i: int, gam: np.ndarray, seed: int,
                          **options) -> StepEncoding:
        """The symbols and z_s now; their entropy coding in ``finish`` (may run in another thread).

        ``parts``: fractions 0 < f_1 < ... < 1 of the step's coordinates, in decreasing order of their prior
        scale, after which a file may be cut (step parts, :meth:`_part_ends`); ``finish`` then returns one
        section per part."""
        parts = options.pop("parts", None)
        prior_box = options.pop("prior_box", None)
        keep = options.pop("keep", None)
        if options:
            raise ValueError(f"uqdm has no encoder options {sorted(options)}")
        if (parts or keep is not None) and i > 1:  # the last step is not divided: its latent is z_0
            return self._begin_encode_parts(z, x, i, gam, seed, parts, prior_box, keep)
        st, k, u, z_s, bounds = self._encode_symbols(z, x, i, gam, seed, prior_box)
        half_width = int(max(1, np.abs(k).max()))
        passes = self._passes(st.scale, st.delta, k, u, float(gam[i]), z.shape, bounds)  # neither mu_p nor z

        def finish() -> Section:
            enc = CategoricalEncoder()
            for idx, table in passes:
                enc.encode(k[idx] + half_width, 2 * half_width + 1, table(half_width))
            return Section(KIND_STEP, self.num_steps - i + 1, struct.pack("<H", half_width), enc.finish(),
                           symbols_crc(k), enc.ideal)

        return StepEncoding(z_s, finish, lambda prev_box: self.step_box(z, z_s, i, gam, prev_box))

    # ------------------------------------------------------------------ step parts
    # A step may be written as several sections, each a range-coder stream over the next coordinates in
    # decreasing order of their prior scale (which both sides know from z_t): a file cut after a part
    # decodes to z_t's step with those coordinates known and the rest at the prior mean.  The bits of the
    # step's largest-scale coordinates buy most of its PSNR (README, UQDM step parts), so the cut points
    # fill the gaps between steps.  k, z_s and the chain are those of the undivided step: only the
    # checkerboard context sees fewer first-pass neighbours (those decoded so far), so the bits change.

    @staticmethod
    def _part_ends(parts, n: int) -> list[int]:
        """Coordinate counts at which the parts end: round(f n) for the fractions, then n; empty parts
        (fractions closer than 1/n) are dropped."""
        fr = [float(f) for f in parts]
        if any(not 0.0 < f < 1.0 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
            raise ValueError(f"parts must be increasing fractions in (0, 1), got {list(parts)}")
        ends = [e for e in (int(round(f * n)) for f in fr) if 0 < e < n] + [n]
        return sorted(set(ends))

    def _part_order(self, st: _Step) -> np.ndarray:
        """The coding order of a divided step: by decreasing prior scale, ties by position (stable); int32
        indices where they fit (a 24-megapixel step has 72 M coordinates)."""
        order = np.argsort(-st.scale.reshape(-1), kind="stable")
        return order.astype(np.int32) if order.size < 2**31 else order

    def _part_passes(self, step_scale: np.ndarray, delta: float, idx: np.ndarray, k: np.ndarray, u: np.ndarray,
                     e_first: np.ndarray, gamma_t: float, shape, bounds=None):
        """Like :meth:`_passes` for the coordinates ``idx`` of one part: its first-pass coordinates, then its
        second-pass ones under the context of the first-pass values decoded so far (``e_first``, zero where
        not yet decoded, updated here once the caller has filled the first pass into k); ``bounds``: the
        step's possible symbols (:meth:`_k_bounds`, flat) or None."""
        scale = step_scale.reshape(-1)

        def sub(j):
            return None if bounds is None else (bounds[0][j], bounds[1][j])

        if not self.context:
            yield idx, lambda hw: self._table(scale[idx], delta, u[idx], hw, bounds=sub(idx))
            return
        sel = self._second_pass_mask(shape)
        first, second = idx[~sel[idx]], idx[sel[idx]]
        yield first, lambda hw: self._table(scale[first], delta, u[first], hw, bounds=sub(first))
        e_first[first] = (k[first] - u[first]) * delta
        if second.size == 0:
            return
        p = self.basis.block
        m, s2 = context_np(to_blocks(e_first.reshape(shape), p), to_blocks(step_scale.reshape(shape), p),
                           self.param_at(self.context_weight, gamma_t), self.param_at(self.context_adapt, gamma_t))
        m, s2 = from_blocks(m).reshape(-1)[second], from_blocks(s2).reshape(-1)[second]
        yield second, lambda hw: self._table(s2, delta, u[second], hw, mean=m, bounds=sub(second))

    def _second_pass_mask(self, shape) -> np.ndarray:
        p = self.basis.block
        n, c, h, w = shape
        return np.broadcast_to(np.kron(second_pass(h // p, w // p), np.ones((p, p), dtype=bool)), shape).reshape(-1)

    def _encode_symbols(self, z, x, i, gam, seed, prior_box=None):
        """Step t_i -> t_{i-1} of x from the shared z_t: (prior, symbols k, dither u, z_s, the possible
        symbols given ``prior_box``: :meth:`_k_bounds`)."""
        st, _, _ = self._step(z, float(gam[i - 1]), float(gam[i]), i)
        basis = self.step_basis(i)
        u = self._dither(seed, i, z.size)
        k = self._symbols(st, basis, z, x, u)
        if np.abs(k).max() > min(MAX_HALF_WIDTH, self._max_half_width(st, basis)):
            raise ValueError("step symbol out of range (model unsuited to this image)")
        bounds = self._k_bounds(st, basis, z, u, prior_box)
        if bounds is not None and not np.all((k >= bounds[0]) & (k <= bounds[1])):  # x lies in the box
            raise RuntimeError("a step symbol lies outside the earlier steps' box (numerical failure)")
        k = k.astype(np.int64)
        return st, k, u, self._z_s(st, basis, k, u, z.shape), bounds

    def _begin_encode_parts(self, z, x, i, gam, seed, parts, prior_box=None, keep=None):
        st, k, u, z_s, bounds = self._encode_symbols(z, x, i, gam, seed, prior_box)
        order = self._part_order(st)
        n_keep = self.kept_count(k.size, i, keep)
        ends = self._part_ends(parts, n_keep) if parts else [n_keep]
        known = None
        if n_keep < k.size:
            known = np.zeros(k.size, dtype=bool)
            known[order[:n_keep]] = True
            z_s = self._kept_z_s(st, self.step_basis(i), k, u, known, seed, i, z.shape)

        def box(prev_box):  # the coordinates it does not code keep the earlier box (part_view's rule)
            if known is None:
                return self.step_box(z, z_s, i, gam, prev_box)
            return self._kept_box(z, z_s, i, gam, known, prev_box)
        scale, delta = st.scale, st.delta  # the coder thread holds neither mu_p nor z
        gamma_t, shape, index = float(gam[i]), z.shape, self.num_steps - i + 1

        def finish() -> list[Section]:
            out, start = [], 0
            e_first = np.zeros(k.size) if self.context else None  # the context's first-pass values so far
            for end in ends:
                idx = order[start:end]
                half_width = int(max(1, np.abs(k[idx]).max()))
                enc = CategoricalEncoder()
                for sub, table in self._part_passes(scale, delta, idx, k, u, e_first, gamma_t, shape, bounds):
                    enc.encode(k[sub] + half_width, 2 * half_width + 1, table(half_width))
                kind = KIND_STEP if end == n_keep else KIND_PART
                out.append(Section(kind, index, struct.pack("<HI", half_width, end), enc.finish(),
                                   symbols_crc(k[idx]), enc.ideal))
                start = end
            return out

        return StepEncoding(z_s, finish, box)

    def begin_decode_parts(self, z: np.ndarray, i: int, gam: np.ndarray, seed: int,
                           prior_box: StepBox | None = None, keep: tuple[int, ...] | None = None) -> _PartState:
        st, _, _ = self._step(z, float(gam[i - 1]), float(gam[i]), i)
        u = self._dither(seed, i, z.size)
        bounds = self._k_bounds(st, self.step_basis(i), z, u, prior_box)
        return _PartState(st, self._part_order(st), u, np.zeros(z.size, np.int64),
                          np.zeros(z.size) if self.context else None, np.zeros(z.size, dtype=bool), 0, z.shape, i,
                          self.kept_count(z.size, i, keep), seed, bounds)

    def keeps_part(self, i: int, keep: tuple[int, ...] | None) -> bool:
        """Whether step t_i -> t_{i-1} of a file with these kept shares codes only some coordinates (then
        it is decoded as parts, which hold the box of the coordinates it has not coded)."""
        return keep is not None and i > 1 and keep[self.num_steps - i] != KEEP_ALL

    def decode_part(self, state: _PartState, sec: Section, gam: np.ndarray) -> None:
        """Decode one part section into ``state`` (the last one, kind step, must complete the step)."""
        n = state.n_keep
        if len(sec.params) != 6:
            raise DecodeError(f"malformed parameters in section {sec.index}")
        half_width, end = struct.unpack("<HI", sec.params)
        st, basis = state.st, self.step_basis(state.i)
        if not 1 <= half_width <= self._max_half_width(st, basis) or not state.done < end <= n \
                or (sec.kind == KIND_STEP) != (end == n):
            raise DecodeError(f"corrupt parameters in section {sec.index}")
        idx = state.order[state.done:end]
        dec = CategoricalDecoder(sec.payload)
        for sub, table in self._part_passes(st.scale, st.delta, idx, state.k, state.u, state.e_first,
                                            float(gam[state.i]), state.shape, state.bounds):
            state.k[sub] = dec.decode(sub.size, 2 * half_width + 1, table(half_width)).astype(np.int64) - half_width
        if symbols_crc(state.k[idx]) != sec.symbols_crc:
            raise DecodeError(f"section {sec.index} decoded inconsistently (model or platform mismatch)")
        state.known[idx] = True
        state.done = end

    def part_view(self, state: _PartState, z_t: np.ndarray, gam: np.ndarray,
                  prev_box: StepBox | None = None) -> PartView:
        """The step after the parts decoded so far: z_s (the chain latent) only once the step is complete, else
        None; z_view with the unknown coordinates at the prior mean (:meth:`known_view`; a complete step's: its
        z_s, below); the box of the known coordinates, within the box of the steps before (``prev_box``,
        :meth:`StepBox.within`).  A coordinate this step has not sent keeps that earlier box (unbounded
        without one): without it, a cut after a few coordinates would forget what the complete previous step
        said about all the others."""
        st, basis, i = state.st, self.step_basis(state.i), state.i
        if state.done == state.k.size:
            z_s = self._z_s(st, basis, state.k, state.u, state.shape)
            return PartView(z_s, z_s, self.step_box(z_t, z_s, i, gam, prev_box))
        if state.done == state.n_keep:  # complete: the coordinates it does not code are drawn from its prior
            z_s = self._kept_z_s(st, basis, state.k, state.u, state.known, state.seed, i, state.shape)
            # The chain, flow and ancestral go on from the draws (a sample, as they expect); the posterior mean
            # (denoise) starts from the prior mean instead, except after the first step, whose prior (given z_T,
            # pure noise) says nothing about x: its mean is a flat latent the denoiser reads worse than a draw
            # (uqdm-medium12, held-out photos: step 1 -0.24 dB with the mean, steps 2 / 3 +0.14 / +0.15 dB;
            # README, UQDM kept coordinates)
            box = self._kept_box(z_t, z_s, i, gam, state.known, prev_box)
            return PartView(z_s, z_s, box, None if i == self.num_steps else self.known_view(state))
        z_mean = self.known_view(state)
        return PartView(None, z_mean, self._kept_box(z_t, z_mean, i, gam, state.known, prev_box))

    def known_view(self, state: _PartState) -> np.ndarray:
        """The step's latent from the coordinates decoded so far, the others at the prior mean."""
        e = np.where(state.known, (state.k - state.u) * state.st.delta, 0.0)
        return state.st.mu_p + self.step_basis(state.i).inverse(e.reshape(state.shape))

    def decode_step(self, z: np.ndarray, sec: Section, i: int, gam: np.ndarray, seed: int,
                    prior_box: StepBox | None = None, keep: tuple[int, ...] | None = None) -> np.ndarray:
        if len(sec.params) == 6:  # the one part of a step divided into a single part
            state = self.begin_decode_parts(z, i, gam, seed, prior_box, keep)
            self.decode_part(state, sec, gam)
            return self.part_view(state, z, gam).z_s
        if len(sec.params) != 2:
            raise DecodeError(f"malformed parameters in section {sec.index}")
        (half_width,) = struct.unpack("<H", sec.params)
        st, _, _ = self._step(z, float(gam[i - 1]), float(gam[i]), i)
        basis = self.step_basis(i)
        if not 1 <= half_width <= self._max_half_width(st, basis):  # a forged width would only cost time
            raise DecodeError(f"corrupt parameters in section {sec.index} (symbol range {half_width})")
        u = self._dither(seed, i, z.size)
        bounds = self._k_bounds(st, basis, z, u, prior_box)
        k = np.zeros(z.size, dtype=np.int64)
        dec = CategoricalDecoder(sec.payload)
        # the passes are built lazily: the second pass's tables need the first pass's symbols in k
        for idx, table in self._passes(st.scale, st.delta, k, u, float(gam[i]), z.shape, bounds):
            k[idx] = dec.decode(idx.size, 2 * half_width + 1, table(half_width)).astype(np.int64) - half_width
        if symbols_crc(k) != sec.symbols_crc:
            raise DecodeError(f"step {sec.index} decoded inconsistently (model or platform mismatch)")
        return self._z_s(st, basis, k, u, z.shape)

    def _passes(self, step_scale: np.ndarray, delta: float, k: np.ndarray, u: np.ndarray, gamma_t: float, shape,
                bounds=None):
        """Yield the coding passes of a step, (flat indices, half_width -> table function): one pass
        over every coordinate, or with the checkerboard context the first-pass blocks and then the
        second-pass blocks under the prior their neighbours' decoded values give (context.py).  A
        generator: the second pass is built only once the caller has filled the first pass into k.
        An undivided step is a step of one part (:meth:`_part_passes`)."""
        return self._part_passes(step_scale, delta, np.arange(k.size), k, u, np.zeros(k.size), gamma_t, shape, bounds)

    # ------------------------------------------------------------------ channel-aware reconstruction (box.py)
    def step_box(self, z_t: np.ndarray, z_s: np.ndarray, i: int, gam: np.ndarray,
                 prev_box: StepBox | None = None) -> StepBox | None:
        """The box decoded step t_i -> t_{i-1} puts M x in (box.py), within ``prev_box`` (the box of the
        steps before, :meth:`StepBox.within`), when it coded every coordinate (else :meth:`_kept_box`);
        None for the last step, whose latent z_0 is reconstructed without the network."""
        if i < 2:
            return None
        a, b, beta = (float(v) for v in posterior_coefficients(np.float64(gam[i - 1]), np.float64(gam[i])))
        basis = self.step_basis(i)
        box = StepBox(basis, basis.forward(z_s - a * z_t) / b, SQRT12 * beta / (2.0 * b), float(gam[i - 2]),
                      self.step_basis(i - 1) is basis)
        return box.within(prev_box)

    def box_posterior_mean(self, x_hat: np.ndarray, aux: np.ndarray, gamma_s: float, box: StepBox) -> np.ndarray:
        """E[x | z_s, box] (unit scale, clipped to [-1, 1]): per coordinate of the box's basis, the next
        step's prior around x_hat (its logistic scale over b'), truncated to the box.  When the next step
        is coded in another basis (the final one), the network's scales in its own basis are used as they
        are, without the scale offsets, which were fitted to the other basis's coordinates."""
        _, b_next, _ = (float(v) for v in posterior_coefficients(np.float64(box.gamma_next), np.float64(gamma_s)))
        if box.next_in_basis:
            scale = self._scale_np(aux, gamma_s, b_next)
        else:
            scale = _base_scale(np.float64(gamma_s), b_next) * np.exp(np.clip(aux, AUX_MIN, AUX_MAX))
        m = np.ascontiguousarray(box.basis.forward(x_hat))  # written in place below, through a flat view
        scale = np.ascontiguousarray(scale / b_next)
        flat_m, flat_s, flat_c = m.reshape(-1), scale.reshape(-1), box.center.reshape(-1)
        hw = box.half_width.reshape(-1) if isinstance(box.half_width, np.ndarray) else box.half_width
        for sl in _slices(flat_m.size):  # element-wise, in blocks: a few block-sized temporaries, any image
            h = hw[sl] if isinstance(hw, np.ndarray) else hw
            flat_m[sl] = truncated_logistic_mean(flat_m[sl], flat_s[sl], flat_c[sl] - h, flat_c[sl] + h)
        return np.clip(box.basis.inverse(m), -1.0, 1.0)

    def reconstruct_unit(self, z: np.ndarray, gamma_t: float, method: str = "denoise", nfe: int | None = None,
                         rng=None, default_steps: int = 1, box: StepBox | None = None) -> np.ndarray:
        """As :meth:`DiffusionModel.reconstruct_unit`, using the last step's ``box`` when given: ``denoise``
        is the posterior mean inside it (:meth:`box_posterior_mean`) instead of x_hat(z); a ``flow`` or
        ``ancestral`` result is projected onto it (x lies in the box, so the projection, onto a convex set,
        never moves a reconstruction away from x)."""
        if box is not None and method == "denoise":
            eps, aux = self.eval_f64(z, gamma_t)
            return self.box_posterior_mean(self.x_hat_f64(z, eps, gamma_t), aux, gamma_t, box)
        x = super().reconstruct_unit(z, gamma_t, method, nfe, rng, default_steps)
        if box is None:
            return x
        m = np.clip(box.basis.forward(np.clip(x, -1.0, 1.0)), box.center - box.half_width,
                    box.center + box.half_width)
        return np.clip(box.basis.inverse(m), -1.0, 1.0)

    @staticmethod
    def _dither(seed: int, i: int, n: int) -> np.ndarray:
        """Step i's dither u ~ U(-1/2, 1/2), from the shared seed."""
        return rngmod.SeededStream(seed, rngmod.DITHER, i).uniform((n,)) - 0.5

    @staticmethod
    def _symbols(st: _Step, basis: NoiseBasis, z: np.ndarray, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        """k = round(M (mu_Q - mu_P) / D + u), flat float64, for x of z's shape or broadcasting to it.

        The lossless section of a model with a final basis evaluates this for candidate images:
        element-wise operations in a fixed order, so a candidate equal to x gives x's k bit for bit."""
        mu_q = st.a * z + st.b * x
        return np.round(basis.forward(mu_q - st.mu_p).reshape(-1) / st.delta + u)

    @staticmethod
    def _z_s(st: _Step, basis: NoiseBasis, k: np.ndarray, u: np.ndarray, shape) -> np.ndarray:
        """z_s = mu_P + M^T (k - u) D: both sides, the same float64 operations."""
        return st.mu_p + basis.inverse((k.reshape(shape) - u.reshape(shape)) * st.delta)

    # ------------------------------------------------------------------ the lossless section, final basis
    # With a final basis the last step's box lies along per-pixel axes, so the pixels y that the last
    # step would have coded into the same symbols k (its box around z_0) can be listed: at most
    # (2R + 1)^3 per pixel.  x is coded as one of them, under the last step's own prior; the 256-way
    # Gaussian p(x | z_0) of the other models cannot use the box and spends about 0.25 bits per
    # sub-pixel more (README, UQDM final basis).

    @property
    def final_uses_last_step(self) -> bool:
        return self.final is not None

    def _box_offsets(self, r: int, channels: int) -> np.ndarray:
        """(K, 3) candidate offsets from the rounded box centre: all combinations for an RGB image, equal
        ones for a gray image (its channels are repeated into the model's three)."""
        d = np.arange(-r, r + 1, dtype=np.int64)
        if channels == 1:
            return np.repeat(d[:, None], 3, axis=1)
        return np.stack(np.meshgrid(d, d, d, indexing="ij"), -1).reshape(-1, 3)

    def _box_radius(self, width_levels: float, from_centre: bool) -> int:
        """How many levels per channel a pixel inside the box can lie from the rounded box centre
        (``from_centre``) or from another pixel inside it: a coded coordinate spans ``width_levels``
        (D / b, in pixel levels), so a channel spans at most l1 times that, l1 the largest column
        L1 norm of the colour matrix."""
        l1 = float(np.abs(self.final.color).sum(0).max())
        r = math.floor(l1 * width_levels / 2 + 0.5 + 1e-9) if from_centre else math.floor(l1 * width_levels + 1e-9)
        if r > MAX_BOX_RADIUS:
            raise ValueError(f"the last step's box is too wide for the lossless section ({width_levels:.3f} levels)")
        return max(r, 1)  # the range coder needs two symbols or more, even where only one pixel fits

    def _final_setup(self, z_prev: np.ndarray, z0: np.ndarray, gam: np.ndarray, seed: int, region):
        """What encoder and decoder share for the lossless section: the last step's prior, dither and
        symbols (read back from z_0), the candidate offsets, the rounded box centres and the table function."""
        st, _, _ = self._step(z_prev, float(gam[0]), float(gam[1]), 1)
        u = self._dither(seed, 1, z0.size)
        k = np.round(self.final.forward(z0 - st.mu_p).reshape(-1) / st.delta + u)  # the last step's symbols
        c, h, w = region
        r = self._box_radius(st.delta / st.b * 128.0, from_centre=True)
        off = self._box_offsets(r, c)

        def px(v: np.ndarray) -> np.ndarray:  # (1, 3, H, W) or flat -> (3, n) over the region
            return np.ascontiguousarray(v.reshape(z0.shape)[0, :, :h, :w].reshape(3, -1))

        z1r, mupr, sr, ur, kr = px(z_prev), px(st.mu_p), px(st.scale), px(u), px(k)
        centre = np.round(((px(z0) - st.a * z1r) / st.b + 1.0) * 128.0 - 0.5)
        base = np.clip(centre, 0, 255).astype(np.int64)
        if c == 1:
            base[1:] = base[0]

        def table(sl: slice) -> np.ndarray:
            y = base[:, sl, None] + off.T[:, None, :]  # (3, n, K) candidate pixels
            coded = self.final.forward((st.a * z1r[:, sl, None] + st.b * pixel_to_unit(y.astype(np.float64))
                                        - mupr[:, sl, None])[None])[0]
            feasible = np.all(np.round(coded / st.delta + ur[:, sl, None]) == kr[:, sl, None], axis=0)
            feasible &= np.all((y >= 0) & (y <= 255), axis=0)
            t = coded / sr[:, sl, None]
            lp = -t[0] - 2.0 * np.logaddexp(0.0, -t[0])  # the logistic prior's log-density, channel by channel
            for ch in (1, 2):
                lp = lp + (-t[ch] - 2.0 * np.logaddexp(0.0, -t[ch]))
            lp = np.where(feasible, lp, -np.inf)
            p = np.exp(lp - lp.max(axis=1, keepdims=True))
            return p / p.sum(axis=1, keepdims=True)

        return st, u, k, off, base, r, table

    def encode_final(self, pixels: np.ndarray, region, z_prev: np.ndarray, z0: np.ndarray, gam: np.ndarray,
                     seed: int) -> Section:
        if self.final is None:
            return super().encode_final(pixels, region, z_prev, z0, gam, seed)
        st, u, k, off, base, r, table = self._final_setup(z_prev, z0, gam, seed, region)
        x = pixel_to_unit(pixels.astype(np.float64))[None]
        if not np.array_equal(self._symbols(st, self.final, z_prev, x, u), k):  # x must be a candidate
            raise RuntimeError("the lossless section does not follow from the last step (internal error)")
        c, h, w = region
        digits = pixels[:, :h, :w].reshape(3, -1).astype(np.int64) - base + r
        if digits.min() < 0 or digits.max() > 2 * r:
            raise RuntimeError("a pixel lies outside its last step's box (internal error)")
        n = 2 * r + 1
        sym = digits[0] if c == 1 else (digits[0] * n + digits[1]) * n + digits[2]
        payload, ideal = encode_categorical(sym, len(off), table)
        return Section(KIND_FINAL, self.num_steps + 1, b"", payload, symbols_crc(sym), ideal)

    def decode_final(self, state, sec: Section, region, seed: int) -> np.ndarray:
        if self.final is None:
            return super().decode_final(state, sec, region, seed)
        if state.z_prev is None:
            raise DecodeError("the lossless section needs the latent before the last step")
        _, _, _, off, base, _, table = self._final_setup(state.z_prev, state.z, self.gamma_grid(self.num_steps),
                                                         seed, region)
        c, h, w = region
        sym = decode_categorical(sec.payload, h * w, len(off), table)
        if symbols_crc(sym.astype(np.int64)) != sec.symbols_crc:
            raise DecodeError("lossless section decoded inconsistently (model or platform mismatch)")
        y = base + off[sym.astype(np.int64)].T
        return y[:c].reshape(c, h, w).astype(np.uint8)

    def box_data_nll(self, x_int: torch.Tensor, z1: torch.Tensor, z0: torch.Tensor, gamma0, gamma1,
                     prior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """torch: the lossless section's code length (nats per example) for a model with a final basis.

        x among the pixels y whose last step gives the same box around z_0 (|F (a z_1 + b y - z_0)| <= D/2
        per coordinate), weighted by the last step's logistic prior ``prior`` = (mu_P, scale) as coded,
        or, without it (training evaluates one random step per example), uniformly: a stand-in for the
        training loss, which has no gradient in either form (gamma_0 is frozen in these models)."""
        a, b, beta = (float(v) for v in posterior_coefficients(gamma0.detach().double(), gamma1.detach().double()))
        half = 0.5 * SQRT12 * beta
        r = self._box_radius(2 * half / b * 128.0, from_centre=False)
        off = torch.as_tensor(self._box_offsets(r, 3), device=x_int.device)  # (K, 3), offset 0 in the middle
        K = off.shape[0]
        C = torch.as_tensor(self.final.color, dtype=z0.dtype, device=z0.device)
        out = []
        for n in range(x_int.shape[0]):  # one example at a time: K candidates per pixel
            y = x_int[n, :, :, :, None] + off.T[:, None, None, :]  # (3, H, W, K)
            yu = 2.0 * (y.to(z0.dtype) + 0.5) / 256.0 - 1.0
            coded = torch.einsum("kc,chwn->khwn", C, a * z1[n, ..., None] + b * yu - z0[n, ..., None])
            feasible = (coded.abs() <= half).all(0) & ((y >= 0) & (y <= 255)).all(0)
            feasible[..., K // 2] = True  # x itself (on the boundary only by rounding)
            if prior is None:
                lp = torch.zeros_like(coded[0])
            else:
                mu_p, scale = prior
                t = torch.einsum("kc,chwn->khwn", C, a * z1[n, ..., None] + b * yu - mu_p[n, ..., None])
                t = t / scale[n, ..., None]
                lp = (-t - 2.0 * torch.nn.functional.softplus(-t)).sum(0)
            lp = lp.masked_fill(~feasible, float("-inf"))
            out.append((torch.logsumexp(lp, -1) - lp[..., K // 2]).sum())
        return torch.stack(out)


def expected_step_bits(r: torch.Tensor, scale: torch.Tensor, delta: float, quad: int = 16) -> torch.Tensor:
    """Expected bits of each universally quantized coordinate with shift r = mu_Q - mu_P (in the coded
    basis) under the prior Logistic(0, scale) * U(D): E_{z ~ U(r - D/2, r + D/2)}[-log2(D p(z))],
    by the midpoint rule over the box.  For benchmarks and calibration, not for coding."""
    q = (torch.arange(quad, dtype=r.dtype, device=r.device) + 0.5) / quad - 0.5
    z = r[..., None] + delta * q
    s = scale[..., None]
    p = torch.sigmoid((z + delta / 2) / s) - torch.sigmoid((z - delta / 2) / s)
    return -torch.log2(p.clamp_min(1e-300)).mean(-1)


def log_logistic_bin_t(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """torch version of :func:`diffcodec.entropy.log_logistic_bin` (stable, differentiable)."""
    import torch.nn.functional as F

    return F.logsigmoid(hi) + F.logsigmoid(-lo) + torch.log(-torch.expm1(torch.clamp(lo - hi, max=-1e-12)))

