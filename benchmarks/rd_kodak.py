"""Rate-distortion of the classical baselines on Kodak, BD-rate tables and RD plots.

    python benchmarks/rd_kodak.py [--kodak ../shared/data/kodak] [--scale 4] [--limit N]
                                  [--codecs jpeg,jpeg2000,webp,avif,jpegxl,heic] [--out DIR]
                                  [--extra curve.json ...] [--anchor jpeg] [--bd-method pchip|cubic]
                                  [--target-bpps 0.25,0.5,1,2]

Writes into DIR:
  * ``<codec>.json``  -- one CompressAI-style result per baseline (bpp from whole files, PSNR, MS-SSIM, SWD);
  * ``bd.json`` / ``bd.txt`` -- BD-rate (PSNR and MS-SSIM dB) and BD-PSNR of every curve (baselines and
    ``--extra`` curves, e.g. written by a diffcodec benchmark) against the anchor, and of every extra curve
    against every baseline;
  * ``rd_psnr.png``, ``rd_msssim.png``, ``rd_swd.png`` -- RD plots of all curves.
Unavailable codecs are skipped with a message.  Threads are limited to 1 by default (``--threads``):
this runs beside training jobs and the images are small.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _limit_threads(n: int) -> None:
    """Must run before numpy is imported: BLAS/OpenMP pools read these at load time."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))


def _fmt(v: float, unit: str) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:+.2f}{unit}"


def bd_table(curves: list[dict], anchor: dict, method: str) -> tuple[list[dict], str]:
    """Rows of BD numbers for ``curves`` against ``anchor`` and the table as text."""
    from diffcodec.evaluate import compare_curves

    rows = []
    for c in curves:
        if c is anchor:
            continue
        rows.append({"name": c["name"], "anchor": anchor["name"], **compare_curves(anchor, c, method=method)})
    width = max([len(r["name"]) for r in rows] + [8])
    head = (f"{'codec':<{width}}  {'BD-rate PSNR':>13}  {'BD-PSNR':>9}  {'BD-rate MS-SSIM':>16}"
            f"   (anchor: {anchor['name']})")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {_fmt(r['bd-rate-psnr'], '%'):>13}  {_fmt(r['bd-psnr'], ' dB'):>9}  "
                     f"{_fmt(r['bd-rate-ms-ssim'], '%'):>16}")
    return rows, "\n".join(lines)


def rd_table(curve: dict) -> str:
    res = curve["results"]
    lines = [f"{curve['name']}:  {'quality':>8} {'bpp':>7} {'PSNR':>7} {'MS-SSIM':>8} {'SWD':>7} {'time/img':>9}"]
    for i, b in enumerate(res["bpp"]):
        q, p = res.get("quality", [None] * len(res["bpp"]))[i], res["psnr-rgb"][i]
        m = res.get("ms-ssim-rgb", [None] * len(res["bpp"]))[i]
        s = res.get("swd", [None] * len(res["bpp"]))[i]
        t = res.get("coding_time", [None] * len(res["bpp"]))[i]
        lines.append(f"{'':{len(curve['name']) + 2}} {q if q is not None else '':>8} {b:7.3f} "
                     f"{p if p is None else f'{p:7.2f}':>7} {m if m is None else f'{m:8.4f}':>8} "
                     f"{s if s is None else f'{s:7.1f}':>7} {t if t is None else f'{1e3 * t:7.1f}ms':>9}")
    return "\n".join(lines)


