"""Fit a UQDM model's per-frequency scale offsets (calibration of its learned prior scales).

    python scripts/fit_scale_offsets.py MODEL OUT.safetensors [--data ../shared/data/train]
                                        [--crops 48] [--crop 96] [--threads 2]
                                        [--steps 4] [--final-basis opponent]

``--steps`` fits only those steps (1 = the coarsest) and keeps the model's offsets for the others;
``--final-basis`` first gives the model that per-pixel basis for its last step (README, UQDM final
basis): ``--final-basis opponent --steps 4`` on a 4-step model converts it and refits that step's offsets.

Why: in a DCT noise basis the network must learn one prior scale per frequency of each 4x4 block.
``uqdm-medium3`` as first trained had learned them least for its coarsest step: this script, run on
it, lowered step 1's expected code length on training crops from 0.263 to 0.176 bits per pixel and
the other steps' by <= 1% (what it prints; its model card records the run).  It gives the model
one constant per (step, channel, frequency), ``scale_offset`` (a log-scale per step and coordinate of a block,
interpolated in gamma between the steps; ``codecs/uqdm.py``), fitted by exact 1-D search of the
expected code length on crops of the trainer's *training* split (not its held-out photos, which
choose between models, and never Kodak).  The network is unchanged; the result is a new model (the
offsets are weights: another hash), which a fine-tune can train further (the offsets are parameters).
"""

from __future__ import annotations

import json
import math

import torch

from diffcodec.calibrate import load_for_fit, mean_bits, parse_args, save_fitted, selected, training_crops
from diffcodec.codecs.context import to_blocks
from diffcodec.codecs.uqdm import UQDM

COARSE = torch.linspace(-3.0, 3.0, 25).tolist()  # candidate offsets (natural log), steps of 0.25 ...
FINE = torch.linspace(-0.25, 0.25, 21).tolist()  # ... then steps of 0.025 around the best


def by_coordinate(v: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (C, p, p, N): the values of each coordinate of a p x p block."""
    return to_blocks(v, p).permute(1, 2, 3, 0, 4, 5).reshape(v.shape[1], p, p, -1)


def fit(model: UQDM, x: torch.Tensor, steps=lambda j: True) -> tuple[torch.Tensor, list[dict]]:
    """Offsets (T, C, p, p) of the steps j that ``steps(j)`` selects (the others': the model's own) and
    per-step bits per pixel before / after, on crops x.  The selected steps' offsets in ``model`` are
    zeroed first: they are fitted on top of the network's own scales, not of earlier offsets."""
    T, p = model.num_steps, model.basis.block
    with torch.no_grad():
        for j in range(1, T + 1):
            if steps(j):
                model.scale_offset[j - 1] = 0.0
    offsets = model.scale_offset.detach().clone().double()
    report = []
    for j, r_rgb, scale, delta in model.step_residuals(x):  # the model's own chain
        if not steps(j):
            continue
        r, s = by_coordinate(model.step_basis(j).forward_t(r_rgb), p), by_coordinate(scale, p)
        before = after = 0.0
        for c in range(model.channels):
            for i in range(p):
                for k in range(p):
                    rc, sc = r[c, i, k], s[c, i, k]
                    best = min(COARSE, key=lambda o: mean_bits(rc, sc * math.exp(o), delta))
                    best = min((best + f for f in FINE),
                               key=lambda o: mean_bits(rc, sc * math.exp(o), delta))
                    offsets[j - 1, c, i, k] = best
                    before += mean_bits(rc, sc, delta)
                    after += mean_bits(rc, sc * math.exp(best), delta)
        report.append({"step": T - j + 1, "bits_per_pixel_before": before / (p * p),
                       "bits_per_pixel_after": after / (p * p)})
        print(json.dumps(report[-1]), flush=True)
    return offsets, report


def main() -> None:
    a = parse_args(__doc__)
    src, model = load_for_fit(a.model, "scale offsets", {"scale_offsets": True}, ("scale_offset_steps",),
                              ("scale_offset",), a.final_basis)
    offsets, report = fit(model, training_crops(a.data, a.crop, a.crops), lambda j: selected(a, model, j))
    with torch.no_grad():
        model.scale_offset.copy_(offsets)
    save_fitted(src, model, a, "scale_offsets", report)


if __name__ == "__main__":
    main()
