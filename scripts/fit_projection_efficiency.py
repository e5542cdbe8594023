"""Simulate the projection efficiency of truncated PFR (the table in ``diffcodec.channel``).

    python scripts/fit_projection_efficiency.py [--std 0.005] [--seed 0]

For a chunk whose target is N(m, I) under the prior N(0, I), KL = |m|^2 / 2 nats, the chunked coder
picks, among N = 2^log2N standard normal candidates X_j, the one minimising T_j / w_j (T_j the
arrival times of a unit Poisson process, w_j = exp(m.X_j - |m|^2/2)).  Only the projections
u_j = X_j.m/|m| matter (they are N(0, 1)); components orthogonal to m stay standard normal.  The
projection efficiency is E[u_{j*}] / |m| (1 for an exact sample, < 1 when N is too small); the
decoder uses it to undo the sample's shrinkage towards the prior mean
(:func:`diffcodec.channel.projection_efficiency`).  Prints the table for every chunk KL (bits) and
padding log2 N - KL (bits) of the index-model grid (N = 2^(KL + padding) rounded); a cell with
log2 N > 18 is simulated at 18.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from diffcodec.channel import _KAPPA_GRID, _PAD_GRID

MAX_LOG2N = 18


def efficiency(kappa_bits: float, log2n: float, std: float, rng: np.random.Generator) -> float:
    """E[u_j*] / |m| among round(2^log2n) candidates, with enough searches for a standard error
    of about ``std`` (u_j* has variance <= 1, so 1 / (|m| std)^2 searches, at least 2000)."""
    norm_m = math.sqrt(2.0 * kappa_bits * math.log(2.0))
    trials = max(2000, math.ceil((1.0 / (norm_m * std)) ** 2))
    n = max(1, round(2.0**log2n))
    block = max(1, (1 << 22) // n)
    total = 0.0
    done = 0
    while done < trials:
        b = min(block, trials - done)
        u = rng.standard_normal((b, n))
        log_t = np.log(np.cumsum(rng.exponential(size=(b, n)), axis=1))
        j = np.argmin(log_t - norm_m * u, axis=1)
        total += float(u[np.arange(b), j].sum())
        done += b
    return total / trials / norm_m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--std", type=float, default=0.005, help="target standard error of each cell")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    print("_EFFICIENCY_TABLE = (")
    for kappa in _KAPPA_GRID:
        row = []
        for pad in _PAD_GRID:
            log2n = min(MAX_LOG2N, kappa + pad)
            row.append(efficiency(kappa, log2n, a.std, rng))
        print("    (" + ", ".join(f"{e:.3f}" for e in row) + f"),  # KL {kappa} bits", flush=True)
    print(")")


if __name__ == "__main__":
    main()
