"""Orthonormal bases for UQDM's uniform noise: the coordinates its steps are coded in.

UQDM codes a step by universal quantization of z_s - mu_P per coordinate, under a factorised prior.
The paper takes the coordinates to be the RGB sub-pixels.  But the network's error x - x_hat is far
from independent across them: at the coarse steps it is a smooth, mostly-luminance image (the
detail a blurry x_hat misses), so a factorised prior pays for the same structure in every
sub-pixel.  In the small-shift regime of uniform noise (the coarse steps) a step costs roughly in
proportion to |shift| / D per coordinate, an L1 norm, which an energy-compacting transform lowers:
transform coding's gain.

A basis here is an orthonormal map M of the image: an opponent colour transform (luminance, two
colour differences; the principal axes of those errors) and optionally a p x p 2-D DCT-II of each
channel on the aligned p x p blocks (JPEG's transform).  On ``uqdm-medium2``'s own residuals the
four steps would cost 16.19 bits per pixel per RGB sub-pixel, 14.82 in opponent colours and 13.30
with the 4x4 DCT, against 13.28 in the principal axes of each step's 4x4 blocks
(``benchmarks/uqdm_noise_basis.py``, ``benchmarks/results/uqdm_noise_basis_uqdm-medium2.json``).

Coefficient (c, i, j) of block (by, bx) is stored at position (c, p by + i, p bx + j), so the
network's per-pixel scale output names one coefficient each; with p = 4, the pixel-unshuffle stem
of the ``medium`` network tells the 16 positions of a block apart.  Because M is orthonormal, the
noise M^T D u keeps the Gaussian posterior's mean and covariance (the chain stays exact), and x, z
and x_hat stay in RGB.

numpy transforms (coding) are written as element-wise multiply-adds in a fixed order, never BLAS,
so that encoder and decoder compute the same float64 bits with any thread count.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# name: (integer colour rows, normalised in use; DCT block size, 1 = none)
BASES: dict[str, tuple[tuple[tuple[int, ...], ...], int]] = {
    "rgb": (((1, 0, 0), (0, 1, 0), (0, 0, 1)), 1),
    "opponent": (((1, 1, 1), (1, 0, -1), (1, -2, 1)), 1),
    "opponent-dct4": (((1, 1, 1), (1, 0, -1), (1, -2, 1)), 4),
}


def dct_matrix(p: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (rows = frequencies)."""
    n = np.arange(p, dtype=np.float64)
    m = np.cos(math.pi * (n[None, :] + 0.5) * n[:, None] / p) * math.sqrt(2.0 / p)
    m[0] /= math.sqrt(2.0)
    return m


def _apply_np(m: np.ndarray, v: np.ndarray, axis: int) -> np.ndarray:
    """m applied along ``axis`` of v: out[k] = sum_j m[k, j] v[j], summed in order j = 0, 1, ..."""
    parts = np.moveaxis(v, axis, 0)
    out = np.empty_like(parts)
    for k in range(m.shape[0]):
        acc = m[k, 0] * parts[0]
        for j in range(1, m.shape[1]):
            acc = acc + m[k, j] * parts[j]
        out[k] = acc
    return np.moveaxis(out, 0, axis)


def _apply_t(m: torch.Tensor, v: torch.Tensor, axis: int) -> torch.Tensor:
    """torch version of :func:`_apply_np` (differentiable; its summation order is torch's)."""
    return torch.movedim(torch.tensordot(m, torch.movedim(v, axis, 0), dims=([1], [0])), 0, axis)


