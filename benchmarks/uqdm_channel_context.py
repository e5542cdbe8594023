"""How much would a luma-conditioned chroma context save a UQDM model?  (An estimate, not a codec.)

    python benchmarks/uqdm_channel_context.py [--model M] [--crops 16] [--json FILE]

Learned codecs condition chroma on luma (channel-conditional entropy models).  A UQDM step's coded
coordinates are in an opponent-colour DCT basis, luminance first; this script asks whether the two
colour-difference channels' symbols would cost fewer bits if their prior also saw the co-located
luminance block.  It walks the model's own chain on 96x96 crops of the trainer's *training* split
(``UQDM.step_residuals``) and, per step, compares the expected code length of

* the model's coding order: every channel's first-pass (checkerboard) blocks under the network's prior,
  the second-pass blocks under the model's fitted context (``codecs/context.py``);
* the same with the colour channels coded after luminance: their first-pass blocks get a mean from the
  co-located luminance block's 16 decoded values (least squares) and a scale moved by that block's
  magnitude, their second-pass blocks the same on top of their four neighbours' (their own fit, not the
  model's), each fitted per coefficient on these very crops (an optimistic, in-sample estimate).

Luminance is coded as before in both.  Expected bits per pixel use the codec's own formula
(``expected_step_bits``: logistic * uniform over the dithered box).
"""

from __future__ import annotations

import argparse
import json

import torch

from diffcodec.calibrate import DEFAULT_DATA, mean_bits, training_crops
from diffcodec.codecs.context import EPS, context_t, log_magnitude, neighbours, second_pass, to_blocks
from diffcodec.models import DEFAULT_MODELS, load_model

SLOPES = [0.1 * i for i in range(8)]
OFFSETS = torch.linspace(-2.0, 1.0, 25).tolist()


def fitted_bits(y: torch.Tensor, s: torch.Tensor, feats: torch.Tensor, gs: list[torch.Tensor], delta: float) -> float:
    """Least expected bits of shifts y under scales s with a mean from ``feats`` (least squares, kept only
    if it helps) and the log-scale moved by a0 + sum a_k (g_k - mean g_k) (coordinate search on a grid)."""
    best = float("inf")
    for w in (torch.linalg.lstsq(feats, y[:, None]).solution[:, 0], None):
        r = y if w is None else y - feats @ w

        def cost(a, r=r) -> float:
            o = a[0] + sum(ak * (g - g.mean()) for ak, g in zip(a[1:], gs))
            return mean_bits(r, s * torch.exp(o), delta)

        a = [0.0] * (1 + len(gs))
        c = cost(a)
        for _ in range(2):
            for k in range(len(a)):
                for v in OFFSETS if k == 0 else SLOPES:
                    b = list(a)
                    b[k] = v
                    cb = cost(b)
                    if cb < c:
                        c, a = cb, b
        best = min(best, c)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODELS["uqdm"], help="default: the default uqdm model")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--crops", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = load_model(a.model).double().eval()
    if not getattr(model, "context", None):
        raise SystemExit(f"{a.model} has no checkerboard context")
    x = training_crops(a.data, 96, a.crops)
    out = []
    with torch.no_grad():
        for j, r_rgb, scale, delta in model.step_residuals(x):
            p = model.basis.block
            db, sb = to_blocks(model.step_basis(j).forward_t(r_rgb), p), to_blocks(scale, p)
            eb = db + delta * (torch.rand_like(db) - 0.5)  # decoded values (k - u) D
            n, C, _, _, hb, wb = db.shape
            sel = torch.as_tensor(second_pass(hb, wb))
            W, A = model.context_weight[j - 1].double(), model.context_adapt[j - 1].double()
            e1 = torch.where(sel, torch.zeros_like(eb), eb)
            m, s2 = context_t(e1, sb, W.expand(n, *W.shape), A.expand(n, *A.shape))
            luma = eb[:, 0]
            g_luma = torch.log(EPS + (luma.abs() / sb[:, 0]).mean((1, 2)))  # the luma block's scaled magnitude
            f_first = luma[..., ~sel].permute(0, 3, 1, 2).reshape(-1, p * p)
            f_luma2 = luma[..., sel].permute(0, 3, 1, 2).reshape(-1, p * p)
            cur, new = [0.0] * C, [0.0] * C
            for c in range(C):
                nbs = torch.stack(neighbours(e1[:, c]), 1)
                f_second = torch.cat([nbs[..., sel].permute(0, 4, 1, 2, 3).reshape(-1, 4 * p * p), f_luma2], 1)
                for i in range(p):
                    for k in range(p):
                        y1, s1 = db[:, c, i, k][:, ~sel].reshape(-1), sb[:, c, i, k][:, ~sel].reshape(-1)
                        y2, sc2 = db[:, c, i, k][:, sel].reshape(-1), sb[:, c, i, k][:, sel].reshape(-1)
                        m2, s22 = m[:, c, i, k][:, sel].reshape(-1), s2[:, c, i, k][:, sel].reshape(-1)
                        bits = mean_bits(y1, s1, delta) * y1.numel() + mean_bits(y2 - m2, s22, delta) * y2.numel()
                        cur[c] += bits
                        if c == 0:
                            new[c] += bits
                            continue
                        g_nb = log_magnitude(nbs[:, :, i, k].abs().sum(1)[:, sel].reshape(-1), sc2)
                        new[c] += fitted_bits(y1, s1, f_first, [g_luma[:, ~sel].reshape(-1)], delta) * y1.numel()
                        new[c] += fitted_bits(y2, sc2, f_second, [g_nb, g_luma[:, sel].reshape(-1)], delta) * y2.numel()
            npix = n * hb * wb * p * p
            row = {"step": model.num_steps - j + 1, "bpp_now": round(sum(cur) / npix, 4),
                   "bpp_luma_conditioned": round(sum(new) / npix, 4),
                   "bpp_now_by_channel": [round(v / npix, 4) for v in cur],
                   "bpp_luma_conditioned_by_channel": [round(v / npix, 4) for v in new]}
            print(json.dumps(row), flush=True)
            out.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "crops": a.crops, "crop": 96, "steps": out}, f, indent=1)


if __name__ == "__main__":
    main()
