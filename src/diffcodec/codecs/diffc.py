"""DiffC: lossy compression with Gaussian diffusion (Theis, Salimans, Hoffman, Mentzer 2022).

The model is a variance-preserving Gaussian diffusion (VDM: continuous-time loss, learned linear
gamma schedule, 256-way p(x|z_0)) sharing the denoiser and the diffusion core with UQDM.  The
codec sends, step by step on a grid t_T = 1 > ... > t_0 = 0, a *sample* of
q(z_s | z_t, x) = N(mu_Q, beta^2) under the model prior p(z_s | z_t) = N(mu_P, beta^2) by
reverse channel coding (:mod:`diffcodec.channel`).  A step costs about
KL = (SNR_s - SNR_t)/2 |x - x_hat(z_t)|^2 nats, the VDM loss term.  Any received z_t can be
turned into an image by ``denoise``, ``ancestral`` (DiffC-A) or ``flow`` (DiffC-F: the
probability-flow ODE, ~3 dB better than ancestral at high rates).  After the last step the
image can be finished losslessly under p(x | z_0), like UQDM.

Everything the decoder needs is in the file: T in the header, and each step's chunk layout
(number of chunks, KL budget, candidate count) in its section parameters.  ``c_max`` is thus an
encoder-only choice: the model's value is a default, ``compress(..., c_max=K)`` overrides it.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import channel
from ..diffusion import KIND_STEP, DiffusionModel
from ..errors import DecodeError
from ..networks import UNetConfig
from ..schedule import LOG2, alpha_sigma, posterior_coefficients
from .base import Section

DEFAULT_C_MAX = 12


class DiffC(DiffusionModel):
    codec_id = "diffc"

    def __init__(self, unet: UNetConfig | None = None, num_steps: int = 16, gamma_min: float = -12.3,
                 gamma_max: float = 6.0, c_max: int = DEFAULT_C_MAX):
        unet = unet or UNetConfig(out_channels=3)
        super().__init__(unet, gamma_min=gamma_min, gamma_max=gamma_max, num_steps=num_steps)
        if not 4 <= c_max <= 20:
            raise ValueError("c_max must be in 4..20 bits")
        self.c_max = c_max

    def config_dict(self) -> dict:
        d = super().config_dict()
        d["c_max"] = self.c_max
        return d

    @classmethod
    def from_config(cls, cfg: dict) -> DiffC:
        return cls(UNetConfig.from_dict(cfg["unet"]), num_steps=int(cfg["num_steps"]),
                   gamma_max=float(cfg.get("gamma_max", 6.0)), c_max=int(cfg.get("c_max", DEFAULT_C_MAX)))

    # ------------------------------------------------------------------ training loss (VDM)
    def forward(self, x: torch.Tensor, all_steps: bool = False) -> dict[str, torch.Tensor]:
        """Continuous-time VDM NELBO of x (float in [-1, 1]) in bits per dimension.

        prior KL(q(z_1|x) || N(0, I)) + diffusion loss 0.5 gamma'(t) |eps - eps_hat|^2 at one
        t per example (low-discrepancy sampled across the batch) + -log p(x | z_0).
        ``all_steps`` is accepted for the trainer's validation call and uses the same estimator.
        """
        B = x.shape[0]
        dims = x[0].numel()
        g0 = self.schedule(torch.zeros((), device=x.device))
        g1 = self.schedule(torch.ones((), device=x.device))
        # prior term
        a1, s1 = alpha_sigma(g1)
        prior = 0.5 * (s1**2 + a1**2 * x**2 - 1.0 - torch.log(s1**2)).flatten(1).sum(1)
        # diffusion term
        u0 = torch.rand((), device=x.device)
        t = torch.remainder(u0 + torch.arange(B, device=x.device, dtype=x.dtype) / B, 1.0)
        g_t = self.schedule(t).view(B, 1, 1, 1)
        a_t, s_t = alpha_sigma(g_t)
        eps = torch.randn_like(x)
        z_t = a_t * x + s_t * eps
        eps_hat = self.net_train(z_t, g_t.view(B))[:, : self.channels]
        diff = 0.5 * (g1 - g0) * (eps - eps_hat).pow(2).flatten(1).sum(1)
        # reconstruction term
        a0, s0 = alpha_sigma(g0)
        z0 = a0 * x + s0 * torch.randn_like(x)
        x_int = torch.round((x + 1.0) * 128.0 - 0.5).long().clamp(0, 255)
        recon = self.data_nll(z0, g0, x_int).flatten(1).sum(1)
        norm = dims * LOG2
        return {"bpd": (prior + diff + recon) / norm, "diffusion_bpd": diff / norm, "data_bpd": recon / norm,
                "prior_bpd": prior / norm, "gamma_min": g0.detach()}

    # ------------------------------------------------------------------ coding
    def _prior(self, z: np.ndarray, i: int, gam: np.ndarray):
        eps, _ = self.eval_f64(z, float(gam[i]))
        x_hat = self.x_hat_f64(z, eps, float(gam[i]))
        a, b, beta = (float(v) for v in posterior_coefficients(np.float64(gam[i - 1]), np.float64(gam[i])))
        return a * z + b * x_hat, a, b, beta

    def encode_step(self, z: np.ndarray, x: np.ndarray, i: int, gam: np.ndarray, seed: int,
                    c_max: int | None = None, pad: float | None = None):
        """Send a sample of q(z_s | z_t, x); ``c_max`` (bits per chunk) trades speed for fidelity.

        ``pad`` (bits of slack between a chunk's KL and log2 of its candidate count, default
        :data:`channel.DEFAULT_PAD`) trades rate against how exact the sample is; like ``c_max`` it
        is an encoder choice (the layout is in the file), see ``benchmarks/diffc_pad.py``.
        """
        c_max = int(c_max or self.c_max)
        if not 4 <= c_max <= 20:
            raise ValueError("c_max must be in 4..20 bits")
        pad = channel.DEFAULT_PAD if pad is None else float(pad)
        channel.check_pad(pad, c_max)  # before the network runs, not only in choose_layout
        mu_p, a, b, beta = self._prior(z, i, gam)
        m = ((a * z + b * x) - mu_p) / beta
        X, payload, layout, _index_bits, kl_bits = channel.encode_step(m.reshape(-1), seed, i, c_max=c_max,
                                                                       pad=pad)
        z_s = mu_p + beta * X.reshape(z.shape)
        crc = channel.sample_crc(X)
        # the ideal cost of a DiffC step is its KL: what an exact channel simulation would spend
        return z_s, Section(KIND_STEP, self.num_steps - i + 1, layout.to_bytes(), payload, crc, kl_bits)

    def _decode_sample(self, z: np.ndarray, sec: Section, i: int, gam: np.ndarray, seed: int):
        """(mu_P, beta, X, layout) of a step section: z_s = mu_P + beta X."""
        try:
            layout = channel.StepLayout.from_bytes(sec.params)
        except (ValueError, DecodeError) as e:
            raise DecodeError(f"malformed parameters in section {sec.index}: {e}") from None
        mu_p, _, _, beta = self._prior(z, i, gam)
        X = channel.decode_step(sec.payload, layout, z.size, seed, i)
        if channel.sample_crc(X) != sec.symbols_crc:
            raise DecodeError(f"step {sec.index} decoded inconsistently (model or platform mismatch)")
        return mu_p, beta, X.reshape(z.shape), layout

    def decode_step(self, z: np.ndarray, sec: Section, i: int, gam: np.ndarray, seed: int) -> np.ndarray:
        mu_p, beta, X, _ = self._decode_sample(z, sec, i, gam, seed)
        return mu_p + beta * X

    def decode_step_view(self, z: np.ndarray, sec: Section, i: int, gam: np.ndarray, seed: int
                         ) -> tuple[np.ndarray, np.ndarray, float]:
        """z_s as sent, and the channel-aware latent reconstructions start from (:func:`undo_shortfall`)."""
        mu_p, beta, X, layout = self._decode_sample(z, sec, i, gam, seed)
        z_s = mu_p + beta * X
        eff = channel.estimate_efficiency(X, layout)
        if eff <= 0.0:  # nothing was sent: z_s is a prior draw, no shortfall to undo
            return z_s, z_s, float(gam[i - 1])
        z_view, gamma_view = undo_shortfall(mu_p, X, beta, eff, float(gam[i - 1]))
        return z_s, z_view, gamma_view

    def sample_reverse_step(self, z, eps, aux, gamma_s, gamma_t, rng):
        x_hat = self.x_hat_f64(z, eps, gamma_t)
        a, b, beta = (float(v) for v in posterior_coefficients(np.float64(gamma_s), np.float64(gamma_t)))
        return a * z + b * x_hat + beta * rng.normal(z.shape)


def undo_shortfall(mu_p: np.ndarray, X: np.ndarray, beta: float, eff: float, gamma_s: float
                   ) -> tuple[np.ndarray, float]:
    """The latent (and its gamma) that a step's inexact sample is an exact sample of.

    The coder sends X ~ eff m + N(0, I) instead of N(m, I) (:func:`channel.estimate_efficiency`), so
    z_s = mu_P + beta X sits (1 - eff) of the way back from the target towards the prior mean, a
    shortfall along x - x_hat that reconstructions would keep, since they read z_s as alpha_s x +
    sigma_s eps.  Rescaling the step, mu_P + beta X / eff = alpha_s x + noise of variance
    sigma_s^2 + beta^2 (1/eff^2 - 1), is unbiased but noisier: after normalising to unit total
    variance it is a latent of the model at gamma' = log(noise variance / alpha_s^2) > gamma_s.
    Reconstructions from there undo the shortfall instead of inheriting it (measured on diffc-small4:
    flow better at every step, denoise better from step 8 of 16 on but 0.21 dB worse at step 2,
    ancestral a truer sample; README); the chain itself keeps z_s, bit for bit the encoder's.
    """
    alpha_s, sigma_s = alpha_sigma(np.float64(gamma_s))
    var = float(sigma_s**2 + beta**2 * (1.0 / eff**2 - 1.0))
    scale = 1.0 / np.sqrt(float(alpha_s**2) + var)
    z_view = (mu_p + (beta / eff) * X) * scale
    return z_view, float(np.log(var / float(alpha_s**2)))
