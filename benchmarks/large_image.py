"""Large images: peak memory and time of compressing (and decoding) a 24-megapixel photo.

    python benchmarks/large_image.py [--width 6000] [--height 4000] [--codec uqdm|diffc|rvgc] [--steps 1]
                                     [--noise-basis B] [--model NAME] [--q 4] [--parts 0.2] [--no-decode]
                                     [--json benchmarks/results/large_image.json]

A tiny random-weights model (``tests/conftest.make_tiny``: the network is cheap, so what is
measured is the codec's own arrays: latents, network outputs, probability tables, range coder)
codes a synthetic photo-like image of the given size for ``--steps`` steps; the file is then
decoded.  Each phase runs in a fresh process with one torch thread, so ``ru_maxrss`` is the peak
resident memory of that phase alone.  Reported per phase: peak RSS (MiB), RSS before the work
(interpreter + torch + model + input), the difference, bytes of peak per pixel, and seconds.
The measured numbers go to the JSON file only (not into this docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    """Current resident set size (Linux /proc), MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - not Linux
        return float("nan")


def _peak_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def make_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Photo-like uint8 RGB (smooth gradients + edges + noise), built row block by row block."""
    rng = np.random.default_rng(seed)
    out = np.empty((h, w, 3), np.uint8)
    xx = np.arange(w, dtype=np.float32)[None, :, None]
    for y0 in range(0, h, 256):
        y1 = min(h, y0 + 256)
        yy = np.arange(y0, y1, dtype=np.float32)[:, None, None]
        base = 60 + 120 * xx / w + 40 * np.sin(yy / 37.0 + np.array([0.0, 1.0, 2.0], np.float32))
        base = base + 30 * ((xx // 97 + yy // 61) % 2) + rng.normal(0, 6, size=(y1 - y0, w, 3)).astype(np.float32)
        out[y0:y1] = np.clip(np.round(base), 0, 255).astype(np.uint8)
    return out


def child(args) -> None:
    """One phase in this process: prints a JSON record."""
    import torch

    torch.set_num_threads(1)
    import diffcodec

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny

    if args.model:  # a real model (e.g. the bundled rvgc-small): its activations are part of the peak
        model = diffcodec.get_model(args.model, args.codec)
    else:
        model = make_tiny(args.codec, seed=0, **({"noise_basis": args.noise_basis} if args.noise_basis else {}))
        model.double().eval()
        model.model_id, model.model_hash = f"tiny-{args.codec}", "0123456789abcdef"
    work = Path(args.work)
    if args.phase == "compress":
        img = np.load(work / "img.npy")
        before = _rss_mib()
        t0 = time.perf_counter()
        kw = {"q": args.q} if args.codec == "rvgc" else {"steps": args.steps, "c_max": args.c_max,
                                                         "parts": args.parts}
        res = diffcodec.compress(img, model=model, **kw)
        dt = time.perf_counter() - t0
        (work / "img.dfc").write_bytes(res.data)
        extra = {"file_bytes": len(res.data), "bpp": res.bpp}
    else:
        data = (work / "img.dfc").read_bytes()
        before = _rss_mib()
        t0 = time.perf_counter()
        out = diffcodec.decompress(data, model=model, max_pixels=args.width * args.height)
        dt = time.perf_counter() - t0
        ok = out.shape == (args.height, args.width, 3)
        extra = {"shape_ok": bool(ok)}
    peak = _peak_mib()
    pixels = args.width * args.height
    print(json.dumps({"phase": args.phase, "seconds": round(dt, 2), "rss_before_mib": round(before, 1),
                      "peak_rss_mib": round(peak, 1), "peak_minus_before_mib": round(peak - before, 1),
                      "peak_bytes_per_pixel": round((peak - before) * 2**20 / pixels, 1), **extra}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=6000)
    p.add_argument("--height", type=int, default=4000)
    p.add_argument("--codec", default="uqdm", choices=["uqdm", "diffc", "rvgc"])
    p.add_argument("--model", help="a bundled model or path instead of the tiny random-weights one")
    p.add_argument("--q", type=float, default=4.0, help="rvgc: quantisation step")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--noise-basis", dest="noise_basis", help="uqdm: noise basis of the tiny model (default rgb)")
    p.add_argument("--c-max", dest="c_max", type=int, help="diffc: chunk cap in bits (default: the model's)")
    p.add_argument("--parts", help="uqdm: write the steps in parts ending at these fractions (e.g. 0.2)")
    p.add_argument("--no-decode", dest="decode", action="store_false")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "large_image.json"))
    p.add_argument("--note", default="", help="free text stored with the results (e.g. what else ran)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        child(args)
        return
    phases = ["compress"] + (["decompress"] if args.decode else [])
    results = {"width": args.width, "height": args.height, "megapixels": args.width * args.height / 1e6,
               "codec": args.codec, "model": args.model or "tests/conftest.make_tiny (random weights)",
               **({"q": args.q} if args.codec == "rvgc" else {"steps": args.steps}),
               **({"noise_basis": args.noise_basis} if args.noise_basis else {}),
               **({"parts": args.parts} if args.parts else {}),
               "torch_threads": 1, "cpu_count": os.cpu_count(), "note": args.note, "phases": {}}
    with tempfile.TemporaryDirectory() as work:
        np.save(Path(work) / "img.npy", make_image(args.height, args.width))
        for phase in phases:
            cmd = [sys.executable, __file__, "--phase", phase, "--work", work, "--width", str(args.width),
                   "--height", str(args.height), "--codec", args.codec, "--steps", str(args.steps), "--q", str(args.q)]
            if args.model:
                cmd += ["--model", args.model]
            if args.c_max:
                cmd += ["--c-max", str(args.c_max)]
            if args.noise_basis:
                cmd += ["--noise-basis", args.noise_basis]
            if args.parts:
                cmd += ["--parts", args.parts]
            load_before = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{phase} failed:\n{proc.stderr[-3000:]}")
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            # other load on the machine slows the phase down (not its memory)
            rec["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            results["phases"][phase] = rec
            print(json.dumps(rec), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
