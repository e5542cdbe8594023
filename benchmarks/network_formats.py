"""What PyTorch's CPU options do for the coding network: float64 (used) vs channels_last, float32, bf16.

    python benchmarks/network_formats.py [--model uqdm-medium] [--image kodim01.png] [--scale 1]
                                         [--repeat 2] [--json out.json]

The progressive codecs build their entropy-coding tables from the denoiser's outputs, so those outputs
must be identical in every process, on any thread count: the codecs evaluate the network in float64
and round eps to a 2^-EPS_GRID_BITS grid.  For each variant this measures, on a latent of the image at
a mid noise level: seconds per whole-image evaluation with 2 and with 1 torch threads (best of
``--repeat``), the largest output change between 1 and 2 threads, the fraction of eps values whose
grid cell changes with the thread count (any non-zero value would desynchronise some decoder), and the
largest difference from the float64 contiguous reference.  The numbers go to the JSON / stdout only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

import diffcodec
from diffcodec.diffusion import EPS_GRID_BITS
from diffcodec.entropy import quantize_to_grid
from diffcodec.evaluate import load_images
from diffcodec.schedule import alpha_sigma

VARIANTS = ("float64", "float64-channels_last", "float32", "float32-channels_last", "bf16-autocast")


def run_variant(net, z64: np.ndarray, gamma: float, variant: str, threads: int,
                repeat: int) -> tuple[float, np.ndarray]:
    torch.set_num_threads(threads)
    dtype = torch.float64 if variant.startswith("float64") else torch.float32
    fmt = torch.channels_last if variant.endswith("channels_last") else torch.contiguous_format
    net = net.to(dtype=dtype, memory_format=fmt)
    z = torch.from_numpy(z64).to(dtype).contiguous(memory_format=fmt)
    g = torch.tensor([gamma], dtype=dtype)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16-autocast" else contextlib.nullcontext()
    best, out = float("inf"), None
    with torch.inference_mode(), amp:
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = net(z, g)
            best = min(best, time.perf_counter() - t0)
    return best, out.double().contiguous().numpy()


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="uqdm-medium")
    p.add_argument("--image", default=str(here.parent.parent / "shared" / "data" / "kodak" / "kodim01.png"))
    p.add_argument("--scale", type=int, default=1, help="downscale factor of the image (1 = 768x512)")
    p.add_argument("--gamma", type=float, default=0.0, help="noise level log(sigma^2/alpha^2) of the latent")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json")
    a = p.parse_args()
    model = diffcodec.get_model(a.model)
    net = model.net.eval()
    img = next(iter(load_images(Path(a.image).parent, scale=a.scale, pattern=Path(a.image).name).values()))
    x = img.astype(np.float64).transpose(2, 0, 1)[None] / 127.5 - 1.0
    alpha, sigma = (float(v) for v in alpha_sigma(np.float64(a.gamma)))
    z = alpha * x + sigma * np.random.default_rng(0).standard_normal(x.shape)
    c = model.channels
    rows, ref = [], None
    for variant in a.variants.split(","):
        t2, o2 = run_variant(net, z, a.gamma, variant, 2, a.repeat)
        t1, o1 = run_variant(net, z, a.gamma, variant, 1, a.repeat)
        if ref is None:
            ref = o2
        cells = np.mean(quantize_to_grid(o1[:, :c], EPS_GRID_BITS) != quantize_to_grid(o2[:, :c], EPS_GRID_BITS))
        row = {"variant": variant, "seconds_2_threads": round(t2, 3), "seconds_1_thread": round(t1, 3),
               "max_change_1_vs_2_threads": float(np.abs(o1 - o2).max()),
               "eps_grid_cells_changed_1_vs_2_threads": float(cells),
               "max_diff_from_float64": float(np.abs(o2 - ref).max())}
        rows.append(row)
        print(f"{variant:<22} 2 threads {t2:7.3f} s  1 thread {t1:7.3f} s  1-vs-2 threads: max change "
              f"{row['max_change_1_vs_2_threads']:.2e}, eps grid cells changed {cells:.2e}  "
              f"max diff from float64 {row['max_diff_from_float64']:.2e}", flush=True)
    net.to(dtype=torch.float64, memory_format=torch.contiguous_format)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"model": model.model_id, "size": f"{z.shape[3]}x{z.shape[2]}",
                                            "gamma": a.gamma, "repeat": a.repeat, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
