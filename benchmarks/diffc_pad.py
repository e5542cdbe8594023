"""DiffC end to end against the channel coder's chunk settings (c_max, pad).

    python benchmarks/diffc_pad.py [--model diffc-small2] [--limit 4] [--configs 10:2,10:1,10:0,12:2,12:0]
                                   [--steps 12] [--threads 1] [--json out.json]

``pad`` is the slack between a chunk's KL and log2 of its candidate count N = 2^c_max.  More slack
makes the PFR sample closer to an exact sample of q(z_s | z_t, x) (projection efficiency
eta = E[m.X] / |m|^2 nearer 1) but spreads the step over more chunks, each of which costs index
bits; less slack is cheaper per step but each step carries less information, so later steps cost
more.  Only the end-to-end curve says which wins: for every configuration this encodes each image
with ``--steps`` steps (real files), decodes every prefix with ``denoise`` and reports the mean
bpp / PSNR per step and the BD-rate of each configuration against the first.  Both settings are
encoder choices: files made with any of them decode with the same decoder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import diffcodec
from diffcodec import container
from diffcodec.evaluate import bd_rate, load_images
from diffcodec.metrics import psnr


def curve(model, images, steps: int, c_max: int, pad: float) -> list[dict]:
    """Mean bpp (whole prefix of the file) and denoise PSNR after each step, over the images."""
    rows: list[list[dict]] = [[] for _ in range(steps)]
    for _name, img in images:
        h, w, _ = img.shape
        res = diffcodec.compress(img, model=model, steps=steps, c_max=c_max, pad=pad)
        cont = container.unpack(res.data)
        ends = [o + s for o, s in zip(cont.offsets, cont.sizes)]
        for k, recs in diffcodec.decode_steps(res.data, model=model, methods=("denoise",)):
            rows[k - 1].append({"bpp": 8.0 * ends[k - 1] / (h * w), "psnr": psnr(img, recs["denoise"])})
    return [{"step": k + 1, "bpp": float(np.mean([r["bpp"] for r in rs])),
             "psnr": float(np.mean([r["psnr"] for r in rs]))} for k, rs in enumerate(rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kodak", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/kodak"))
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--model", default="diffc-small2")
    ap.add_argument("--configs", default="10:2,10:1,10:0,12:2,12:0", help="c_max:pad pairs; the first is the anchor")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = diffcodec.get_model(a.model)
    configs = [(int(c), float(p)) for c, p in (s.split(":") for s in a.configs.split(","))]
    images = list(load_images(a.kodak, scale=a.scale, limit=a.limit, pattern="kodim*.png").items())
    result = {"model": model.model_id, "model_hash": model.model_hash, "images": len(images),
              "size": f"{images[0][1].shape[1]}x{images[0][1].shape[0]}", "steps": a.steps, "curves": {}}
    for c_max, pad in configs:
        pts = curve(model, images, a.steps, c_max, pad)
        result["curves"][f"{c_max}:{pad:g}"] = pts
        print(f"c_max {c_max} pad {pad:g}: " + " ".join(f"{p['bpp']:.3f}/{p['psnr']:.2f}" for p in pts), flush=True)
    anchor = result["curves"][f"{configs[0][0]}:{configs[0][1]:g}"]
    result["bd_rate_vs_first"] = {}
    for key, pts in result["curves"].items():
        result["bd_rate_vs_first"][key] = bd_rate([p["bpp"] for p in anchor], [p["psnr"] for p in anchor],
                                                  [p["bpp"] for p in pts], [p["psnr"] for p in pts])
        print(f"BD-rate {key} against {configs[0][0]}:{configs[0][1]:g}: {result['bd_rate_vs_first'][key]:+.1f}%")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
