"""Encode/decode speed of every codec's default model: network vs everything else, NFE, peak memory.

    python benchmarks/speed.py [--image ../shared/data/kodak/kodim01.png] [--sizes full,small]
                               [--codecs uqdm,diffc,rvgc] [--model NAME_OR_PATH] [--threads 2] [--repeat 1]
                               [--bpp RATE] [--json out.json]

For each codec and image size (``full`` = the Kodak image as is, 768x512; ``small`` = downscaled 4x
to 192x128) one case runs in a fresh subprocess (so peak memory is that case's own): compress with
the model's default quality (``--bpp``: to that rate, the encoder's rate control), then decompress with
the default decoder.  The model is the codec's
default unless ``--model`` names another (with a single codec).  Every network module's
``forward`` is timed; "coding" is all the rest (probability tables, entropy and channel coding,
random streams, container, image conversion).  NFE counts the main network's evaluations (the
denoiser U-Net; for rvgc also the transforms' calls are timed but not counted as NFE).  Peak memory
is the subprocess's maximum resident set size.

``--repeat N`` runs every case N times, each in a fresh subprocess, and reports for each phase the
run with the median seconds (its network and coding split, NFE), the seconds of every run, and the
largest peak memory: sub-second cases vary by several percent from one cold run to the next.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _instrument(model) -> dict:
    """Wrap the forward of every top-level network module; returns the live counters.

    NFE counts whole-image evaluations of the main network: ``evaluate_network`` calls for the diffusion
    codecs (one evaluation may run several tiles), the latent denoiser's calls for rvgc.
    """
    stats = {"network_s": 0.0, "nfe": 0}
    for name, mod in model.named_children():
        if name == "schedule":
            continue
        orig = mod.forward

        def timed(*args, _orig=orig, _main=(model.codec_id == "rvgc" and name == "den"), **kw):
            t0 = time.perf_counter()
            try:
                return _orig(*args, **kw)
            finally:
                stats["network_s"] += time.perf_counter() - t0
                stats["nfe"] += int(_main)

        mod.forward = timed
    if hasattr(model, "evaluate_network"):
        orig_eval = model.evaluate_network

        def counted(*args, **kw):
            stats["nfe"] += 1
            return orig_eval(*args, **kw)

        model.evaluate_network = counted
    return stats


def run_case(codec: str, size: str, image: str, threads: int, model_name: str | None = None,
             bpp: float | None = None) -> dict:
    import torch

    import diffcodec
    from diffcodec.evaluate import load_images

    torch.set_num_threads(threads)
    folder = Path(image).parent
    imgs = load_images(folder, scale=1 if size == "full" else 4, pattern=Path(image).name)
    img = next(iter(imgs.values()))
    model = diffcodec.get_model(model_name, codec)
    stats = _instrument(model)
    out = {"codec": codec, "model": model.model_id, "size": f"{img.shape[1]}x{img.shape[0]}", "threads": threads,
           "target_bpp": bpp}
    for phase in ("encode", "decode"):
        stats["network_s"], stats["nfe"] = 0.0, 0
        t0 = time.perf_counter()
        if phase == "encode":
            res = diffcodec.compress(img, model=model, bpp=bpp)
            data = res.data
        else:
            diffcodec.decompress(data, model=model)
        total = time.perf_counter() - t0
        out[phase] = {"seconds": total, "network_s": stats["network_s"], "coding_s": total - stats["network_s"],
                      "coding_share": (total - stats["network_s"]) / total, "nfe": stats["nfe"]}
        if phase == "encode" and codec == "diffc":  # per coded step: channel coding vs the network
            steps = len(res.sections)
            out[phase]["coding_s_per_step"] = out[phase]["coding_s"] / steps
            out[phase]["network_s_per_step"] = stats["network_s"] / steps
    out["bpp"] = 8.0 * len(data) / (img.shape[0] * img.shape[1])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


def median_run(runs: list[dict]) -> dict:
    """One row from repeated runs of a case: per phase the run with the median seconds (the lower
    middle one for an even count), every run's seconds under ``runs_s``, the largest peak memory."""
    out = dict(runs[0])
    for phase in ("encode", "decode"):
        ordered = sorted(runs, key=lambda r: r[phase]["seconds"])
        out[phase] = dict(ordered[(len(runs) - 1) // 2][phase], runs_s=[r[phase]["seconds"] for r in runs])
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return out


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(here.parent.parent / "shared" / "data" / "kodak" / "kodim01.png"))
    p.add_argument("--sizes", default="small,full")
    p.add_argument("--codecs", default="uqdm,diffc,rvgc")
    p.add_argument("--model", help="a model name or .safetensors path instead of the default (one codec only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="runs per case (fresh processes); medians reported")
    p.add_argument("--bpp", type=float, help="compress to this rate (rate control) instead of the default quality")
    p.add_argument("--json")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: CODEC:SIZE, run in a subprocess
    a = p.parse_args()
    if a.case:
        codec, size = a.case.split(":")
        print(json.dumps(run_case(codec, size, a.image, a.threads, a.model, a.bpp)))
        return
    if a.model and "," in a.codecs:
        p.error("--model needs a single codec (--codecs)")
    rows = []
    for size in a.sizes.split(","):
        for codec in a.codecs.split(","):
            runs = []
            for _ in range(max(1, a.repeat)):
                r = subprocess.run([sys.executable, __file__, "--case", f"{codec}:{size}", "--image", a.image,
                                    "--threads", str(a.threads)] + (["--model", a.model] if a.model else [])
                                   + (["--bpp", str(a.bpp)] if a.bpp else []),
                                   capture_output=True, text=True)
                if r.returncode:
                    print(r.stderr, file=sys.stderr)
                    raise SystemExit(f"case {codec}:{size} failed")
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            rows.append(median_run(runs))
            x = rows[-1]
            print(f"{x['codec']:<6} {x['size']:>8}  bpp {x['bpp']:.3f}  "
                  + "  ".join(f"{ph} {x[ph]['seconds']:7.2f} s (network {x[ph]['network_s']:6.2f}, coding "
                              f"{100 * x[ph]['coding_share']:4.1f}%, NFE {x[ph]['nfe']})"
                              for ph in ("encode", "decode"))
                  + f"  peak {x['peak_rss_mb']:.0f} MB"
                  + (f"  per step: coding {x['encode']['coding_s_per_step']:.2f} s, network "
                     f"{x['encode']['network_s_per_step']:.2f} s" if "coding_s_per_step" in x["encode"] else "")
                  + (f"  ({len(runs)} runs)" if len(runs) > 1 else ""),
                  flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        note = ("single run per case" if a.repeat <= 1 else
                f"{a.repeat} runs per case, each in a fresh process; per phase the run with the median seconds")
        Path(a.json).write_text(json.dumps({"threads": a.threads, "image": Path(a.image).name, "rows": rows,
                                            "median_note": note}, indent=1))


if __name__ == "__main__":
    main()
