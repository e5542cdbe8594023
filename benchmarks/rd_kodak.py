"""Rate-distortion of diffcodec models and the classical baselines on Kodak, BD-rate tables and RD plots.

    python benchmarks/rd_kodak.py [--kodak ../shared/data/kodak] [--scale 4] [--limit N]
                                  [--codecs jpeg,jpeg2000,webp,avif,jpegxl,heic] [--out DIR]
                                  [--diffcodec MODEL:METHOD[:STEPS] ...] [--extra curve.json ...]
                                  [--anchor jpeg] [--bd-method pchip|cubic] [--target-bpps 0.25,0.5,1,2]
                                  [--workers N]

A thin caller of :func:`diffcodec.evaluate.run_eval` (what ``diffcodec eval`` runs): each ``--diffcodec``
model is encoded once per image with all its steps and every prefix (or the STEPS listed) is a point;
the baselines are swept over their quality grids (or, with ``--target-bpps``, over the qualities whose
mean bpp on these images hits the targets).  Writes into DIR everything ``diffcodec eval`` writes
(``<curve>.json``, ``per_image.csv``, ``curves.txt``, ``bd.txt``, ``rd_*.png``, ``cache/`` for resuming),
plus ``bd.json`` and, appended to ``bd.txt``, BD-rate / BD-PSNR / BD-rate on MS-SSIM of every curve
(including ``--extra`` ones) against ``--anchor``.  Unavailable codecs are skipped with a message.  BLAS
threads are limited to 1 by default (``--threads``) and every worker uses 1 torch thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _limit_threads(n: int) -> None:
    """Must run before numpy is imported: BLAS/OpenMP pools read these at load time."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))


def _fmt(v: float | None, unit: str) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:+.2f}{unit}"


def anchor_table(curves: list[dict], anchor: dict, method: str) -> tuple[list[dict], str]:
    """BD-rate (PSNR, MS-SSIM dB) and BD-PSNR of every curve against ``anchor``: rows and text."""
    from diffcodec.evaluate import compare_curves

    rows = [{"name": c["name"], "anchor": anchor["name"], **compare_curves(anchor, c, method=method)}
            for c in curves if c is not anchor]
    width = max([len(r["name"]) for r in rows] + [8])
    head = (f"{'codec':<{width}}  {'BD-rate PSNR':>13}  {'BD-PSNR':>9}  {'BD-rate MS-SSIM':>16}"
            f"   (anchor: {anchor['name']})")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {_fmt(r['bd-rate-psnr'], '%'):>13}  {_fmt(r['bd-psnr'], ' dB'):>9}  "
                     f"{_fmt(r['bd-rate-ms-ssim'], '%'):>16}")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kodak", type=Path, default=ROOT.parent / "shared" / "data" / "kodak")
    ap.add_argument("--scale", type=int, default=4, help="downscale factor (4 = kodak-small, 192x128)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--codecs", default="jpeg,jpeg2000,webp,avif,jpegxl,heic")
    ap.add_argument("--out", type=Path, default=Path("rd_kodak_out"))
    ap.add_argument("--extra", type=Path, nargs="*", default=[], help="more CompressAI-style JSON curves to compare")
    ap.add_argument("--diffcodec", nargs="*", default=[], metavar="MODEL:METHOD[:STEPS]",
                    help="diffcodec curves measured here, e.g. uqdm-small:denoise:1,2,3 diffc-small:flow")
    ap.add_argument("--nfe", type=int, default=None, help="network evaluations of flow/ancestral reconstructions")
    ap.add_argument("--anchor", default="jpeg", help="name of the BD-rate anchor curve")
    ap.add_argument("--bd-method", choices=("pchip", "cubic"), default="pchip")
    ap.add_argument("--target-bpps", default=None, help="comma list: sample every codec at these mean bpps")
    ap.add_argument("--no-swd", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    _limit_threads(args.threads)
    from diffcodec.baselines import find_quality, select_baselines
    from diffcodec.evaluate import BaselineAdapter, load_images, load_results, make_adapter, run_eval

    try:
        chosen, skipped = select_baselines([c.strip() for c in args.codecs.split(",") if c.strip()])
    except KeyError as e:
        ap.error(str(e.args[0]))
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", file=sys.stderr)

    images = load_images(args.kodak, scale=args.scale, limit=args.limit)
    sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in images.values()})
    print(f"{len(images)} images from {args.kodak} at 1/{args.scale} ({', '.join(sizes)})", flush=True)

    adapters = []
    for spec in args.diffcodec:
        model, _, rest = spec.partition(":")
        method, _, steps = rest.partition(":")
        adapters.append(make_adapter(None, model, [method or "denoise"], nfe=args.nfe,
                                     steps=[int(k) for k in steps.split(",")] if steps else None))
    targets = [float(t) for t in args.target_bpps.split(",")] if args.target_bpps else None
    for name, baseline in chosen.items():
        grid = [find_quality(baseline, list(images.values()), t).quality for t in targets] if targets else None
        adapters.append(BaselineAdapter(name, grid))
    extra = [load_results(p) for p in args.extra]

    report = run_eval(images, adapters, args.out, workers=args.workers, swd=not args.no_swd, bd_method=args.bd_method,
                      extra_curves=extra, title=f"Kodak 1/{args.scale} ({len(images)} images)")
    curves = report["curves"] + extra
    by_name = {c["name"]: c for c in curves}
    if args.anchor not in by_name:
        print(f"anchor {args.anchor!r} not among the curves ({', '.join(by_name)}); no anchor table", file=sys.stderr)
    else:
        rows, text = anchor_table(curves, by_name[args.anchor], args.bd_method)
        head = f"BD metrics ({args.bd_method}; MS-SSIM in dB; negative BD-rate = fewer bits than the anchor)"
        print(f"\n{head}\n{text}")
        with open(args.out / "bd.txt", "a" if report["table"] else "w") as f:  # after run_eval's table
            f.write(f"\n{head}\n{text}\n")
        bd = {"method": args.bd_method, "anchor": args.anchor, "rows": rows, "vs_baselines": report["bd"]}
        (args.out / "bd.json").write_text(json.dumps(bd, indent=2, allow_nan=True) + "\n")
    print(f"\nwrote {args.out}/: {', '.join(sorted(p.name for p in args.out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
