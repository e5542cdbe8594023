"""Denoising networks shared by the diffusion codecs.

``DenoiserUNet`` is a small time-conditioned U-Net.  Design choices, and why:

* **No GroupNorm / BatchNorm.**  Normalisation with image-wide statistics makes the output at a
  pixel depend on the whole image, so a model trained on 32x32 crops behaves differently on a
  768x512 photo, and the result would depend on padding.  We use a per-pixel channel
  normalisation (LayerNorm over channels) instead: the network is purely local and convolutional.
* **Time conditioning by gamma**, not t: the codecs may use any step grid and a learned
  schedule, and gamma (= -log SNR) is what the denoiser actually needs to know.
* **Two outputs per channel** (``out_channels = 2 * C`` by default): eps_hat and a raw log-scale
  used by UQDM's learned per-pixel prior scale.  The UQDM paper reports that without a learned
  variance each step costs >= 1/3 bit/dim more.
* No attention: on this CPU attention on large feature maps is prohibitively slow, and a
  convolution-only network runs on any image size.
* **Optional pixel-unshuffle stem** (``patch``): blocks then run at 1/patch resolution and below,
  which on a CPU is the difference between a usable and an unusable codec (every coded step costs
  a float64 evaluation of the whole image).  Two additions make such a network train well:
  a per-pixel head (``head_channels``: pixel-shuffled features and the pixel's own noisy value
  through 1x1 convolutions at full resolution, with Fourier features of that value as in VDM, a
  two-conv full-resolution path from z (``head_local``) and a FiLM gain from the noise level), and
  eps preconditioning (``input_skip``: the
  network predicts eps - sigma * z, the residual over the optimal linear estimate for unit-variance
  data).  In this project's first training runs a patch-4 network without skip and head learned
  far slower per iteration than a full-resolution one, and without the local path it barely
  denoised the low-noise steps, where noise must be told from texture pixel by pixel.
  Older configs lack these keys and build exactly as before.
* **Growing a trained network** (``mid_blocks``): a ResBlock's last convolution starts at zero, so a
  block added to the coarsest level computes the identity and the grown network the same function as
  the trained one; a fine-tune (``train --init M --mid-blocks N``) then trains the new blocks.  The
  coarsest level is where it is cheap (1/256 of the pixels for a patch-4 stem and three levels) and
  where the high-noise steps, whose estimate is most of the low-rate reconstructions, need capacity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    in_channels: int = 3
    out_channels: int = 6
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    emb_dim: int = 128
    gamma_range: tuple[float, float] = (-14.0, 8.0)  # for normalising the gamma embedding input
    patch: int = 1  # pixel-unshuffle factor of the stem (1 = blocks at full resolution)
    head_channels: int = 0  # with patch > 1: width of the full-resolution per-pixel head (0 = none)
    input_skip: bool = False  # add sigma(gamma) * z to the first in_channels outputs (eps preconditioning)
    fourier_features: tuple[int, ...] = ()  # head inputs sin/cos(2^k pi z) for these k (needs the head)
    head_local: int = 0  # channels of a full-resolution 2-conv (3x3) path from z into the head (0 = none)
    mid_blocks: int = 2  # ResBlocks at the coarsest level (see ``DenoiserUNet``: how a trained network grows)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        d = dict(d)
        for k in ("channel_mult", "gamma_range", "fourier_features"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis at each pixel (image-size independent)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dim=1, keepdim=True)
        var = (x - mu).pow(2).mean(dim=1, keepdim=True)
        x = (x - mu) * torch.rsqrt(var + self.eps)
        return x * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def sinusoidal_embedding(v: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style embedding of a scalar per example in [0, 1] (scaled by 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=v.dtype, device=v.device) / half)
    args = 1000.0 * v[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = ChannelNorm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = ChannelNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class DenoiserUNet(nn.Module):
    """eps-prediction U-Net conditioned on gamma; returns ``out_channels`` maps."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        ch = cfg.base_channels
        self.emb_mlp = nn.Sequential(
            nn.Linear(cfg.emb_dim, cfg.emb_dim * 2), nn.SiLU(), nn.Linear(cfg.emb_dim * 2, cfg.emb_dim)
        )
        p2 = cfg.patch * cfg.patch
        self.conv_in = nn.Conv2d(cfg.in_channels * p2, ch, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, mult in enumerate(cfg.channel_mult):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cur, ch * mult, cfg.emb_dim))
                cur = ch * mult
                skips.append(cur)
            self.down.append(blocks)
            if level < len(cfg.channel_mult) - 1:
                self.downsample.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        if cfg.mid_blocks < 1:
            raise ValueError(f"mid_blocks must be >= 1, got {cfg.mid_blocks}")
        self.mid = nn.ModuleList([ResBlock(cur, cur, cfg.emb_dim) for _ in range(cfg.mid_blocks)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(cur + skips.pop(), ch * mult, cfg.emb_dim))
                cur = ch * mult
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(cur, cur, 3, padding=1))
        self.norm_out = ChannelNorm(cur)
        hc = cfg.head_channels if cfg.patch > 1 else 0
        if hc:
            # per-pixel head: the features of each pixel (1x1 conv, then pixel-shuffled) and the pixel's
            # own input go through a small MLP at full resolution -- cheap (1x1 convs only), and it
            # gives every pixel its own non-linear map of its noisy value
            self.head_in = nn.Conv2d(cur, hc * p2, 1)
            n_in = cfg.in_channels * (1 + 2 * len(cfg.fourier_features))
            if cfg.head_local:
                # the low-noise steps need each pixel's high-pass (noise vs texture) at full resolution
                self.head_local = nn.Sequential(
                    nn.Conv2d(cfg.in_channels, cfg.head_local, 3, padding=1), nn.SiLU(),
                    nn.Conv2d(cfg.head_local, cfg.head_local, 3, padding=1),
                )
            self.head1 = nn.Conv2d(hc + n_in + cfg.head_local, hc, 1)
            self.head_emb = nn.Linear(cfg.emb_dim, 2 * hc)  # FiLM: the noise level sets the head's gain
            self.head2 = nn.Conv2d(hc, hc, 1)
            self.conv_out = nn.Conv2d(hc, cfg.out_channels, 1)
        else:
            if cfg.fourier_features:
                raise ValueError("fourier_features need the per-pixel head (patch > 1, head_channels > 0)")
            self.conv_out = nn.Conv2d(cur, cfg.out_channels * p2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def downscale(self) -> int:
        """Input sizes must be multiples of this (the codecs pad to it)."""
        return self.config.patch * 2 ** (len(self.config.channel_mult) - 1)

    def _pixel_features(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The head's view of each pixel's own value: z, and sin/cos(2^k pi z) (VDM's Fourier
        features: at low noise they expose where z sits between the 256 pixel levels, which a
        small MLP on z alone cannot resolve).  Computed in z's dtype: autocast leaves these element-wise
        ops alone, so training's bf16 autocast does not round z before the sin/cos."""
        feats = [z]
        for k in self.config.fourier_features:
            arg = z * (math.pi * 2.0**k)
            feats += [torch.sin(arg), torch.cos(arg)]
        return feats

    def forward(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        lo, hi = self.config.gamma_range
        g = (gamma.reshape(-1).to(z.dtype) - lo) / (hi - lo)
        if g.numel() == 1 and z.shape[0] > 1:
            g = g.expand(z.shape[0])
        emb = self.emb_mlp(sinusoidal_embedding(g, self.config.emb_dim))
        p = self.config.patch
        h = self.conv_in(F.pixel_unshuffle(z, p) if p > 1 else z)
        hs = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self.upsample[i](h)
        h = F.silu(self.norm_out(h))
        if hasattr(self, "head1"):
            feats = [F.pixel_shuffle(self.head_in(h), p), *self._pixel_features(z)]
            if hasattr(self, "head_local"):
                feats.append(self.head_local(z))
            h = self.head1(torch.cat(feats, dim=1))
            scale, shift = self.head_emb(emb)[:, :, None, None].chunk(2, dim=1)
            h = self.head2(F.silu(h * (1 + scale) + shift))
            out = self.conv_out(F.silu(h))
        else:
            out = self.conv_out(h)
            out = F.pixel_shuffle(out, p) if p > 1 else out
        if self.config.input_skip:
            # E[eps | z] = sigma z for unit-variance data: the network only learns the residual
            # (without it a patch stem must rebuild the identity z -> eps of the noisy steps)
            c = self.config.in_channels
            sigma = torch.sigmoid(gamma.reshape(-1).to(z.dtype)).sqrt()
            if sigma.numel() == 1:
                sigma = sigma.expand(z.shape[0])
            out = torch.cat([out[:, :c] + sigma[:, None, None, None] * z, out[:, c:]], dim=1)
        return out

