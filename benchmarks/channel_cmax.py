"""Reverse channel coding (diffcodec.channel): c_max vs rate, speed and sample quality.

    python benchmarks/channel_cmax.py [--n 73728] [--kl 0.05 0.25 1.0] [--cmax 8 10 12 14 16]
                                      [--pad 2] [--dist gauss|laplace|const] [--max-seconds 110]
                                      [--json out.json]

One synthetic DiffC step per (KL per dim, c_max): m = (mu_Q - mu_P) / beta with the given mean KL
per dim (bits), n = 192*128*3 dims by default (a kodak-small image).  Reported per run:
  * bits/KL: payload bits (what the file stores) and ideal bits (sum -log2 P(j*)) over the KL;
  * encode and decode seconds per step (the encoder's cost is ~n/2 * 2^c_max Box-Muller pairs);
  * projection efficiency X.m / |m|^2: 1 for an exact sample of N(m, I) (+- 1/|m| noise), ~0.86
    reported by Vonderfecht & Liu at 2^16 candidates;
  * MSE of X - m per dim: 1 for an exact sample; the orthogonal part is always exact, so the
    shortfall shows up in the efficiency, not here;
  * chunks and the largest chunk KL (bits) after the random permutation.
A run whose predicted time (from a calibration search) exceeds --max-seconds is skipped with a note.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # a fair single-core number; another job may own the others

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from diffcodec import channel  # noqa: E402


def make_m(n: int, kl_per_dim: float, dist: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "gauss":
        g = rng.standard_normal(n)
    elif dist == "laplace":
        g = rng.laplace(size=n)
    else:
        g = np.sign(rng.standard_normal(n))
    return g / np.sqrt(np.mean(g * g)) * math.sqrt(2.0 * kl_per_dim * math.log(2.0))


def calibrate_ns_per_pair() -> float:
    """Time a small search to predict the cost of the big ones."""
    m = make_m(4096, 0.1, "gauss", 0)
    layout = channel.choose_layout(m, 0, 0, c_max=11)
    t = time.perf_counter()
    channel.select_indices(m, layout, 0, 0)
    return (time.perf_counter() - t) / (m.size / 2 * layout.num_candidates) * 1e9


def run(n: int, kl: float, c_max: int, pad: float, dist: str, seed: int) -> dict:
    m = make_m(n, kl, dist, seed)
    step = c_max
    t0 = time.perf_counter()
    x, payload, layout, ideal, kl_bits = channel.encode_step(m, seed, step, c_max=c_max, pad=pad)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    x_dec = channel.decode_step(payload, channel.StepLayout.from_bytes(layout.to_bytes()), n, seed, step)
    t_dec = time.perf_counter() - t0
    if not np.array_equal(x, x_dec):
        raise SystemExit("decoder sample differs from the encoder's")
    chunk_kl = channel.chunk_kl_bits(m, layout, seed, step)
    return {
        "n": n,
        "kl_per_dim": kl,
        "c_max": c_max,
        "pad": pad,
        "kl_bits": kl_bits,
        "payload_bits": 8 * len(payload),
        "layout_bytes": len(layout.to_bytes()),
        "ideal_bits": ideal,
        "bits_per_kl": 8 * len(payload) / kl_bits,
        "ideal_per_kl": ideal / kl_bits,
        "encode_s": t_enc,
        "decode_s": t_dec,
        "efficiency": float(x @ m / (m @ m)),
        "mse": float(np.mean((x - m) ** 2)),
        "n_chunks": layout.n_chunks,
        "log2_candidates": layout.log2_candidates,
        "max_chunk_kl": float(chunk_kl.max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=192 * 128 * 3)
    ap.add_argument("--kl", type=float, nargs="+", default=[0.05, 0.25, 1.0], help="mean KL per dim, bits")
    ap.add_argument("--cmax", type=int, nargs="+", default=[8, 10, 12, 14, 16])
    ap.add_argument("--pad", type=float, default=2.0)
    ap.add_argument("--dist", choices=["gauss", "laplace", "const"], default="gauss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=110.0, help="skip runs predicted to take longer")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()

    ns = calibrate_ns_per_pair()
    print(f"n = {args.n} dims, m ~ {args.dist}, pad = {args.pad}; calibration {ns:.1f} ns per candidate pair")
    print("exact sample: efficiency 1 +- 1/|m|, mse 1; Vonderfecht & Liu: efficiency ~0.86 at c_max 16")
    head = (
        f"{'KL/dim':>6} {'c_max':>5} {'KL bits':>9} {'chunks':>6} {'maxck':>6} {'bits/KL':>8} {'ideal/KL':>8} "
        f"{'enc s':>7} {'dec s':>6} {'effic.':>6} {'mse':>6}"
    )
    print(head)
    rows, skipped = [], []
    for kl in args.kl:
        for c_max in args.cmax:
            predicted = args.n / 2 * 2**c_max * ns * 1e-9 * 1.3
            if predicted > args.max_seconds:
                note = f"KL/dim {kl} c_max {c_max}: skipped, predicted {predicted:.0f} s > --max-seconds"
                print(note)
                skipped.append({"kl_per_dim": kl, "c_max": c_max, "predicted_s": predicted})
                continue
            r = run(args.n, kl, c_max, args.pad, args.dist, args.seed)
            rows.append(r)
            print(
                f"{kl:>6.3g} {c_max:>5d} {r['kl_bits']:>9.0f} {r['n_chunks']:>6d} {r['max_chunk_kl']:>6.1f} "
                f"{r['bits_per_kl']:>8.3f} {r['ideal_per_kl']:>8.3f} {r['encode_s']:>7.2f} {r['decode_s']:>6.3f} "
                f"{r['efficiency']:>6.3f} {r['mse']:>6.3f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"name": "channel_cmax", "dist": args.dist, "ns_per_pair": ns, "results": rows, "skipped": skipped},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
