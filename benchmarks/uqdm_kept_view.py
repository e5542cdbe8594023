"""Where should denoise start after a UQDM kept step: from the step's draws or from its prior mean?

    python benchmarks/uqdm_kept_view.py [--heldout ../shared/data/train] [--model uqdm-medium12] [--threads 1]
                                        [--json benchmarks/results/uqdm-keep/kept_view.json]

A step that keeps coordinates (README, UQDM kept coordinates) draws the ones it does not code from its prior;
the chain, flow and ancestral go on from those draws.  The denoise reconstruction (the posterior mean) can
start from the draws or from the prior mean of those coordinates.  This measures both for every complete kept
step of the default files (channel-aware, the same files and chain either way) and the rule the decoder
ships (``UQDM.part_view``: the mean after every step but the first), by swapping ``part_view`` for the
variants: the experiment that chose the rule, kept as the command behind its numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import diffcodec
from diffcodec.codecs import uqdm as uqdm_mod
from diffcodec.diffusion import PartView
from diffcodec.evaluate import bd_rate, load_benchmark_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uqdm_kodak import jpeg_curve, summarise  # noqa: E402

SHIPPED = uqdm_mod.UQDM.part_view


def variant(mean_after_first: bool, mean_first: bool):
    """part_view whose complete kept steps start denoise from the prior mean after the first step and/or
    after the first step itself (else from the draws)."""

    def part_view(self, state, z_t, gam, prev_box=None):
        view = SHIPPED(self, state, z_t, gam, prev_box)
        if view.z_s is None or state.done == state.k.size:  # a cut, or a step coding every coordinate
            return view
        first = state.i == self.num_steps
        if not (mean_first if first else mean_after_first):
            return PartView(view.z_s, view.z_view, view.box)
        return PartView(view.z_s, view.z_view, view.box, self.known_view(state))

    return part_view


VARIANTS = {"draws": variant(False, False), "mean": variant(True, True), "shipped": SHIPPED}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kodak", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/kodak"))
    ap.add_argument("--heldout", metavar="TRAIN_DIR", help="the photos the trainer holds out of TRAIN_DIR")
    ap.add_argument("--model", default="uqdm-medium12")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = diffcodec.get_model(a.model)
    images = load_benchmark_images(a.kodak, a.heldout, scale=4)
    jpeg = jpeg_curve(images)
    jb, jp = jpeg["results"]["bpp"], jpeg["results"]["psnr-rgb"]
    out = {"model": model.model_id, "images": "held-out training photos" if a.heldout else "kodak",
           "keep": list(model.default_keep()), "variants": {}}
    try:
        for name, fn in VARIANTS.items():
            uqdm_mod.UQDM.part_view = fn
            summary, _ = summarise(model, images, 4)
            steps = summary["steps"]
            out["variants"][name] = {
                "steps": [{k: s[k] for k in ("step", "bpp", "denoise")} for s in steps],
                "bd_rate_vs_jpeg_denoise": bd_rate(jb, jp, [s["bpp"] for s in steps], [s["denoise"] for s in steps])}
            print(name, " ".join(f"k{s['step']}:{s['bpp']:.3f}bpp/{s['denoise']:.2f}dB" for s in steps),
                  f"BD vs JPEG {out['variants'][name]['bd_rate_vs_jpeg_denoise']:+.1f}%", flush=True)
    finally:
        uqdm_mod.UQDM.part_view = SHIPPED
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
