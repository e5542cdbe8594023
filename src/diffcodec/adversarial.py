"""Adversarial fine-tuning of a learned decoder (HiFiC-style), aimed at realism at low rates.

Why: a synthesis transform trained on MSE alone outputs (roughly) the conditional mean of the image
given its latent, which is smooth wherever the latent cannot say what the fine texture is.
Mentzer et al. ("High-Fidelity Generative Image Compression", 2020) add a conditional GAN loss to
the decoder's distortion loss for that; the discriminator sees the image together
with the (upsampled) latent the decoder was given, so it judges "is this a plausible image *for
this latent*" rather than only "is this a plausible image".

What is fine-tuned: only the decoder's own weights (``decoder_parameters()`` of a model, for rvgc
its g_s).  The encoder, entropy model and latent denoiser stay frozen, so the fine-tuned model
codes images into the same sections as the model it started from; only reconstructions change.

Losses (per example): discriminator hinge loss ``relu(1 - D(x)) + relu(1 + D(x_hat))``; the
decoder adds ``gan_weight * softplus(-D(x_hat))`` (non-saturating) to its distortion loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class PatchDiscriminator(nn.Module):
    """A latent-conditioned patch discriminator: image (C, H, W) and latent (M, H/16, W/16) -> logits
    (1, H/8, W/8), one per ~54-pixel receptive field.

    Spectral normalisation on every layer keeps the discriminator Lipschitz, the usual cure for the
    unstable early phase of GAN training; it is small (channels ``width * (1, 2, 4, 4)``) because it
    runs twice per step on the CPU.
    """

    def __init__(self, in_channels: int = 3, latent_channels: int = 64, width: int = 32):
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width
        self.convs = nn.ModuleList([
            spectral_norm(nn.Conv2d(in_channels, c1, 4, stride=2, padding=1)),
            spectral_norm(nn.Conv2d(c1, c2, 4, stride=2, padding=1)),
            spectral_norm(nn.Conv2d(c2, c3, 4, stride=2, padding=1)),
        ])
        self.cond = spectral_norm(nn.Conv2d(latent_channels, c3, 1))
        self.mid = spectral_norm(nn.Conv2d(c3, c3, 3, padding=1))
        self.out = spectral_norm(nn.Conv2d(c3, 1, 3, padding=1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
        c = F.interpolate(self.cond(y), size=h.shape[-2:], mode="nearest")
        h = F.leaky_relu(self.mid(h + c), 0.2)
        return self.out(h)


def disc_loss(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor,
              cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example hinge loss of the discriminator, and its mean logits on real and fake images (for
    the log).  Real and fake share one forward pass (one DistributedDataParallel forward per backward)."""
    B = real.shape[0]
    logits = disc(torch.cat([real, fake.detach()]), torch.cat([cond, cond]))
    loss = F.relu(1.0 - logits[:B]).flatten(1).mean(1) + F.relu(1.0 + logits[B:]).flatten(1).mean(1)
    return loss, logits[:B].detach().mean(), logits[B:].detach().mean()


def gen_loss(disc: nn.Module, fake: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Per-example non-saturating generator loss softplus(-D(x_hat))."""
    return F.softplus(-disc(fake, cond)).flatten(1).mean(1)
