"""How much a UQDM step costs in each noise basis, for one model's own step residuals.

    python benchmarks/uqdm_noise_basis.py [--model uqdm-medium2] [--data ../shared/data/train]
                                          [--crops 24] [--crop 96] [--json out.json]

Why: the network's error r = mu_Q - mu_P = b (x - x_hat) is what a UQDM step codes, one coordinate
at a time under a factorised prior, so its cost depends on the basis the coordinates are taken in
(codecs/noise_basis.py).  This simulates the model's forward chain on held-out training crops (never
Kodak) and, at every step, computes the exact expected code length (bits per pixel, all channels)
of the step's universal quantization, E_{z in box}[-log2 P(bin)], for the residuals expressed in

* ``rgb``, ``opponent``, ``opponent-dct2/4/8`` (opponent colours and a p x p DCT of each), and
* ``pca1``, ``pca2``, ``pca4``, ``pca8``: the principal axes of the residuals of that very step over
  p x p blocks of all three channels (a per-step basis fitted to the data it is scored on),

each under a logistic * uniform prior whose scale is the model's own per-pixel scale (geometric mean
over the block and channels) times one constant per coordinate, fitted per step (so no basis is
favoured by a network trained for another).  ``own`` is the cost in the model's own basis with its
own per-coordinate scales (and scale offsets, if it has them): its real code length.  What a network
trained in a basis reaches is measured by training one (README, the model card of ``uqdm-medium3``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffcodec.codecs.noise_basis import BASES, NoiseBasis, dct_matrix
from diffcodec.codecs.uqdm import expected_step_bits
from diffcodec.data import validation_batch
from diffcodec.models import load_model

QUAD = 24  # midpoint rule over the posterior box
MULTS = torch.exp(torch.linspace(-3, 3, 25)).tolist()


def step_cost(r: torch.Tensor, s: torch.Tensor, delta: float) -> torch.Tensor:
    """Expected bits of each universally quantized coordinate with shift r and prior scale s."""
    return expected_step_bits(r, s, delta, quad=QUAD)


def fitted_cost(coef: torch.Tensor, s: torch.Tensor, delta: float) -> float:
    """Bits per block of (K, N) coefficients, each coordinate's scale s times its best constant."""
    return sum(min(float(step_cost(coef[k], s * m, delta).mean()) for m in MULTS) for k in range(coef.shape[0]))


def blocks(v: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (3 p p, N): each column one p x p block of all channels."""
    b, c, h, w = v.shape
    return v.reshape(b, c, h // p, p, w // p, p).permute(1, 3, 5, 0, 2, 4).reshape(c * p * p, -1)


def fixed_matrix(name: str, p: int) -> torch.Tensor:
    color = torch.from_numpy(NoiseBasis(name.split("-")[0]).color)
    return torch.kron(color, torch.kron(torch.from_numpy(dct_matrix(p)), torch.from_numpy(dct_matrix(p))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="uqdm-medium2")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "train"))
    ap.add_argument("--crops", type=int, default=24)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = load_model(a.model).eval()
    x = validation_batch(a.data, a.crop, a.crops).double()  # the trainer's held-out photos
    T = model.num_steps
    rows = []
    for j, r, scale, delta in model.step_residuals(x):  # the model's own chain, in its own basis
        npix = r.shape[0] * r.shape[2] * r.shape[3]
        row = {"step": T - j + 1, "own": float(step_cost(model.step_basis(j).forward_t(r), scale, delta).sum()) / npix}
        for p in (1, 2, 4, 8):
            rb = blocks(r, p)
            sb = blocks(scale, p).log().mean(0).exp()
            for name in ("rgb", "opponent") if p == 1 else ("opponent",):
                key = name if p == 1 else f"{name}-dct{p}"
                row[key] = fitted_cost(fixed_matrix(name, p) @ rb, sb, delta) / (p * p)
            _, vecs = torch.linalg.eigh(torch.cov(rb))
            row[f"pca{p}"] = fitted_cost(vecs.T.flip(0) @ rb, sb, delta) / (p * p)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    keys = [k for k in rows[0] if k != "step"]
    total = {k: sum(r[k] for r in rows) for k in keys}
    print("total bits/pixel over all steps: " + ", ".join(f"{k} {v:.3f}" for k, v in total.items()))
    if a.json:
        out = {"model": a.model, "model_hash": model.model_hash, "noise_basis": model.noise_basis,
               "crops": a.crops, "crop": a.crop, "unit": "bits per pixel (3 channels) per step",
               "bases_in_library": sorted(BASES), "steps": rows, "total": total}
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
