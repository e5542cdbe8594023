"""RVGC on Kodak: rate across q, fidelity and realism of the sampler vs the deterministic decoder, speed.

    python benchmarks/rvgc_kodak.py [--kodak ../shared/data/kodak] [--scale 4] [--limit N]
                                    [--model M] [--q 0.5,1,2,4,8,16] [--sampler-steps 1,2,4]
                                    [--eta 1.0] [--heldout TRAIN_DIR] [--json out.json]

For every q: each image is compressed once (whole-file bpp); the *same file* is decoded with
``deterministic=True`` (the plain synthesis g_s(y_hat)) and with the stochastic latent sampler at
each requested step count.  Reported per q and decoder: mean bpp, PSNR (RGB), MS-SSIM, and the
sliced Wasserstein distance (multi-scale Laplacian patches, x1e3, lower = more realistic) between
the original set and the decoded set; the RMS of the finest Laplacian level (``band_rms``, 0-255
units, mean over images; also of the originals, ``band_rms_original``): how much fine detail a decoder
renders; decode seconds per image and per sampler step (the extra time of the sampler divided by its
steps).  The script also checks that the rate is monotone in q for
every image.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import diffcodec
from diffcodec.evaluate import load_heldout_images, load_images
from diffcodec.metrics import _laplacian_pyramid, ms_ssim, psnr, sliced_wasserstein
from diffcodec.models import DEFAULT_MODELS


def band_rms(img: np.ndarray) -> float:
    """RMS of the finest level of the image's Laplacian pyramid (the one SWD's finest level samples)."""
    return float(np.sqrt(np.mean(_laplacian_pyramid(img.transpose(2, 0, 1).astype(np.float32), 2)[0] ** 2)))


def rate_monotone_in_q(qs: list[float], bpp_by_image: dict[str, list[float]]) -> bool:
    """Whether every image's rate falls strictly as q grows, whatever order ``qs`` was measured in
    (``bpp_by_image[name][i]`` is the rate at ``qs[i]``)."""
    order = sorted(range(len(qs)), key=lambda i: qs[i])
    return all(all(v[i] > v[j] for i, j in zip(order, order[1:])) for v in bpp_by_image.values())


def run(model, images: dict[str, np.ndarray], qs: list[float], sampler_steps: list[int], eta: float | None) -> dict:
    decoders = ["deterministic"] + [f"sampler-{n}" for n in sampler_steps]
    rows = []
    bpp_by_image: dict[str, list[float]] = {k: [] for k in images}
    for q in qs:
        recs: dict[str, list[np.ndarray]] = {d: [] for d in decoders}
        per = {d: {"psnr": [], "ms-ssim": [], "band_rms": [], "decode_s": []} for d in decoders}
        bpps, enc_s = [], []
        for name, img in images.items():
            t0 = time.perf_counter()
            res = diffcodec.compress(img, model=model, q=q)
            enc_s.append(time.perf_counter() - t0)
            bpps.append(res.bpp)
            bpp_by_image[name].append(res.bpp)
            for d in decoders:
                kw = {"deterministic": True} if d == "deterministic" else {"sampler_steps": int(d.split("-")[1]),
                                                                            "eta": eta}
                t0 = time.perf_counter()
                out = diffcodec.decompress(res.data, model=model, **kw)
                per[d]["decode_s"].append(time.perf_counter() - t0)
                per[d]["psnr"].append(psnr(img, out))
                per[d]["ms-ssim"].append(ms_ssim(img, out))
                per[d]["band_rms"].append(band_rms(out))
                recs[d].append(out)
        refs = list(images.values())
        row = {"q": q, "bpp": float(np.mean(bpps)), "encode_s": float(np.mean(enc_s)), "decoders": {}}
        t_det = float(np.mean(per["deterministic"]["decode_s"]))
        for d in decoders:
            r = {k: float(np.mean(v)) for k, v in per[d].items()}
            r["swd"] = sliced_wasserstein(refs, recs[d]).mean
            if d != "deterministic":
                n = int(d.split("-")[1])
                r["s_per_sampler_step"] = (r["decode_s"] - t_det) / n
            row["decoders"][d] = r
        rows.append(row)
        print(f"q={q:<7.4g} bpp={row['bpp']:.4f}  " + "  ".join(
            f"{d}: {v['psnr']:.2f} dB / MS-SSIM {v['ms-ssim']:.4f} / SWD {v['swd']:.1f}"
            for d, v in row["decoders"].items()), flush=True)
    return {"rows": rows, "rate_monotone_in_q": rate_monotone_in_q(qs, bpp_by_image), "bpp_by_image": bpp_by_image,
            "band_rms_original": float(np.mean([band_rms(v) for v in images.values()]))}


def to_compressai(model_id: str, out: dict) -> list[dict]:
    """One CompressAI-style result per decoder (bpp, psnr-rgb, ms-ssim-rgb, swd, q)."""
    results = []
    for d in out["rows"][0]["decoders"]:
        results.append({
            "name": f"{model_id} ({d})", "description": f"RVGC {model_id}, {d} decoder, sweep over q",
            "results": {"q": [r["q"] for r in out["rows"]], "bpp": [r["bpp"] for r in out["rows"]],
                        "psnr-rgb": [r["decoders"][d]["psnr"] for r in out["rows"]],
                        "ms-ssim-rgb": [r["decoders"][d]["ms-ssim"] for r in out["rows"]],
                        "swd": [r["decoders"][d]["swd"] for r in out["rows"]],
                        "decoding_time": [r["decoders"][d]["decode_s"] for r in out["rows"]],
                        "encoding_time": [r["encode_s"] for r in out["rows"]]},
        })
    return results


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kodak", default=str(here.parent.parent / "shared" / "data" / "kodak"))
    p.add_argument("--heldout", metavar="TRAIN_DIR", help="instead of Kodak: the photos the trainer holds out of "
                   "TRAIN_DIR (every 20th), for choosing decoder defaults without looking at the test set")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default=DEFAULT_MODELS["rvgc"], help="default: the default rvgc model")
    p.add_argument("--q", help="comma list of q values (default: 6 log-spaced over the model's range)")
    p.add_argument("--sampler-steps", default="1,2,4")
    p.add_argument("--eta", type=float)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = diffcodec.get_model(a.model, "rvgc")
    if a.q:
        qs = [float(v) for v in a.q.split(",")]
    else:
        lo, hi = (math.log(v) for v in model.q_range)
        qs = [round(math.exp(lo + (hi - lo) * i / 5), 6) for i in range(6)]
    if a.heldout:
        images = load_heldout_images(a.heldout, scale=a.scale, limit=a.limit)
    else:
        images = load_images(a.kodak, scale=a.scale, limit=a.limit)
    t0 = time.perf_counter()
    out = run(model, images, qs, [int(v) for v in a.sampler_steps.split(",")], a.eta)
    out.update(model=model.model_id, model_hash=model.model_hash, images=len(images), scale=a.scale,
               image_set="held-out training photos" if a.heldout else "kodak",
               threads=a.threads, wall_s=round(time.perf_counter() - t0, 1))
    out["compressai"] = to_compressai(model.model_id, out)
    print(f"rate monotone in q on every image: {out['rate_monotone_in_q']}; {out['wall_s']} s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
