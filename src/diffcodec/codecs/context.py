"""Checkerboard context for UQDM's step priors: each step coded in two passes over the basis blocks.

Why: a UQDM step codes k = round((mu_Q - mu_P)/D + u) per coordinate under a factorised prior that
the network predicts from z_t alone.  But the shift mu_Q - mu_P = b (x - x_hat) is the network's
error, which is spatially correlated (at the coarse steps a smooth field of missed detail), and a
coordinate's magnitude tells of its neighbours'.  As in learned image codecs' checkerboard context
(He et al., CVPR 2021), the blocks of the coded basis are split into two interleaved halves: the
first half is coded as before; the second half's prior is then moved and rescaled by what the first
half revealed: for a coordinate (c, i, j) of a second-pass block, the decoded values
e = (k - u) D of the four neighbouring (first-pass) blocks give

    m = sum over neighbours n and coefficients (i', j') of W[c, i, j, n, i', j'] e_n[c, i', j']
    log s' = log s + A0[c, i, j] + A1[c, i, j] log(EPS + sum_n |e_n[c, i, j]| / (4 s))

and the coordinate is coded under Logistic(mu_P + m, s') * U(D).  k, z_s and therefore every
reconstruction are unchanged: only the entropy model (the bits) changes.  W and A are per step of
the model's grid (interpolated in gamma between steps, like the scale offsets) and are fitted on
training crops by ``scripts/fit_context.py``.

numpy (coding) computes m as element-wise multiply-adds in a fixed order and rounds the log-scale
change to a grid (``quantize_to_grid``), so encoder and decoder agree bit for bit; torch (training)
computes the same quantities differentiably.
"""

from __future__ import annotations

import numpy as np
import torch

from ..entropy import quantize_to_grid

EPS = 0.05
DIRECTIONS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right (block rows, block columns)
LOG_SCALE_BITS = 16


def to_blocks(v, p: int):
    """(N, C, H, W) -> (N, C, p, p, H/p, W/p): coefficient (i, j) of block (by, bx) at [..., i, j, by, bx]."""
    n, c, h, w = v.shape
    v = v.reshape(n, c, h // p, p, w // p, p)
    return v.permute(0, 1, 3, 5, 2, 4) if isinstance(v, torch.Tensor) else v.transpose(0, 1, 3, 5, 2, 4)


def from_blocks(v):
    """Inverse of :func:`to_blocks`."""
    n, c, p, _, hb, wb = v.shape
    v = v.permute(0, 1, 4, 2, 5, 3) if isinstance(v, torch.Tensor) else v.transpose(0, 1, 4, 2, 5, 3)
    return v.reshape(n, c, hb * p, wb * p)


def second_pass(hb: int, wb: int) -> np.ndarray:
    """(hb, wb) bool: the blocks coded in the second pass ((by + bx) odd)."""
    return (np.add.outer(np.arange(hb), np.arange(wb)) % 2) == 1


def neighbours(e):
    """The four neighbours' values of every block, (4, ...) over e's block layout, zero outside."""
    out = []
    hb, wb = e.shape[-2:]
    for dy, dx in DIRECTIONS:
        n = torch.zeros_like(e) if isinstance(e, torch.Tensor) else np.zeros_like(e)
        ys, yd = slice(max(dy, 0), hb + min(dy, 0)), slice(max(-dy, 0), hb + min(-dy, 0))
        xs, xd = slice(max(dx, 0), wb + min(dx, 0)), slice(max(-dx, 0), wb + min(-dx, 0))
        n[..., yd, xd] = e[..., ys, xs]
        out.append(n)
    return out


def log_magnitude(mag, scale):
    """The scale feature: log(EPS + sum_n |e_n| / (4 s)) for the four neighbours' summed magnitudes
    (numpy or torch; the fit in scripts/fit_context.py uses the same)."""
    return (torch.log if isinstance(mag, torch.Tensor) else np.log)(EPS + mag / (4.0 * scale))


def context_np(e: np.ndarray, scale: np.ndarray, weight: np.ndarray, adapt: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Prior mean shift m and scale s' of every coordinate from the first-pass values.

    e: decoded first-pass values (k - u) D in block layout (N, C, p, p, HB, WB), zero in the
    second-pass blocks; scale: the step's prior scales in the same layout; weight (C, p, p, 4, p, p)
    and adapt (C, p, p, 2) float64.  Only the second-pass blocks' results are meant to be used.
    """
    nbs = neighbours(e)
    p = e.shape[2]
    m = np.zeros_like(e)
    term = np.empty_like(e)
    for n, nb in enumerate(nbs):  # m += W * e_n term by term, in a fixed order, into reused buffers
        for i in range(p):
            for j in range(p):
                np.multiply(weight[None, :, :, :, n, i, j, None, None], nb[:, :, i:i + 1, j:j + 1], out=term)
                m += term
    mag = np.abs(nbs[0]) + np.abs(nbs[1]) + np.abs(nbs[2]) + np.abs(nbs[3])
    g = log_magnitude(mag, scale)
    a0, a1 = adapt[None, ..., 0, None, None], adapt[None, ..., 1, None, None]
    o = quantize_to_grid(a0 + a1 * g, LOG_SCALE_BITS)
    return m, scale * np.exp(o)


def context_t(e: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, adapt: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch version of :func:`context_np` (training; differentiable, unrounded) with per-example
    parameters: weight (B, C, p, p, 4, p, p), adapt (B, C, p, p, 2)."""
    nbs = torch.stack(neighbours(e), 1)  # (B, 4, C, p, p, HB, WB)
    m = torch.einsum("bcijnkl,bncklyx->bcijyx", weight, nbs)
    g = log_magnitude(nbs.abs().sum(1), scale)
    o = adapt[..., 0, None, None] + adapt[..., 1, None, None] * g
    return m, scale * torch.exp(o)
