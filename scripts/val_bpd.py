"""Held-out validation code length of uqdm / diffc models on one fixed set of crops.

    python scripts/val_bpd.py uqdm-medium11 /path/to/run/model.safetensors --crop 128 --n 32

The trainer validates on ``--val-batch`` held-out crops of its own ``--crop`` size, so runs with
different crop sizes log numbers that cannot be compared.  This evaluates any models (bundled names,
names on ``DIFFCODEC_MODEL_PATH`` or .safetensors paths, e.g. a run's EMA weights) on the crops that
a run of the given crop size and validation batch validates on, in float32; a CPU run validates with its
network under bf16 autocast (unless ``train --no-bf16``), which ``--bf16`` repeats to give the numbers
the run logs (with ``--keep``, the kept steps' coordinate choice follows the network's rounding too).
"""

from __future__ import annotations

import argparse
import json

import torch

from diffcodec.api import _keep_shares, parse_keep
from diffcodec.data import validation_batch
from diffcodec.models import load_model
from diffcodec.train import evaluate_bpd


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default="../shared/data/train", help="training photos (held out: every 20th)")
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--n", type=int, default=32, help="crops (the trainer's --val-batch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="the network under bf16 autocast, as a CPU run validates")
    ap.add_argument("--keep", help="uqdm: the code length of kept-share files ('default' or fractions like "
                    "0.1,0.3,0.8; a run trained with --keep-chain validates so)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    batch = validation_batch(a.data, a.crop, a.n)
    out = {}
    for name in a.models:
        model = load_model(name).float()
        model.autocast_bf16 = a.bf16
        keep = _keep_shares(model, parse_keep(a.keep)) if a.keep else None
        out[name] = evaluate_bpd(model, batch, keep=keep)
        print(f"{name}: {out[name]:.4f} bits/dim on {a.n} held-out {a.crop}x{a.crop} crops", flush=True)
    print(json.dumps({"crop": a.crop, "n": a.n, "keep": a.keep, "val_bpd": out}))


if __name__ == "__main__":
    main()
