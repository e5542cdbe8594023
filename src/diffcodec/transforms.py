"""Learned-compression transforms: GDN, rate-conditioned analysis/synthesis and hyperprior networks.

These are the building blocks of the RVGC codec (a Balle-et-al.-2018-style hyperprior autoencoder
whose quantisation step q is a continuous input).  Why they look the way they do:

* **GDN / inverse GDN** (Balle et al. 2016) instead of ReLU in the pixel transforms: a divisive
  normalisation Gaussianises local statistics, which is what lets a small transform reach good
  rate-distortion; it is the standard choice of CompressAI's reference models.
* **q conditioning by FiLM** (per-channel scale and shift from an embedding of log q) in the
  synthesis and hyper transforms: one model serves every rate.  The analysis transform g_a is *not*
  conditioned, so y = g_a(x) is one latent for all q and ``y + q u`` is a single forward "diffusion"
  indexed by q (DESIGN §2) that the latent denoiser learns to reverse.
* Everything is convolutional and local (no normalisation over the image), so a model trained on
  crops runs on any image size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .networks import sinusoidal_embedding


class GDN(nn.Module):
    """Generalised divisive normalisation: y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2).

    ``inverse=True`` multiplies instead (IGDN, for synthesis).  beta and gamma are kept
    non-negative by a square reparametrisation; beta has a small floor so the denominator never
    vanishes.
    """

    def __init__(self, channels: int, inverse: bool = False, gamma_init: float = 0.1, beta_min: float = 1e-6):
        super().__init__()
        self.inverse = inverse
        self.beta_min = beta_min
        self.beta_p = nn.Parameter(torch.ones(channels))
        self.gamma_p = nn.Parameter(math.sqrt(gamma_init) * torch.eye(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta_p.pow(2) + self.beta_min
        gamma = self.gamma_p.pow(2)[:, :, None, None]
        norm = F.conv2d(x * x, gamma, beta)
        return x * torch.sqrt(norm) if self.inverse else x * torch.rsqrt(norm)


class RateEmbedding(nn.Module):
    """log q -> a conditioning vector (sinusoidal features of normalised log q, then an MLP)."""

    def __init__(self, dim: int, log_q_range: tuple[float, float]):
        super().__init__()
        self.dim = dim
        self.log_q_range = log_q_range
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, log_q: torch.Tensor) -> torch.Tensor:
        lo, hi = self.log_q_range
        v = (log_q.reshape(-1) - lo) / (hi - lo)
        return self.mlp(sinusoidal_embedding(v, self.dim))


class FiLM(nn.Module):
    """Per-channel scale and shift from the rate embedding (identity at initialisation)."""

    def __init__(self, emb_dim: int, channels: int):
        super().__init__()
        self.lin = nn.Linear(emb_dim, 2 * channels)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.lin(emb)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + scale) + shift


def _down(cin: int, cout: int, k: int = 5) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=2, padding=k // 2)


def _up(cin: int, cout: int, k: int = 5) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, stride=2, padding=k // 2, output_padding=1)


class Analysis(nn.Module):
    """g_a: image (3, H, W) in [-1, 1] -> latent y (M, H/16, W/16)."""

    def __init__(self, N: int, M: int, in_channels: int = 3):
        super().__init__()
        self.net = nn.Sequential(
            _down(in_channels, N), GDN(N), _down(N, N), GDN(N), _down(N, N), GDN(N), _down(N, M)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Synthesis(nn.Module):
    """g_s: latent (M, h, w) and rate embedding -> image (3, 16h, 16w).

    ``refine`` > 0 adds a full-resolution head: the Balle-style stack ends in one linear transposed
    convolution from half resolution, so every output pixel is a linear mix of half-resolution
    features -- little capacity at the finest scale, which is where the bundled models lose realism
    to JPEG (docs/results.md).  The head (up-convolution to ``refine`` channels, two 3x3 convolutions
    at full resolution) adds a residual to that output; its last convolution starts at zero, so a
    model gains the head without changing what it computes (:func:`widen_synthesis`).  Measured on
    ``rvgc-small7`` (docs/results.md): the grown decoder improved PSNR and the coarser levels of
    SWD, while the finest level stayed where it was.
    """

    def __init__(self, N: int, M: int, emb_dim: int, out_channels: int = 3, refine: int = 0):
        super().__init__()
        self.N, self.refine = N, refine
        self.ups = nn.ModuleList([_up(M, N), _up(N, N), _up(N, N)])
        self.films = nn.ModuleList([FiLM(emb_dim, N) for _ in range(3)])
        self.gdns = nn.ModuleList([GDN(N, inverse=True) for _ in range(3)])
        self.out = _up(N, out_channels)
        if refine:
            self.head_up = _up(N, refine)
            self.head_film = FiLM(emb_dim, refine)
            self.head_conv = nn.Conv2d(refine, refine, 3, padding=1)
            self.head_out = nn.Conv2d(refine, out_channels, 3, padding=1)
            nn.init.zeros_(self.head_out.weight)
            nn.init.zeros_(self.head_out.bias)

    def forward(self, y: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = y
        for up, film, gdn in zip(self.ups, self.films, self.gdns):
            h = gdn(film(up(h), emb))
        x = self.out(h)
        if self.refine:
            r = F.leaky_relu(self.head_film(self.head_up(h), emb), 0.1)
            r = F.leaky_relu(self.head_conv(r), 0.1)
            x = x + self.head_out(r)
        return x


def _copy_film(old: FiLM, new: FiLM, n_old: int, n_new: int) -> None:
    """Old channels keep their scale and shift (rows [scale (n), shift (n)]); new ones stay identity."""
    for half in range(2):
        new.lin.weight[half * n_new:half * n_new + n_old] = old.lin.weight[half * n_old:(half + 1) * n_old]
        new.lin.bias[half * n_new:half * n_new + n_old] = old.lin.bias[half * n_old:(half + 1) * n_old]


@torch.no_grad()
def widen_synthesis(old: Synthesis, N: int, refine: int, cross_gamma: float = 1e-3) -> Synthesis:
    """A copy of ``old`` with ``N`` hidden channels and a ``refine``-channel head that computes the same
    function (to ~1e-6: see ``cross_gamma``), so that decoder fine-tuning starts from the trained
    decoder instead of from scratch (Net2Net-style growth, Chen et al. 2016).

    New hidden channels get the fresh module's random incoming weights and *zero* outgoing weights
    (so the old outputs do not see them, but the outgoing weights get gradients), identity FiLM,
    and an IGDN that leaves them unnormalised by the old channels.  IGDN's gamma is a squared
    parameter, whose gradient vanishes at zero: the cross terms get ``cross_gamma`` (gamma =
    cross_gamma^2 = 1e-6) instead of zero so they can learn, at a ~1e-6 relative change of the output.
    """
    N0, emb_dim = old.N, old.films[0].lin.in_features
    M, out_channels = old.ups[0].in_channels, old.out.out_channels
    if N < N0 or refine < old.refine:
        raise ValueError(f"cannot shrink a synthesis transform (N {N0} -> {N}, refine {old.refine} -> {refine})")
    new = Synthesis(N, M, emb_dim, out_channels, refine)
    for i in range(3):
        w_old, w_new = old.ups[i].weight, new.ups[i].weight  # (in, out, k, k)
        cin = w_old.shape[0]
        w_new[cin:] = 0  # new inputs feed nothing yet
        w_new[:cin, :N0] = w_old
        new.ups[i].bias[:N0] = old.ups[i].bias
        new.ups[i].bias[N0:] = 0
        _copy_film(old.films[i], new.films[i], N0, N)
        g_o, g_n = old.gdns[i], new.gdns[i]
        g_n.beta_p[:N0] = g_o.beta_p
        g_n.gamma_p[:N0, N0:] = cross_gamma
        g_n.gamma_p[N0:, :N0] = cross_gamma
        g_n.gamma_p[:N0, :N0] = g_o.gamma_p
    new.out.weight.zero_()
    new.out.weight[:N0] = old.out.weight
    new.out.bias.copy_(old.out.bias)
    if old.refine:
        r0 = old.refine
        new.head_up.weight[N0:] = 0
        new.head_up.weight[:N0, :r0] = old.head_up.weight
        new.head_up.bias[:r0] = old.head_up.bias
        _copy_film(old.head_film, new.head_film, r0, refine)
        new.head_conv.weight[:, r0:] = 0
        new.head_conv.weight[:r0, :r0] = old.head_conv.weight
        new.head_conv.bias[:r0] = old.head_conv.bias
        new.head_out.weight[:, :r0] = old.head_out.weight
        new.head_out.bias.copy_(old.head_out.bias)
    return new


class HyperAnalysis(nn.Module):
    """h_a: latent y (M, h, w) -> hyper-latent z (Nz, h/4, w/4), conditioned on q."""

    def __init__(self, M: int, N: int, Nz: int, emb_dim: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(M, N, 3, padding=1), _down(N, N)])
        self.films = nn.ModuleList([FiLM(emb_dim, N) for _ in range(2)])
        self.out = _down(N, Nz)

    def forward(self, y: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = y
        for conv, film in zip(self.convs, self.films):
            h = F.leaky_relu(film(conv(h), emb), 0.1)
        return self.out(h)


class HyperSynthesis(nn.Module):
    """h_s: hyper-latent z and q -> (mean, log sigma) of the Gaussian conditional of y."""

    def __init__(self, Nz: int, N: int, M: int, emb_dim: int):
        super().__init__()
        self.ups = nn.ModuleList([_up(Nz, N), _up(N, N)])
        self.films = nn.ModuleList([FiLM(emb_dim, N) for _ in range(2)])
        self.out = nn.Conv2d(N, 2 * M, 3, padding=1)

    def forward(self, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = z
        for up, film in zip(self.ups, self.films):
            h = F.leaky_relu(film(up(h), emb), 0.1)
        return self.out(h)
