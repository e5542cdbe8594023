"""Where should denoise start after a UQDM kept step: from the step's draws or from its prior mean?

    python benchmarks/uqdm_kept_view.py [--heldout ../shared/data/train] [--model uqdm-medium12] [--threads 1]
                                        [--json benchmarks/results/uqdm-keep/kept_view.json]

A step that keeps coordinates (README, UQDM kept coordinates) draws the ones it does not code from its prior;
the chain, flow and ancestral go on from those draws.  The denoise reconstruction (the posterior mean) can
start from the draws or from the prior mean of those coordinates.  This measures both for every complete kept
step of the default files (channel-aware, the same files and chain either way) and the rule the decoder
ships (``UQDM.part_view``: the mean after every step but the first), by swapping ``part_view`` for the
variants: the experiment that chose the rule, kept as the command behind its numbers.  ``draws-avg4``
estimates the posterior mean by Monte Carlo instead: denoise (inside the step's box) averaged over the
file's own draws and three more draws of the uncoded coordinates from the step's prior (four network
evaluations per reconstruction).
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
from uqdm_kodak import baseline_curve, summarise  # noqa: E402

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


SHIPPED_RECONSTRUCT = uqdm_mod.UQDM.reconstruct_unit


def averaged(draws: int):
    """(part_view, reconstruct_unit) whose denoise after a complete kept step is the mean of ``draws``
    reconstructions: from the file's draws and from draws of the uncoded coordinates keyed by other seeds."""

    def part_view(self, state, z_t, gam, prev_box=None):
        view = SHIPPED(self, state, z_t, gam, prev_box)
        complete_kept = view.z_s is not None and state.done == state.n_keep < state.k.size
        self._averaged_state = (state, view.z_s) if complete_kept else None
        return PartView(view.z_s, view.z_view, view.box)

    def reconstruct_unit(self, z, gamma_t, method="denoise", nfe=None, rng=None, default_steps=1, box=None):
        held = getattr(self, "_averaged_state", None)
        if held is None or method != "denoise" or box is None:
            return SHIPPED_RECONSTRUCT(self, z, gamma_t, method, nfe, rng, default_steps, box)
        state, z_s = held
        total = SHIPPED_RECONSTRUCT(self, z_s, gamma_t, method, nfe, rng, default_steps, box)
        for r in range(1, draws):  # the coder's own draw of the uncoded coordinates, under other seeds
            z_r = self._kept_z_s(state.st, self.step_basis(state.i), state.k, state.u, state.known, 1000 + r,
                                 state.i, state.shape)
            total = total + SHIPPED_RECONSTRUCT(self, z_r, gamma_t, method, nfe, rng, default_steps, box)
        return total / draws

    return part_view, reconstruct_unit


VARIANTS = {"draws": (variant(False, False), SHIPPED_RECONSTRUCT), "mean": (variant(True, True), SHIPPED_RECONSTRUCT),
            "shipped": (SHIPPED, SHIPPED_RECONSTRUCT), "draws-avg4": averaged(4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kodak", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/kodak"))
    ap.add_argument("--heldout", metavar="TRAIN_DIR", help="the photos the trainer holds out of TRAIN_DIR")
    ap.add_argument("--model", default="uqdm-medium12")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="draws,mean,shipped", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--json")
    a = ap.parse_args()
    names = a.variants.split(",")
    if not set(names) <= set(VARIANTS):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(a.threads)
    model = diffcodec.get_model(a.model)
    images = load_benchmark_images(a.kodak, a.heldout, scale=4)
    jpeg = baseline_curve(images)
    jb, jp = jpeg["results"]["bpp"], jpeg["results"]["psnr-rgb"]
    out = {"model": model.model_id, "images": "held-out training photos" if a.heldout else "kodak",
           "keep": list(model.default_keep()), "variants": {}}
    try:
        for name in names:
            uqdm_mod.UQDM.part_view, uqdm_mod.UQDM.reconstruct_unit = VARIANTS[name]
            summary, _ = summarise(model, images, 4)
            steps = summary["steps"]
            out["variants"][name] = {
                "steps": [{k: s[k] for k in ("step", "bpp", "denoise")} for s in steps],
                "bd_rate_vs_jpeg_denoise": bd_rate(jb, jp, [s["bpp"] for s in steps], [s["denoise"] for s in steps])}
            print(name, " ".join(f"k{s['step']}:{s['bpp']:.3f}bpp/{s['denoise']:.2f}dB" for s in steps),
                  f"BD vs JPEG {out['variants'][name]['bd_rate_vs_jpeg_denoise']:+.1f}%", flush=True)
    finally:
        uqdm_mod.UQDM.part_view, uqdm_mod.UQDM.reconstruct_unit = SHIPPED, SHIPPED_RECONSTRUCT
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