def diffcodec_curve(images, spec: str, swd: bool) -> dict:
    """RD curve of a diffcodec model: whole .dfc files at each step count, decoded with METHOD."""
    import diffcodec
    from diffcodec.evaluate import evaluate_curve

    name, method, steps = spec.split(":")
    model = diffcodec.get_model(name)

    def code(img, k):
        data = diffcodec.compress(img, model=model, steps=int(k)).data
        return data, diffcodec.decompress(data, model=model, method=method)

    return evaluate_curve(images, code, [int(k) for k in steps.split(",")], name=f"{name}-{method}",
                          description=f"diffcodec {model.codec_id} model {name} ({model.model_hash}), {method}",
                          swd=swd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kodak", type=Path, default=ROOT.parent / "shared" / "data" / "kodak")
    ap.add_argument("--scale", type=int, default=4, help="downscale factor (4 = kodak-small, 192x128)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--codecs", default="jpeg,jpeg2000,webp,avif,jpegxl,heic")
    ap.add_argument("--out", type=Path, default=Path("rd_kodak_out"))
    ap.add_argument("--extra", type=Path, nargs="*", default=[], help="more CompressAI-style JSON curves to compare")
    ap.add_argument("--diffcodec", nargs="*", default=[], metavar="MODEL:METHOD:STEPS",
                    help="diffcodec curves measured here, e.g. uqdm-small:denoise:1,2,3 diffc-small:flow:2,4,6,8")
    ap.add_argument("--anchor", default="jpeg", help="name of the BD-rate anchor curve")
    ap.add_argument("--bd-method", choices=("pchip", "cubic"), default="pchip")
    ap.add_argument("--target-bpps", default=None, help="comma list: sample every codec at these mean bpps")
    ap.add_argument("--no-swd", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    _limit_threads(args.threads)
    from diffcodec.baselines import select_baselines
    from diffcodec.evaluate import evaluate_baselines, load_images, load_results, plot_rd, save_results

    try:
        chosen, skipped = select_baselines([c.strip() for c in args.codecs.split(",") if c.strip()])
    except KeyError as e:
        ap.error(str(e.args[0]))
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", file=sys.stderr)
    targets = [float(t) for t in args.target_bpps.split(",")] if args.target_bpps else None

    images = load_images(args.kodak, scale=args.scale, limit=args.limit)
    sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in images.values()})
    print(f"{len(images)} images from {args.kodak} at 1/{args.scale} ({', '.join(sizes)})", flush=True)

    t0 = time.perf_counter()
    results = evaluate_baselines(images, list(chosen), target_bpps=targets, swd=not args.no_swd)
    print(f"baselines evaluated in {time.perf_counter() - t0:.1f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    curves = []
    for name, res in results.items():
        save_results(res, args.out / f"{name}.json")
        curves.append(res)
        print(rd_table(res))
    for spec in args.diffcodec:
        res = diffcodec_curve(images, spec, swd=not args.no_swd)
        save_results(res, args.out / f"{res['name']}.json")
        curves.append(res)
        print(rd_table(res))
    for path in args.extra:
        curves.append(load_results(path))

    by_name = {c["name"]: c for c in curves}
    if args.anchor not in by_name:
        print(f"anchor {args.anchor!r} not among the curves ({', '.join(by_name)}); no BD table", file=sys.stderr)
        bd = {}
    else:
        rows, text = bd_table(curves, by_name[args.anchor], args.bd_method)
        bd = {"method": args.bd_method, "anchor": args.anchor, "rows": rows}
        blocks = [f"BD metrics ({args.bd_method}; MS-SSIM in dB; negative BD-rate = fewer bits than the anchor)",
                  text]
        extra_names = [c["name"] for c in curves[len(results):]]
        for base in results.values():
            if not extra_names:
                break
            if base is by_name[args.anchor]:
                continue  # already in the first table
            extra_rows, extra_text = bd_table([by_name[n] for n in extra_names], base, args.bd_method)
            bd.setdefault("extra_vs_baselines", []).extend(extra_rows)
            blocks.append(extra_text)
        table = "\n\n".join(blocks)
        print()
        print(table)
        (args.out / "bd.txt").write_text(table + "\n")
        (args.out / "bd.json").write_text(json.dumps(bd, indent=2, allow_nan=True) + "\n")

    title = f"Kodak 1/{args.scale} ({len(images)} images)"
    for metric, fname in (("psnr-rgb", "rd_psnr.png"), ("ms-ssim-db", "rd_msssim.png"), ("swd", "rd_swd.png")):
        try:
            plot_rd(curves, metric, args.out / fname, title=title)
        except ValueError as e:
            print(f"no {fname}: {e}", file=sys.stderr)
    print(f"\nwrote {args.out}/: {', '.join(sorted(p.name for p in args.out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
