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
from ..diffusion import KIND_STEP, DiffusionModel
from ..entropy import CategoricalDecoder, CategoricalEncoder, logistic_bin_probs, symbols_crc
from ..errors import DecodeError
from ..networks import UNetConfig
from ..schedule import LOG2, posterior_coefficients
from .base import Section
from .context import DIRECTIONS, context_np, context_t, from_blocks, second_pass, to_blocks
from .noise_basis import BASES, NoiseBasis

SQRT12 = math.sqrt(12.0)
LOGISTIC_STD_TO_SCALE = math.sqrt(3.0) / math.pi
AUX_MIN, AUX_MAX = -10.0, 5.0
MAX_HALF_WIDTH = 1 << 15


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


class UQDM(DiffusionModel):
    codec_id = "uqdm"

    def __init__(self, unet: UNetConfig | None = None, num_steps: int = 4, gamma_min: float = -12.3,
                 gamma_max: float = 6.0, noise_basis: str = "rgb", scale_offsets: bool = False,
                 scale_offset_steps: int | None = None, context: str | None = None,
                 context_steps: int | None = None):
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
                   context_steps=cfg.get("context_steps"))

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
        return out

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

    def _scale_np(self, aux: np.ndarray, gamma_t: float, b: float) -> np.ndarray:
        aux = aux + self.log_scale_offset(gamma_t, aux.shape) if self.scale_offsets else aux
        return _base_scale(np.float64(gamma_t), b) * np.exp(np.clip(aux, AUX_MIN, AUX_MAX))

    # ------------------------------------------------------------------ training loss
    def forward(self, x: torch.Tensor, all_steps: bool = False, num_steps: int | None = None
                ) -> dict[str, torch.Tensor]:
        """Code length of x (float in [-1, 1], pixel-centred) in bits per dimension.

        Simulates the forward chain from z_T ~ N(0, I) (no network calls), then evaluates the
        network at one random step per example (unbiased estimate: T times that step's cost) or,
        with ``all_steps``, at every step (exact, T network calls; used for validation).
        ``num_steps`` runs the chain on another step count's grid than the model's own T (training
        on several grids, ``train --train-steps``): the network is conditioned on gamma and the
        learned scale is relative to the step's own coefficient b, so one network serves several T.
        Returns a dict with ``bpd`` (per-example, for the optimiser), and diagnostics.
        """
        T = num_steps or self.num_steps
        basis = self.basis
        B = x.shape[0]
        dims = x[0].numel()
        t = torch.arange(T + 1, dtype=x.dtype, device=x.device) / T
        gam = self.schedule(t)
        z = torch.randn_like(x)
        chain = [None] * (T + 1)
        chain[T] = z
        for j in range(T, 0, -1):
            a, b, beta = posterior_coefficients(gam[j - 1], gam[j])
            mu_q = a * z + b * x
            z = mu_q + SQRT12 * beta * basis.inverse_t(torch.rand_like(x) - 0.5)
            chain[j - 1] = z
        if all_steps:
            steps = [torch.full((B,), j, device=x.device, dtype=torch.long) for j in range(1, T + 1)]
            weight = 1.0
        else:
            steps = [torch.randint(1, T + 1, (B,), device=x.device)]
            weight = float(T)
        zs_all = torch.stack(chain)  # (T+1, B, C, H, W)
        ar = torch.arange(B, device=x.device)
        step_nats = torch.zeros(B, dtype=x.dtype, device=x.device)
        for idx in steps:
            z_t, z_s = zs_all[idx, ar], zs_all[idx - 1, ar]
            g_t = gam[idx].view(B, 1, 1, 1)
            g_s = gam[idx - 1].view(B, 1, 1, 1)
            eps, aux = self.split_output(self.net_train(z_t, gam[idx]))
            x_hat = self.x_hat_from_eps(z_t, eps, g_t)
            a, b, beta = posterior_coefficients(g_s, g_t)
            mu_p = a * z_t + b * x_hat
            half = 0.5 * SQRT12 * beta
            if self.scale_offsets:
                aux = aux + self.log_scale_offset(gam[idx], aux.shape)
            scale = _base_scale(g_t, b) * torch.exp(torch.clamp(aux, AUX_MIN, AUX_MAX))
            d = basis.forward_t(z_s - mu_p)  # the coded coordinates
            if self.context:  # the second pass's prior, moved and rescaled by the first pass's values
                p = basis.block
                db, sb = to_blocks(d, p), to_blocks(scale, p)
                m, s2 = context_t(db, sb, self.param_at(self.context_weight, gam[idx]),
                                  self.param_at(self.context_adapt, gam[idx]))
                sel = torch.as_tensor(second_pass(*db.shape[-2:]), device=d.device)
                d = from_blocks(torch.where(sel, db - m, db))
                scale = from_blocks(torch.where(sel, s2, sb))
            nll = -log_logistic_bin_t((d - half) / scale, (d + half) / scale)
            step_nats = step_nats + nll.flatten(1).sum(1)
        x_int = torch.round((x + 1.0) * 128.0 - 0.5).long().clamp(0, 255)
        data_nats = self.data_nll(chain[0], gam[0], x_int).flatten(1).sum(1)
        total = weight * step_nats + data_nats
        norm = dims * LOG2
        return {
            "bpd": total / norm,
            "steps_bpd": weight * step_nats / norm,
            "data_bpd": data_nats / norm,
            "gamma_min": gam[0].detach(),
        }

    @torch.no_grad()
    def step_residuals(self, x: torch.Tensor):
        """Walk the model's own forward chain on images x (float in [-1, 1]) and yield, for each step
        t_j -> t_{j-1} from the coarsest, (j, r, scale, D): the shift r = mu_Q - mu_P in RGB (the coded
        coordinates are ``basis.forward_t(r)``), the prior scale of every coded coordinate (offsets
        included) and the box width D.  For benchmarks and calibration (scripts/fit_scale_offsets.py);
        draws z_T and the step noise from torch's generator, in x's dtype."""
        T = self.num_steps
        gam = self.schedule(torch.arange(T + 1, dtype=x.dtype) / T).detach()
        z = torch.randn_like(x)
        for j in range(T, 0, -1):
            a, b, beta = posterior_coefficients(gam[j - 1], gam[j])
            eps, aux = self.split_output(self.net(z, gam[j]))
            mu_p = a * z + b * self.x_hat_from_eps(z, eps, gam[j])
            mu_q = a * z + b * x
            delta = float(SQRT12 * beta)
            if self.scale_offsets:
                aux = aux + self.log_scale_offset(gam[j].reshape(1), aux.shape)
            yield j, mu_q - mu_p, _base_scale(gam[j], b) * torch.exp(torch.clamp(aux, AUX_MIN, AUX_MAX)), delta
            z = mu_q + delta * self.basis.inverse_t(torch.rand_like(x) - 0.5)

    # ------------------------------------------------------------------ coding helpers
    def _step(self, z: np.ndarray, gamma_s: float, gamma_t: float) -> tuple[_Step, np.ndarray, np.ndarray]:
        eps, aux = self.eval_f64(z, gamma_t)
        x_hat = self.x_hat_f64(z, eps, gamma_t)
        a, b, beta = (float(v) for v in posterior_coefficients(np.float64(gamma_s), np.float64(gamma_t)))
        scale = self._scale_np(aux, gamma_t, b)
        return _Step(a * z + b * x_hat, scale, SQRT12 * beta, a, b), eps, aux

    @staticmethod
    def _table(scale: np.ndarray, delta: float, u: np.ndarray, half_width: int, mean: np.ndarray | None = None):
        """Table function for k in [-R, R] given a step's scale and D and the dither u (flat arrays),
        P(k) logistic * uniform; ``mean``: the prior's shift from mu_P (the context's second pass)."""
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
            return logistic_bin_probs(lo, hi).T

        return table

    def _max_half_width(self, st: _Step) -> int:
        """The largest |k| any image can produce at this step, known to both sides.

        mu_Q - mu_P = b (x - x_hat) with x and x_hat in [-1, 1], so a coded coordinate, a row m of
        the basis applied to it, is at most 2b |m|_1 and |k| <= 2b |m|_1/D + 1/2 (plus the
        rounding).  The decoder refuses wider symbol ranges: table work grows with the range, and a
        forged section must not turn a normal decode into hours.
        """
        l1 = self.basis.max_row_l1
        return max(1, math.ceil(2.0 * l1 * st.b / st.delta + 0.5))

    def sample_reverse_step(self, z, eps, aux, gamma_s, gamma_t, rng):
        x_hat = self.x_hat_f64(z, eps, gamma_t)
        a, b, beta = (float(v) for v in posterior_coefficients(np.float64(gamma_s), np.float64(gamma_t)))
        scale = self._scale_np(aux, gamma_t, b)
        mu_p = a * z + b * x_hat
        noise = scale * rng.logistic(z.shape) + SQRT12 * beta * (rng.uniform(z.shape) - 0.5)
        return mu_p + self.basis.inverse(noise)

    def encode_step(self, z: np.ndarray, x: np.ndarray, i: int, gam: np.ndarray, seed: int, **options):
        """Universal quantization of step t_i -> t_{i-1}; returns (z_s, section)."""
        z_s, finish = self.begin_encode_step(z, x, i, gam, seed, **options)
        return z_s, finish()

    def begin_encode_step(self, z: np.ndarray, x: np.ndarray, i: int, gam: np.ndarray, seed: int, **options):
        """The symbols and z_s now; their entropy coding in ``finish`` (may run in another thread)."""
        if options:
            raise ValueError(f"uqdm has no encoder options {sorted(options)}")
        st, _, _ = self._step(z, float(gam[i - 1]), float(gam[i]))
        u = rngmod.SeededStream(seed, rngmod.DITHER, i).uniform((z.size,)) - 0.5
        mu_q = st.a * z + st.b * x
        k = np.round(self.basis.forward(mu_q - st.mu_p).reshape(-1) / st.delta + u)
        half_width = int(max(1, np.abs(k).max()))
        if half_width > min(MAX_HALF_WIDTH, self._max_half_width(st)):
            raise ValueError("step symbol out of range (model unsuited to this image)")
        k = k.astype(np.int64)
        z_s = self._z_s(st, k, u, z.shape)
        passes = self._passes(st.scale, st.delta, k, u, float(gam[i]), z.shape)  # holds neither mu_p nor z

        def finish() -> Section:
            enc = CategoricalEncoder()
            for idx, table in passes:
                enc.encode(k[idx] + half_width, 2 * half_width + 1, table(half_width))
            return Section(KIND_STEP, self.num_steps - i + 1, struct.pack("<H", half_width), enc.finish(),
                           symbols_crc(k), enc.ideal)

        return z_s, finish

    def decode_step(self, z: np.ndarray, sec: Section, i: int, gam: np.ndarray, seed: int) -> np.ndarray:
        if len(sec.params) != 2:
            raise DecodeError(f"malformed parameters in section {sec.index}")
        (half_width,) = struct.unpack("<H", sec.params)
        st, _, _ = self._step(z, float(gam[i - 1]), float(gam[i]))
        if not 1 <= half_width <= self._max_half_width(st):  # a forged width would only cost time
            raise DecodeError(f"corrupt parameters in section {sec.index} (symbol range {half_width})")
        u = rngmod.SeededStream(seed, rngmod.DITHER, i).uniform((z.size,)) - 0.5
        k = np.zeros(z.size, dtype=np.int64)
        dec = CategoricalDecoder(sec.payload)
        # the passes are built lazily: the second pass's tables need the first pass's symbols in k
        for idx, table in self._passes(st.scale, st.delta, k, u, float(gam[i]), z.shape):
            k[idx] = dec.decode(idx.size, 2 * half_width + 1, table(half_width)).astype(np.int64) - half_width
        if symbols_crc(k) != sec.symbols_crc:
            raise DecodeError(f"step {sec.index} decoded inconsistently (model or platform mismatch)")
        return self._z_s(st, k, u, z.shape)

    def _passes(self, step_scale: np.ndarray, delta: float, k: np.ndarray, u: np.ndarray, gamma_t: float, shape):
        """Yield the coding passes of a step, (flat indices, half_width -> table function): one pass
        over every coordinate, or with the checkerboard context the first-pass blocks and then the
        second-pass blocks under the prior their neighbours' decoded values give (context.py).  A
        generator: the second pass is built only once the caller has filled the first pass into k."""
        scale = step_scale.reshape(-1)
        if not self.context:
            yield np.arange(k.size), lambda hw: self._table(scale, delta, u, hw)
            return
        p = self.basis.block
        n, c, h, w = shape
        sel = np.broadcast_to(np.kron(second_pass(h // p, w // p), np.ones((p, p), dtype=bool)), shape).reshape(-1)
        first, second = np.flatnonzero(~sel), np.flatnonzero(sel)
        yield first, lambda hw: self._table(scale[first], delta, u[first], hw)
        e = np.zeros(k.size, dtype=np.float64)
        e[first] = (k[first] - u[first]) * delta  # the first pass's decoded values, zero elsewhere
        m, s2 = context_np(to_blocks(e.reshape(shape), p), to_blocks(step_scale.reshape(shape), p),
                           self.param_at(self.context_weight, gamma_t), self.param_at(self.context_adapt, gamma_t))
        m, s2 = from_blocks(m).reshape(-1)[second], from_blocks(s2).reshape(-1)[second]
        yield second, lambda hw: self._table(s2, delta, u[second], hw, mean=m)

    def _z_s(self, st: _Step, k: np.ndarray, u: np.ndarray, shape) -> np.ndarray:
        """z_s = mu_P + M^T (k - u) D: both sides, the same float64 operations."""
        return st.mu_p + self.basis.inverse((k.reshape(shape) - u.reshape(shape)) * st.delta)


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

