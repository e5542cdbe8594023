"""RVGC's autoencoder ceiling: how close g_s(g_a(x)) gets with the exact, unquantised latent.

    python benchmarks/rvgc_ceiling.py [--kodak ../shared/data/kodak] [--scale 4] [--limit N]
                                      [--model rvgc-small5[,rvgc-small6,...]] [--json out.json]

No rate is spent here: the latent y = g_a(x) goes straight to the synthesis at the clean noise level
(what the sampler's output is decoded with).  Whatever fidelity or realism is missing at this point no
choice of q, sampler or entropy model can bring back, so it separates "the codec spends its bits badly"
from "the transforms cannot render this".  Reported per model: PSNR, MS-SSIM and the sliced
Wasserstein distance per Laplacian level (finest first, x1e3) of the set, as in ``diffcodec eval``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import diffcodec
from diffcodec.api import _prepare
from diffcodec.evaluate import load_images
from diffcodec.metrics import ms_ssim, psnr, sliced_wasserstein


def ceiling(model, images: dict[str, np.ndarray]) -> dict:
    """PSNR, MS-SSIM and SWD (mean and per level) of g_s(g_a(x), clean level) over ``images``."""
    refs, recs = list(images.values()), []
    for im in refs:
        pixels, h, w, _ = _prepare(im, "error", model)  # padded as compress() pads it
        y = model.analyse(pixels)
        recs.append(model.synthesize(y, model.clean_level)[0].transpose(1, 2, 0)[:h, :w])
    swd = sliced_wasserstein(refs, recs)
    return {"psnr": float(np.mean([psnr(a, b) for a, b in zip(refs, recs)])),
            "ms-ssim": float(np.mean([ms_ssim(a, b) for a, b in zip(refs, recs)])),
            "swd": swd.mean, "swd_per_level": list(swd.per_level), "swd_resolutions": list(swd.resolutions)}


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kodak", default=str(here.parent.parent / "shared" / "data" / "kodak"))
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default="rvgc-small5", help="comma list of rvgc models")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    images = load_images(a.kodak, scale=a.scale, limit=a.limit)
    out = {"images": len(images), "scale": a.scale, "models": {}}
    for name in a.model.split(","):
        model = diffcodec.get_model(name, "rvgc")
        t0 = time.perf_counter()
        row = ceiling(model, images)
        row.update(model_hash=model.model_hash, wall_s=round(time.perf_counter() - t0, 1))
        out["models"][model.model_id] = row
        print(f"{model.model_id}: PSNR {row['psnr']:.2f} dB, MS-SSIM {row['ms-ssim']:.4f}, SWD {row['swd']:.1f} "
              f"(per level {' / '.join(f'{v:.1f}' for v in row['swd_per_level'])})")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
