"""Experiment: UQDM steps that code only their largest-prior-scale coordinates (encoder-side simulation).

    python benchmarks/uqdm_defer.py [--model uqdm-medium12] [--heldout ../shared/data/train | --kodak DIR --scale 4]
                                   [--steps 2] [--keep 0.5] [--threads 1] [--json out.json]

A UQDM step codes every coordinate of z_s by universal quantization.  Written in step parts (README, UQDM
step parts) the second half of a step -- the coordinates with the smallest prior scales -- costs about 0.12
bpp at step 2 for less than 0.01 dB: the prior is confident there, yet each coordinate still costs a
fraction of a bit.  This measures the alternative: code only the fraction ``--keep`` of the coordinates of
the coding steps ``--steps`` (in decreasing order of prior scale, as the parts are) and draw the others from
the model's own prior p(z_s | z_t) (logistic of the step's scale convolved with the uniform of width D, as
the ancestral sampler does), with randomness both sides could share.  Every later step is coded as usual
from that z_s, so the later steps pay for whatever the skipped coordinates would have said.  This is the
measurement that led to the codec feature (``compress(keep=...)``, README, UQDM kept coordinates), kept as the
record of ``benchmarks/results/uqdm-defer/``; the feature itself is measured with real files by
``benchmarks/uqdm_kodak.py --keep``.

How: the encoder is run with the step's symbols computed as usual and ``parts=(keep,)``, so that the kept
and the skipped coordinates land in separate sections; the skipped coordinates' z_s is replaced by the
prior draw before the next step, and their section's bytes are not counted.  The files it writes are not
decodable (the decoder has no such mode): this measures rates (section payloads, i.e. the real entropy coder
output) and the encoder-side reconstructions x_hat(z) after each step (denoise, without the box, for both
variants; the box needs the decoder's view), not a codec.  Box priors are off in both variants (the skipped
coordinates put no box around x).  Reported per variant: cumulative bpp after each complete step and after
the lossless section, and mean PSNR of x_hat after steps 1 to T-1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import diffcodec
from diffcodec import container
from diffcodec.codecs import uqdm as uqdm_mod
from diffcodec.evaluate import load_benchmark_images
from diffcodec.metrics import psnr


def run(model, images, steps: set[int], keep: float, seed: int = 1234) -> dict:
    T = model.num_steps
    defer_i = {T - k + 1 for k in steps}  # coding step k codes t_i -> t_{i-1}, i = T - k + 1
    orig = uqdm_mod.UQDM._encode_symbols
    captured: dict[int, tuple[np.ndarray, float]] = {}
    state = {"defer": False}

    def encode_symbols(self, z, x, i, gam, seed_, prior_box=None):
        st, k, u, z_s, bounds = orig(self, z, x, i, gam, seed_, prior_box)
        if state["defer"] and i in defer_i:
            order = self._part_order(st)
            skip = order[int(round(keep * k.size)):]
            y = (k - u) * st.delta
            rng = np.random.default_rng([seed, i])
            s = st.scale.reshape(-1)
            y[skip] = s[skip] * rng.logistic(size=skip.size) + st.delta * (rng.uniform(size=skip.size) - 0.5)
            z_s = st.mu_p + self.step_basis(i).inverse(y.reshape(z.shape))
        captured[i] = (z_s.copy(), float(gam[i - 1]))
        return st, k, u, z_s, bounds

    out = {"base": [], "defer": []}
    uqdm_mod.UQDM._encode_symbols = encode_symbols
    try:
        for name, img in images:
            npx = img.shape[0] * img.shape[1]
            for variant in ("base", "defer"):
                state["defer"] = variant == "defer"
                captured.clear()
                data = diffcodec.compress(img, model=model, lossless=True, parts=(keep,), box_prior=False).data
                secs = container.unpack(data).sections
                bits, ends = [], []  # steps T..2 come as two sections each (kept, rest), step 1 and final as one
                for n, s in enumerate(secs):
                    skipped = variant == "defer" and n < 2 * (T - 1) and n % 2 == 1 and (T - n // 2) in defer_i
                    bits.append(0 if skipped else 8 * len(s.payload))
                    if n >= 2 * (T - 1) or n % 2 == 1:
                        ends.append(len(bits))
                cum = np.cumsum(bits) / npx
                ps = []
                for i in range(T, 1, -1):
                    z, g = captured[i]
                    xr = model.reconstruct_unit(z, g, "denoise")[0].transpose(1, 2, 0)[: img.shape[0], : img.shape[1]]
                    ps.append(psnr(img, np.clip(np.round((xr + 1.0) * 127.5), 0, 255).astype(np.uint8)))
                out[variant].append({"image": name, "bpp": [float(cum[e - 1]) for e in ends], "psnr": ps})
    finally:
        uqdm_mod.UQDM._encode_symbols = orig
    summary = {}
    for variant, rows in out.items():
        summary[variant] = {"bpp": np.mean([r["bpp"] for r in rows], axis=0).tolist(),
                            "psnr_x_hat": np.mean([r["psnr"] for r in rows], axis=0).tolist()}
    return {"summary": summary, "per_image": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="uqdm-medium12")
    ap.add_argument("--heldout", metavar="TRAIN_DIR", help="the photos the trainer holds out of TRAIN_DIR")
    ap.add_argument("--kodak", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/kodak"))
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--steps", default="2", help="coding steps (1 = the first coded) that keep only --keep")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = diffcodec.get_model(a.model)
    images = load_benchmark_images(a.kodak, a.heldout, scale=a.scale, limit=a.limit)
    steps = {int(v) for v in a.steps.split(",")}
    if not steps <= set(range(1, model.num_steps)) or not 0.0 < a.keep < 1.0:
        raise SystemExit("--steps: coding steps 1..T-1; --keep in (0, 1)")
    res = run(model, images, steps, a.keep)
    res["config"] = {"model": a.model, "images": len(images), "image_set": "held-out" if a.heldout else "kodak",
                     "scale": a.scale, "steps": sorted(steps), "keep": a.keep}
    for variant, s in res["summary"].items():
        print(f"{variant:6s} cumulative bpp after steps 1..T, final: {np.round(s['bpp'], 4).tolist()}  "
              f"PSNR x_hat after steps 1..T-1: {np.round(s['psnr_x_hat'], 3).tolist()}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
