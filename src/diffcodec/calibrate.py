"""Post-training calibration of a UQDM model's priors: what the fitting scripts share.

``scripts/fit_scale_offsets.py`` and ``scripts/fit_context.py`` each fit a few weights of a trained
model (no training run) on crops of the trainer's *training* split, never its held-out photos (which
choose between models) nor Kodak.  Both load the model into a configuration that has those weights,
fit them, and save a new model whose card records the fit and the held-out validation code length
before and after; this module is that common frame.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .codecs.uqdm import FINAL_BASES, expected_step_bits
from .data import CropSampler, list_images, split_files, validation_batch
from .models import build_model, load_model, read_metadata, save_model
from .train import evaluate_bpd

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "train"
QUAD = 16  # midpoint-rule points per box of the expected code length


def mean_bits(r: torch.Tensor, s: torch.Tensor, delta: float) -> float:
    """Mean expected bits of universally quantized coordinates (shifts r, prior scales s): what the
    fits minimise."""
    return float(expected_step_bits(r, s, delta, quad=QUAD).mean())


def parse_args(doc: str) -> argparse.Namespace:
    """The fitting scripts' command line: MODEL OUT [--data] [--crops] [--crop] [--threads] [--steps]
    [--final-basis]."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--crops", type=int, default=48)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", default=None,
                    help="fit only these steps (comma-separated, 1 = the coarsest); the others keep the model's values")
    ap.add_argument("--final-basis", choices=FINAL_BASES, default=None,
                    help="first give the model this basis for its last step (its network's scales carried over)")
    a = ap.parse_args()
    a.steps = None if a.steps is None else {int(v) for v in a.steps.split(",")}
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    return a


def load_for_fit(path: str, what: str, config: dict, drop_config: tuple[str, ...], weights: tuple[str, ...],
                 final_basis: str | None = None):
    """(source model, float64 model with ``config`` added) for fitting ``weights`` of a uqdm model: the
    source's other weights carried over, and the source's values of ``weights`` where it has them of
    the same shape (a fit of some steps keeps the others); ``drop_config`` keys are left to the fit.
    ``final_basis`` converts the model to that basis for its last step."""
    src = load_model(path)
    if src.codec_id != "uqdm":
        sys.exit(f"{path} is a {src.codec_id} model; {what} is for uqdm")
    cfg = {**src.config_dict(), **config}
    if final_basis:
        cfg["final_basis"] = final_basis
    for key in drop_config:  # fitted on the model's own grid
        cfg.pop(key, None)
    model = build_model(cfg).double().eval()
    own = model.state_dict()
    state = {k: v for k, v in src.state_dict().items() if k not in weights or own[k].shape == v.shape}
    new = {"final_basis_code"} if final_basis and "final_basis_code" not in src.state_dict() else set()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(weights) - new:
        sys.exit(f"unexpected weights: missing {missing}, unexpected {unexpected}")
    return src, model


def selected(a: argparse.Namespace, model, j: int) -> bool:
    """Whether step t_j -> t_{j-1} (card number T - j + 1) is to be fitted (``--steps``)."""
    return a.steps is None or model.num_steps - j + 1 in a.steps


def training_crops(data: str, crop: int, n: int) -> torch.Tensor:
    """``n`` random crops (float64) of the training split, the same for every fit."""
    train_files, _ = split_files(list_images(data))
    return CropSampler(train_files, crop, seed=12345).batch(n).double()


def save_fitted(src, model, a: argparse.Namespace, key: str, report: list[dict]) -> None:
    """Save ``model`` (fp16) to ``a.out`` with the source's card, the fit's ``report`` under ``key``
    and the held-out validation code length before / after (64 crops); print the summary."""
    val = validation_batch(a.data, a.crop, 64)
    card = dict(read_metadata(src.path)["card"])
    card[key] = {"fitted_from": src.model_id, "fitted_from_hash": src.model_hash, "crops": a.crops,
                 "crop": a.crop, "per_step": report,
                 "val_bpd_before": round(evaluate_bpd(src.float(), val.float()), 4)}
    card["val_bpd_fp32"] = card["val_bpd_stored"] = round(evaluate_bpd(model.float(), val.float()), 4)
    h = save_model(model.float(), a.out, card=card, half=True)
    card["val_bpd_stored"] = round(evaluate_bpd(load_model(a.out).float(), val.float()), 4)
    save_model(load_model(a.out).float(), a.out, card=card, half=True)
    print(json.dumps({"out": a.out, "hash": h, "val_bpd_before": card[key]["val_bpd_before"],
                      "val_bpd_fp32": card["val_bpd_fp32"], "val_bpd_stored": card["val_bpd_stored"]}))
