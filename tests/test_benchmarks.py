"""Helpers of the benchmark scripts (the scripts themselves need the bundled models and Kodak)."""

import importlib.util
from pathlib import Path


def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(enc: float, dec: float, peak: float) -> dict:
    return {"codec": "uqdm", "size": "8x8", "bpp": 1.0, "peak_rss_mb": peak,
            "encode": {"seconds": enc, "network_s": enc / 2, "coding_share": 0.5, "nfe": 2},
            "decode": {"seconds": dec, "network_s": dec / 4, "coding_share": 0.75, "nfe": 3}}


def test_speed_median_run_takes_each_phase_from_its_median_run():
    speed = _load("speed")
    row = speed.median_run([_run(3.0, 1.0, 100), _run(1.0, 5.0, 300), _run(2.0, 4.0, 200)])
    assert row["encode"]["seconds"] == 2.0 and row["encode"]["network_s"] == 1.0
    assert row["decode"]["seconds"] == 4.0 and row["decode"]["network_s"] == 1.0
    assert row["encode"]["runs_s"] == [3.0, 1.0, 2.0] and row["peak_rss_mb"] == 300
    one = speed.median_run([_run(3.0, 1.0, 100)])
    assert one["encode"]["seconds"] == 3.0 and one["decode"]["runs_s"] == [1.0]