class NoiseBasis:
    """The orthonormal map M of a named basis, for numpy (coding) and torch (training)."""

    def __init__(self, name: str):
        if name not in BASES:
            raise ValueError(f"unknown noise basis {name!r} (choose from {', '.join(BASES)})")
        rows, p = BASES[name]
        self.name = name
        self.rows = rows
        self.block = p
        c = np.array(rows, dtype=np.float64)
        self.color = c / np.sqrt((c**2).sum(1, keepdims=True))
        self.dct = dct_matrix(p)
        self.identity = name == "rgb"
        self._torch: dict = {}

    @property
    def code(self) -> list[int]:
        """The basis as integers (colour rows, then the block size): what a model stores of it."""
        return [v for row in self.rows for v in row] + [self.block]

    @property
    def max_row_l1(self) -> float:
        """max_k sum_j |M_kj|: a coordinate of M v is at most this times max |v|."""
        d = float(np.abs(self.dct).sum(1).max())
        return float(np.abs(self.color).sum(1).max()) * d * d

    def check_shape(self, shape) -> None:
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"noise basis {self.name!r} needs (N, 3, H, W) latents, got {tuple(shape)}")
        p = self.block
        if shape[2] % p or shape[3] % p:
            raise ValueError(f"noise basis {self.name!r} needs sizes that are multiples of {p}, got {tuple(shape)}")

    def _blocks(self, v, d, apply):
        """``d`` applied along the rows and the columns of each p x p block of v (N, C, H, W)."""
        p = self.block
        if p == 1:
            return v
        n, c, h, w = v.shape
        b = apply(d, apply(d, v.reshape(n, c, h // p, p, w // p, p), 3), 5)
        return b.reshape(n, c, h, w)

    # ------------------------------------------------------------------ numpy (float64, exact)
    def forward(self, v: np.ndarray) -> np.ndarray:
        """M v for latents v (N, 3, H, W)."""
        if self.identity:
            return v
        self.check_shape(v.shape)
        return np.ascontiguousarray(self._blocks(_apply_np(self.color, v, 1), self.dct, _apply_np))

    def inverse(self, v: np.ndarray) -> np.ndarray:
        """M^T v (M is orthonormal: its inverse)."""
        if self.identity:
            return v
        self.check_shape(v.shape)
        return np.ascontiguousarray(_apply_np(self.color.T, self._blocks(v, self.dct.T, _apply_np), 1))

    # ------------------------------------------------------------------ torch (training)
    def _mats(self, ref: torch.Tensor):
        key = (ref.dtype, ref.device)
        if key not in self._torch:
            self._torch[key] = (torch.as_tensor(self.color, dtype=ref.dtype, device=ref.device),
                                torch.as_tensor(self.dct, dtype=ref.dtype, device=ref.device))
        return self._torch[key]

    def forward_t(self, v: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return v
        self.check_shape(v.shape)
        c, d = self._mats(v)
        return self._blocks(_apply_t(c, v, 1), d, _apply_t)

    def inverse_t(self, v: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return v
        self.check_shape(v.shape)
        c, d = self._mats(v)
        return _apply_t(c.T, self._blocks(v, d.T, _apply_t), 1)


def variance_mix(src: NoiseBasis, dst: NoiseBasis) -> tuple[np.ndarray, np.ndarray]:
    """The squared matrices that take variances of independent coordinates of ``src`` to the variances
    of the coordinates of a per-pixel basis ``dst``: (DCT^T)^2 along each block's rows and columns,
    then (C_dst C_src^T)^2 across the channels.  Element by element in a fixed order (no BLAS), so
    that every process computes the same float64 constants."""
    if dst.block != 1:
        raise ValueError(f"variances can be carried to a per-pixel basis only, not {dst.name!r}")
    mix = np.zeros((3, 3))
    for k in range(3):
        for c in range(3):
            acc = 0.0
            for j in range(3):
                acc = acc + dst.color[k, j] * src.color[c, j]
            mix[k, c] = acc * acc
    return src.dct.T ** 2, mix


def carry_variance(src: NoiseBasis, dst: NoiseBasis, var):
    """Variances of the coordinates of per-pixel basis ``dst`` of a vector whose coordinates in ``src``
    are independent with variances ``var`` (N, 3, H, W): the diagonal of D M_src^T diag(var) M_src D^T.

    Why: a UQDM model whose last step codes in a per-pixel basis (``final_basis``) keeps the prior scales
    its network predicts in its own basis and carries them over; numpy (coding, fixed-order
    multiply-adds) or torch (training)."""
    sq, mix = variance_mix(src, dst)
    if isinstance(var, torch.Tensor):
        sq_t = torch.as_tensor(sq, dtype=var.dtype, device=var.device)
        mix_t = torch.as_tensor(mix, dtype=var.dtype, device=var.device)
        return _apply_t(mix_t, src._blocks(var, sq_t, _apply_t), 1)
    return np.ascontiguousarray(_apply_np(mix, src._blocks(var, sq, _apply_np), 1))
