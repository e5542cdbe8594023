"""Noise schedules in variance-preserving VDM notation (DESIGN §1).

gamma(t) = -log SNR(t) for t in [0, 1]; sigma_t^2 = sigmoid(gamma_t), alpha_t^2 = sigmoid(-gamma_t).

The schedule is a learned *linear* gamma: gamma_max is fixed (the last latent must be close to
pure noise so that z_T drawn from N(0, I) is a good start), gamma_min is a parameter trained with
the network, because it sets the trade-off between the cost of the last diffusion step and the
cost of the lossless p(x|z_0) term.  It is an ``nn.Module`` so that it is saved with the weights.

All helpers work on torch tensors *and* on float64 numpy arrays: the codecs evaluate the
schedule in float64 so that encoder and decoder compute bit-identical coefficients.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class LinearGammaSchedule(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) * t with learnable gamma_min."""

    def __init__(self, gamma_min: float = -12.3, gamma_max: float = 6.0, learn_min: bool = True):
        super().__init__()
        self.gamma_min = nn.Parameter(torch.tensor(float(gamma_min)), requires_grad=learn_min)
        self.register_buffer("gamma_max", torch.tensor(float(gamma_max)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t

    def gammas_f64(self, t: np.ndarray | list[float]) -> np.ndarray:
        """gamma at the given times, in float64 numpy (used by the coders)."""
        g0 = float(self.gamma_min.detach().double())
        g1 = float(self.gamma_max.detach().double())
        t = np.asarray(t, dtype=np.float64)
        return g0 + (g1 - g0) * t


def _sigmoid(x):
    if isinstance(x, torch.Tensor):
        return torch.sigmoid(x)
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def alpha_sigma(gamma):
    """(alpha, sigma) for a gamma value or array: alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)."""
    if isinstance(gamma, torch.Tensor):
        return torch.sqrt(torch.sigmoid(-gamma)), torch.sqrt(torch.sigmoid(gamma))
    return np.sqrt(_sigmoid(-gamma)), np.sqrt(_sigmoid(gamma))


def posterior_coefficients(gamma_s, gamma_t):
    """Coefficients of q(z_s | z_t, x) = N(a z_t + b x, beta^2) for s < t.

    c = -expm1(gamma_s - gamma_t) = 1 - SNR_t/SNR_s,
    a = (alpha_t/alpha_s) (sigma_s^2/sigma_t^2), b = alpha_s c, beta^2 = sigma_s^2 c.
    Returns (a, b, beta).
    """
    if isinstance(gamma_s, torch.Tensor) or isinstance(gamma_t, torch.Tensor):
        c = -torch.expm1(gamma_s - gamma_t)
        sq = torch.sqrt
    else:
        c = -np.expm1(np.asarray(gamma_s, np.float64) - np.asarray(gamma_t, np.float64))
        sq = np.sqrt
    alpha_s, sigma_s = alpha_sigma(gamma_s)
    alpha_t, sigma_t = alpha_sigma(gamma_t)
    a = (alpha_t / alpha_s) * (sigma_s**2 / sigma_t**2)
    b = alpha_s * c
    beta = sigma_s * sq(c)
    return a, b, beta


def time_grid(num_steps: int) -> list[float]:
    """Times t_i = i / T, i = 0..T, used by the progressive coders (z_T at t=1, z_0 at t=0)."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    return [i / num_steps for i in range(num_steps + 1)]


def pixel_to_unit(k):
    """Pixel level k in 0..255 -> x in [-1, 1] (bin centres: 2(k + 0.5)/256 - 1)."""
    return 2.0 * (k + 0.5) / 256.0 - 1.0


def unit_to_pixel(x):
    """Inverse of :func:`pixel_to_unit` with rounding and clipping to 0..255."""
    if isinstance(x, torch.Tensor):
        return torch.clamp(torch.round((x + 1.0) * 128.0 - 0.5), 0, 255).to(torch.uint8)
    return np.clip(np.round((np.asarray(x) + 1.0) * 128.0 - 0.5), 0, 255).astype(np.uint8)


LOG2 = math.log(2.0)
