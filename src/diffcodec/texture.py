"""Detail-energy loss: the local strength of an image's finest band-pass detail, matched to the original's.

Why: a decoder trained on MSE alone outputs (roughly) the conditional mean of the image given its
latent, so wherever the latent cannot say *where* the fine texture is (its phase), the fine bands
lose their energy. Measured on `rvgc-small5` at q 4 (0.45 bpp on kodak-small, default decoder): the
finest Laplacian level of its reconstructions has an RMS of 9.6 against the originals' 14.2 (0-255
units; `benchmarks/rvgc_kodak.py`, `benchmarks/results/rvgc-detail-energy/`), and the finest level is
where its SWD trails JPEG's (docs/results/kodak-small/swd_levels.txt).

This loss compares the *local energy* of each band (its mean square over small windows), not the
band's values: it asks the decoder for texture of the right strength in the right places without
asking it to guess the phase, while the MSE beside it keeps the output close to the original. It
is the cheap, local relative of texture (Gram-matrix) losses and needs no pretrained network (none
is installed here: DESIGN section 6).

Bands: difference-of-binomial-blur (x - blur(x)) at full resolution, then again on the blurred image
subsampled by 2, and so on: the levels of a Laplacian pyramid up to the interpolation step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import _BINOMIAL  # the SWD pyramid's filter, so the loss sees the bands the metric samples


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap binomial blur per channel, reflect-padded (x: (B, C, H, W), H, W >= 3)."""
    c = x.shape[1]
    k = torch.as_tensor(_BINOMIAL, dtype=x.dtype, device=x.device)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def detail_bands(x: torch.Tensor, levels: int = 2) -> list[torch.Tensor]:
    """The ``levels`` finest band-pass images of x, finest first (each half the size of the one before)."""
    bands = []
    for i in range(levels):
        low = _blur(x)
        bands.append(x - low)
        if i + 1 < levels:
            x = low[..., ::2, ::2]
    return bands


def detail_energy_loss(x_hat: torch.Tensor, x: torch.Tensor, levels: int = 2, window: int = 8,
                       eps: float = 1e-6) -> torch.Tensor:
    """Per-example loss: the mean squared difference between the local RMS of x_hat's and x's bands.

    Images in the same units as the caller's MSE (the loss is in squared image units, so a weight on
    it is relative to the MSE); the local RMS is over non-overlapping ``window`` x ``window`` cells of
    each band and channel; the sum over ``levels`` bands.  Zero when x_hat == x.
    """
    total = x.new_zeros(x.shape[0])
    for b_hat, b in zip(detail_bands(x_hat, levels), detail_bands(x, levels)):
        w = min(window, b.shape[-2], b.shape[-1])
        e_hat = F.avg_pool2d(b_hat.pow(2), w)
        e = F.avg_pool2d(b.pow(2), w)
        total = total + (torch.sqrt(e_hat + eps) - torch.sqrt(e + eps)).pow(2).flatten(1).mean(1)
    return total
