"""UQDM on Kodak: rate vs ideal code length, lossless bits/dim, progressive RD points, speed.

    python benchmarks/uqdm_kodak.py [--kodak ../shared/data/kodak] [--scale 4] [--limit N]
                                    [--model uqdm-small] [--num-steps 4,8] [--heldout TRAIN_DIR]
                                    [--no-channel-aware] [--parts 0.05,0.2,0.35] [--keep 0.5|0.2,0.3,1]
                                    [--methods denoise,flow,ancestral] [--lossless-only] [--json out.json]

Per image: compress losslessly (all T steps + the exact final section), decode the whole file
(timed, checked bit-exact), then reconstruct every prefix with each method (denoise / flow /
ancestral) via ``diffcodec.decode_steps`` (equal to decoding the cut file; covered by the tests), by
default channel-aware (inside the box the last step puts x in, ``codecs/box.py``); ``--no-channel-aware``
reconstructs from the received latent as it is (x_hat for denoise), as this benchmark did before.
Reported:
  * rate: payload bits / ideal bits (the model's code length for the coded symbols) and the
    container overhead in bytes (header + section headers);
  * lossless bits/dim (whole file);
  * per step k: cumulative bpp of the file prefix (whole prefix, headers included) and PSNR;
  * encode and decode seconds per image (decode = the complete lossless file).
Results are printed and written as JSON (CompressAI-like: per method, bpp and psnr-rgb lists), with
each method's BD-rate against JPEG and against WebP (their default quality grids, on the same images).
``--lossless-only`` measures the lossless files alone (encode, decode, bit-exact check): no prefixes.

``--num-steps 4,8,12`` also runs the model on other step counts' grids (real files: the header says
the step count, and only a model run the same way decodes them) -- for networks trained on several
grids (``train --train-steps``), to choose the step count a model ships with.  ``--heldout TRAIN_DIR``
measures on the photos the trainer holds out of TRAIN_DIR instead of Kodak, so that choice never
looks at the test set.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

import diffcodec
from diffcodec import container
from diffcodec.cli import _keep_arg
from diffcodec.evaluate import bd_rate, evaluate_baselines, load_benchmark_images
from diffcodec.metrics import psnr

METHODS = ("denoise", "flow", "ancestral")


def bench_image(model, img: np.ndarray, channel_aware: bool = True, parts: tuple[float, ...] | None = None,
                keep: float | list[float] | None = None, methods: tuple[str, ...] = METHODS) -> dict:
    h, w, _ = img.shape
    t0 = time.perf_counter()
    res = diffcodec.compress(img, model=model, lossless=True, parts=parts, keep=keep)
    t_enc = time.perf_counter() - t0
    cont = container.unpack(res.data)
    payload_bits = 8 * sum(len(s.payload) for s in cont.sections)
    overhead = len(res.data) - sum(len(s.payload) for s in cont.sections)
    ends = [o + s for o, s in zip(cont.offsets, cont.sizes)]

    t0 = time.perf_counter()
    lossless_ok = bool(np.array_equal(diffcodec.decompress(res.data, model=model), img))
    t_dec = time.perf_counter() - t0

    points = []  # after every step or step part: what the file cut there decodes to
    for n, images in [] if not methods else diffcodec.decode_steps(res.data, model=model, methods=methods,
                                                                   channel_aware=channel_aware, parts=True):
        sec = res.sections[n - 1]
        points.append({"section": n, "step": sec["step"], "kind": sec["kind"], "bpp": 8.0 * ends[n - 1] / (h * w),
                       **{method: psnr(img, y) for method, y in images.items()}})
    steps = [{k: v for k, v in p.items() if k not in ("section", "kind")} for p in points if p["kind"] == "step"]
    return {
        "file_bytes": len(res.data), "ideal_bits": res.ideal_bits_total, "payload_bits": payload_bits,
        "rate_ratio": payload_bits / res.ideal_bits_total, "overhead_bytes": overhead,
        "lossless_bpd": 8.0 * len(res.data) / img.size, "lossless_ok": lossless_ok,
        "encode_s": t_enc, "decode_s": t_dec, "steps": steps, **({"points": points} if parts else {}),
    }


def with_num_steps(model, num_steps: int):
    """The model run on the linear grid of ``num_steps`` steps (a copy; the original is untouched)."""
    if num_steps == model.num_steps:
        return model
    m = copy.deepcopy(model)
    m.num_steps = num_steps
    return m


def baseline_curve(images: list[tuple[str, np.ndarray]], codec: str = "jpeg") -> dict:
    """JPEG (or another baseline) on the same images over its default quality grid (the eval harness's
    anchors), CompressAI-style."""
    return evaluate_baselines(dict(images), [codec], swd=False)[codec]


def summarise(model, images: list[tuple[str, np.ndarray]], scale: int, channel_aware: bool = True,
              parts: tuple[float, ...] | None = None, keep: float | list[float] | None = None,
              methods: tuple[str, ...] = METHODS) -> tuple[dict, dict]:
    per = {}
    for name, img in images:
        per[name] = r = bench_image(model, img, channel_aware, parts, keep, methods)
        print(f"{name}: {r['file_bytes']} B, rate/ideal {r['rate_ratio']:.4f}, overhead {r['overhead_bytes']} B, "
              f"lossless {r['lossless_bpd']:.3f} bpd ok={r['lossless_ok']}, enc {r['encode_s']:.1f}s "
              f"dec {r['decode_s']:.1f}s | " + " ".join(f"k{s['step']}:{s['bpp']:.2f}bpp/{s['denoise']:.1f}dB"
                                                          for s in r["steps"]), flush=True)
    rs = list(per.values())
    T = model.num_steps
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    summary = {
        "model": model.model_id, "model_hash": model.model_hash, "num_steps": T, "images": len(rs),
        "channel_aware": channel_aware,
        "size": f"{images[0][1].shape[1]}x{images[0][1].shape[0]}" if scale > 1 else "full",
        "rate_ratio_mean": mean([r["rate_ratio"] for r in rs]),
        "rate_ratio_max": float(np.max([r["rate_ratio"] for r in rs])),
        "overhead_bytes_max": int(np.max([r["overhead_bytes"] for r in rs])),
        "lossless_bpd": mean([r["lossless_bpd"] for r in rs]),
        "lossless_all_exact": all(r["lossless_ok"] for r in rs),
        "encode_s": mean([r["encode_s"] for r in rs]), "decode_s": mean([r["decode_s"] for r in rs]),
        "steps": [{"step": k, "bpp": mean([r["steps"][k - 1]["bpp"] for r in rs]),
                   **{m: mean([r["steps"][k - 1][m] for r in rs]) for m in methods}}
                  for k in range(1, T + 1)] if methods else [],
    }
    # the kept shares of steps 1..T-1 (fractions; 1 = every coordinate): as given, or the model's default
    summary["keep"] = keep if keep is not None else list(model.default_keep())
    summary["keep_default"] = keep is None
    if parts:  # every image has the same sections: the mean point of each
        summary["parts"] = list(parts)
        summary["points"] = [{**{k: rs[0]["points"][j][k] for k in ("section", "step", "kind")},
                              "bpp": mean([r["points"][j]["bpp"] for r in rs]),
                              **{m: mean([r["points"][j][m] for r in rs]) for m in methods}}
                             for j in range(len(rs[0]["points"]))]
    return summary, per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kodak", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/kodak"))
    ap.add_argument("--heldout", metavar="TRAIN_DIR", help="instead of Kodak: the photos the trainer holds out of "
                    "TRAIN_DIR (every 20th), for choosing a model's step count without looking at the test set")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-steps", help="comma list of step counts to run the model at (default: its own)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--keep", type=_keep_arg, help="uqdm kept coordinates: every step but the last two codes this "
                    "fraction of its coordinates, the rest drawn from its prior (README, UQDM kept coordinates); or a "
                    "comma list, one fraction per step but the last (e.g. 0.2,0.3,1); default: the model's shares")
    ap.add_argument("--parts", help="write the steps in parts ending at these fractions of their coordinates "
                    "(e.g. 0.05,0.2,0.35): a point after every section, BD-rates over all of them")
    ap.add_argument("--no-channel-aware", dest="channel_aware", action="store_false",
                    help="reconstruct from the received latents as they are (x_hat), not inside the steps' boxes")
    ap.add_argument("--methods", default=",".join(METHODS), help="reconstructions to measure (default: all three; "
                    "denoise alone is the quickest)")
    ap.add_argument("--lossless-only", dest="lossless_only", action="store_true", help="only the lossless files "
                    "(encode, decode, bit-exact check; no prefixes, no BD-rates): full-size images in minutes")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = diffcodec.get_model(a.model)
    images = load_benchmark_images(a.kodak, a.heldout, scale=a.scale, limit=a.limit)
    # the anchors of the BD-rates (none for --lossless-only, which measures no curve)
    jpeg, webp = (None, None) if a.lossless_only else (baseline_curve(images), baseline_curve(images, "webp"))
    counts = [int(v) for v in a.num_steps.split(",")] if a.num_steps else [model.num_steps]
    parts = tuple(float(v) for v in a.parts.split(",")) if a.parts else None
    methods = () if a.lossless_only else tuple(m for m in METHODS if m in a.methods.split(","))
    if not methods and not a.lossless_only:
        ap.error(f"--methods: some of {', '.join(METHODS)}")
    runs = []
    for T in counts:
        summary, per = summarise(with_num_steps(model, T), images, a.scale, a.channel_aware, parts, a.keep, methods)
        summary["image_set"] = "held-out training photos" if a.heldout else "kodak"
        if a.lossless_only:
            print(json.dumps(summary, indent=1), flush=True)
            runs.append({"summary": summary, "per_image": per})
            continue
        jb, jp = jpeg["results"]["bpp"], jpeg["results"]["psnr-rgb"]
        summary["bd_rate_vs_jpeg"] = {
            m: bd_rate(jb, jp, [s["bpp"] for s in summary["steps"]], [s[m] for s in summary["steps"]]) for m in methods}
        wb, wp = webp["results"]["bpp"], webp["results"]["psnr-rgb"]
        summary["bd_rate_vs_webp"] = {
            m: bd_rate(wb, wp, [s["bpp"] for s in summary["steps"]], [s[m] for s in summary["steps"]]) for m in methods}
        if parts:  # every cut point, and the points no other cut beats at fewer bits (the codec's best choices)
            pts = summary["points"]
            summary["bd_rate_vs_jpeg_all_points"] = {
                m: bd_rate(jb, jp, [p["bpp"] for p in pts], [p[m] for p in pts]) for m in methods}
            summary["bd_rate_vs_jpeg_dominant_points"] = {}
            for m in methods:
                best = [p for p in pts if not any(q["bpp"] <= p["bpp"] and q[m] > p[m] for q in pts)]
                summary["bd_rate_vs_jpeg_dominant_points"][m] = bd_rate(jb, jp, [p["bpp"] for p in best],
                                                                        [p[m] for p in best])
        how = "" if a.channel_aware else " from the received latent (no box)"
        results = {m: {"name": f"diffcodec-uqdm-{m}", "description": f"{model.model_id} at {T} steps, {m} "
                       f"reconstruction{how}", "results": {"bpp": [s["bpp"] for s in summary["steps"]],
                                                           "psnr-rgb": [s[m] for s in summary["steps"]]}}
                   for m in methods}
        print(json.dumps(summary, indent=1), flush=True)
        runs.append({"summary": summary, "compressai": results, "per_image": per})
    out = dict(runs[0]) if len(runs) == 1 else {"by_num_steps": {str(T): r for T, r in zip(counts, runs)}}
    if not a.lossless_only:
        out["jpeg"], out["webp"] = jpeg, webp
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
