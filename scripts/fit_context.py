"""Fit a UQDM model's checkerboard context (two-pass step priors, ``codecs/context.py``).

    python scripts/fit_context.py MODEL OUT.safetensors [--data ../shared/data/train]
                                  [--crops 48] [--crop 96] [--threads 2] [--steps 4] [--final-basis B]

``--steps`` fits only those steps (1 = the coarsest) and keeps the model's context for the others
(after a conversion to a final basis, ``--steps 4`` refits the last step's context in its new coordinates).

Why: a step's prior is predicted from z_t alone, but the network's error is spatially correlated,
so once half of the blocks are decoded their values predict the other half's (context.py).  This
script walks the model's own forward chain on crops of the trainer's *training* split (not its
held-out photos, which choose between models, and never Kodak) and fits, per step and coordinate
(channel, frequency) of a block: the mean weights W by least squares of the second-pass shifts on
the four neighbouring blocks' decoded values of the same channel, then the scale adaptation
(A0, A1) by a grid search of the exact expected code length.  The network, and every
reconstruction, are unchanged; the result is a new model (the context is weights: another hash).
"""

from __future__ import annotations

import json

import torch

from diffcodec.calibrate import load_for_fit, mean_bits, parse_args, save_fitted, selected, training_crops
from diffcodec.codecs.context import log_magnitude, neighbours, second_pass, to_blocks
from diffcodec.codecs.uqdm import UQDM

SLOPES = [0.1 * i for i in range(8)]
COARSE = torch.linspace(-2.0, 1.0, 25).tolist()
FINE = torch.linspace(-0.125, 0.125, 11).tolist()


def fit_step(model: UQDM, d: torch.Tensor, scale: torch.Tensor, delta: float):
    """(W (C, p, p, 4, p, p), A (C, p, p, 2), bits per pixel before / after) for one step's shifts d
    and prior scales (coded basis, (B, C, H, W)) on training crops."""
    p, C = model.basis.block, model.channels
    db, sb = to_blocks(d, p), to_blocks(scale, p)
    eb = db + delta * (torch.rand_like(db) - 0.5)  # the decoded values (k - u) D: shift + uniform noise
    sel = torch.as_tensor(second_pass(*db.shape[-2:]))
    hb, wb = db.shape[-2:]
    W = torch.zeros(C, p, p, 4, p, p, dtype=d.dtype)
    A = torch.zeros(C, p, p, 2, dtype=d.dtype)
    # the features of every coordinate: the four neighbours' values of all coefficients of its channel
    nbs = torch.stack(neighbours(eb), 1)  # (B, 4, C, p, p, HB, WB)
    before = after = 0.0
    npix = db.shape[0] * hb * wb * p * p
    for c in range(C):
        feats = nbs[:, :, c][..., sel]  # (B, 4, p, p, n)
        feats = feats.permute(0, 4, 1, 2, 3).reshape(-1, 4 * p * p)
        mag = nbs[:, :, c].abs().sum(1)  # (B, p, p, HB, WB)
        for i in range(p):
            for j in range(p):
                y = db[:, c, i, j][:, sel].reshape(-1)
                s = sb[:, c, i, j][:, sel].reshape(-1)
                w = torch.linalg.lstsq(feats, y[:, None]).solution[:, 0]
                g = log_magnitude(mag[:, i, j][:, sel].reshape(-1), s)
                gm = float(g.mean())
                fits = []
                for wc in (w, torch.zeros_like(w)):  # least squares minimises errors, not bits: keep it if it helps
                    resid = y - feats @ wc

                    def cost(a0: float, a1: float, resid=resid, s=s, g=g) -> float:
                        return mean_bits(resid, s * torch.exp(a0 + a1 * g), delta)

                    grid = [(0.0, 0.0)] + [(-a1 * gm + o, a1) for a1 in SLOPES for o in COARSE]
                    ad = min(grid, key=lambda a: cost(*a))
                    ad = min([ad] + [(ad[0] + f, ad[1]) for f in FINE], key=lambda a: cost(*a))
                    fits.append((cost(*ad), wc, ad))
                cost_ij, wc, ad = min(fits, key=lambda f: f[0])
                W[c, i, j] = wc.reshape(4, p, p)
                A[c, i, j, 0], A[c, i, j, 1] = ad
                n = y.numel()
                before += mean_bits(y, s, delta) * n
                after += cost_ij * n
    anchors = mean_bits(db[..., ~sel], sb[..., ~sel], delta) * db[..., ~sel].numel()
    return W, A, (anchors + before) / npix, (anchors + after) / npix


def fit(model: UQDM, x: torch.Tensor, steps=lambda j: True) -> list[dict]:
    """Fit the context of ``model`` (in place) on crops x, of the steps j that ``steps(j)`` selects; per-step
    bits per pixel before / after."""
    report = []
    with torch.no_grad():
        for j, r_rgb, scale, delta in model.step_residuals(x):  # the model's own chain
            if not steps(j):
                continue
            W, A, before, after = fit_step(model, model.step_basis(j).forward_t(r_rgb), scale, delta)
            model.context_weight[j - 1] = W
            model.context_adapt[j - 1] = A
            report.append({"step": model.num_steps - j + 1, "bits_per_pixel_before": round(before, 4),
                           "bits_per_pixel_after": round(after, 4)})
            print(json.dumps(report[-1]), flush=True)
    return report


def main() -> None:
    a = parse_args(__doc__)
    src, model = load_for_fit(a.model, "the context", {"context": "checkerboard"}, ("context_steps",),
                              ("context_weight", "context_adapt"), a.final_basis)
    report = fit(model, training_crops(a.data, a.crop, a.crops), lambda j: selected(a, model, j))
    save_fitted(src, model, a, "context", report)


if __name__ == "__main__":
    main()
