"""One-command RD evaluation: ``diffcodec eval`` / ``diffcodec plot`` and the adapters behind them.

Tiny models (conftest) and 2 tiny synthetic images keep the whole file to a few seconds.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffcodec
from conftest import synthetic_image
from diffcodec.baselines import get_baseline
from diffcodec.cli import main
from diffcodec.evaluate import (
    BaselineAdapter,
    ProgressiveAdapter,
    RecordCache,
    bd_table,
    image_sha,
    load_results,
    make_adapter,
    run_eval,
)

RESULT_KEYS = ("bpp", "psnr-rgb", "ms-ssim-rgb", "swd", "encoding_time", "decoding_time")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second torch thread only adds spinning on a busy machine (eval itself uses 1)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i in range(2):
        Image.fromarray(synthetic_image(24, 32, seed=i)).save(d / f"im{i}.png")
    return d


def eval_args(images_dir, out, model, *extra):
    return ["eval", str(images_dir), "--codec", "uqdm", "--model", str(model), "--baselines", "jpeg",
            "--out", str(out), *extra]


def test_eval_end_to_end_schema_and_resume(images_dir, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(eval_args(images_dir, out, tiny_model_path, "--methods", "denoise,uqdm:flow", "-q")) == 0
    names = {"tiny-uqdm-denoise", "tiny-uqdm-flow", "jpeg"}
    assert names <= {p.stem for p in out.glob("*.json")}
    for name in names:
        r = json.loads((out / f"{name}.json").read_text())  # strict JSON, CompressAI's schema
        assert set(r) == {"name", "description", "results"} and r["name"] == name
        res = r["results"]
        n = len(res["bpp"])
        assert n == (4 if name != "jpeg" else len(get_baseline("jpeg").qualities))
        assert all(len(res[k]) == n for k in RESULT_KEYS + ("quality",))
        assert all(v is not None and v >= 0 for k in RESULT_KEYS for v in res[k])
    prog = load_results(out / "tiny-uqdm-denoise.json")["results"]
    assert prog["quality"] == [1, 2, 3, 4] and prog["bpp"] == sorted(prog["bpp"])
    assert prog["encoding_time"] == sorted(prog["encoding_time"])  # point k: time until section k was coded

    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:9] == ["image", "codec", "setting", "bytes", "bpp", "psnr", "ms-ssim", "enc_s", "dec_s"]
    assert len(rows) == 2 * (4 + 4 + len(get_baseline("jpeg").qualities))
    jpeg_rows = [r for r in rows if r["codec"] == "jpeg" and r["setting"] == "50.0"]
    at50 = get_baseline("jpeg").qualities.index(50.0)
    assert float(json.loads((out / "jpeg.json").read_text())["results"]["bpp"][at50]) == pytest.approx(
        np.mean([float(r["bpp"]) for r in jpeg_rows]), rel=1e-5)

    table = (out / "bd.txt").read_text()
    assert "tiny-uqdm-denoise" in table and "tiny-uqdm-flow" in table and "jpeg" in table
    for png in ("rd_psnr.png", "rd_msssim.png", "rd_swd.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")

    # rerun: every point is reused, nothing is recomputed, the outputs are rebuilt identically
    records = (out / "cache" / "records.jsonl").read_text()
    before = {p.name: p.read_text() for p in out.glob("*.json")}
    capsys.readouterr()
    assert main(eval_args(images_dir, out, tiny_model_path, "--methods", "denoise,uqdm:flow",
                          "--swd-max-bpp", "1000")) == 0
    log = capsys.readouterr().out
    assert "0 jobs to run" in log and "0 points computed" in log
    swd_table = (out / "swd_rate.txt").read_text()  # every point: SWD next to JPEG's at the same bpp
    assert "tiny-uqdm-flow" in swd_table and "lower (*) at: jpeg" in swd_table and "swd_rate.txt" in log
    # every point's SWD per pyramid level, as in the curve JSONs (finest first), and their mean
    levels = (out / "swd_levels.txt").read_text().split("\n\n")
    jpeg = json.loads((out / "jpeg.json").read_text())["results"]
    block = next(b for b in levels if b.startswith("jpeg\n")).splitlines()
    assert block[1].split()[2:] == ["L24", "mean"]  # 24x32 images: one level of at least 16 pixels
    rows = sorted(zip(jpeg["bpp"], jpeg["swd-per-level"], jpeg["swd"]))
    assert len(block) == 2 + len(rows)
    for line, (_, per, mean) in zip(block[2:], rows):
        assert [float(v) for v in line.split()[2:]] == [round(v, 1) for v in [*per, mean]]
    assert (out / "cache" / "records.jsonl").read_text() == records
    assert {p.name: p.read_text() for p in out.glob("*.json")} == before

    # an interrupted run (last records lost): only the missing points are computed again
    lines = records.splitlines(keepends=True)
    (out / "cache" / "records.jsonl").write_text("".join(lines[:-3]) + lines[-3][:20])  # + a cut line
    with pytest.warns(UserWarning, match="unreadable record"):
        assert main(eval_args(images_dir, out, tiny_model_path, "--methods", "denoise,uqdm:flow")) == 0
    assert "3 points computed" in capsys.readouterr().out
    after = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    for name, text in before.items():  # equal up to the wall times of the recomputed points
        old = json.loads(text)["results"]
        assert {k: v for k, v in old.items() if "time" not in k} == \
            {k: v for k, v in after[name]["results"].items() if "time" not in k}

    # plot: any result JSONs, non-result JSON skipped with a note
    (out / "bd.json").write_text("{}")
    for metric in ("psnr", "ms-ssim", "swd"):
        png = tmp_path / f"{metric}.png"
        assert main(["plot", *map(str, sorted(out.glob("*.json"))), "-o", str(png), "--metric", metric]) == 0
        assert png.read_bytes().startswith(b"\x89PNG")
    assert "skipping" in capsys.readouterr().err


def test_progressive_points_are_cut_files(tiny_model_path, tiny_model):
    """Point k of the one encoded file == a file encoded with k steps, decoded like a cut download."""
    img = synthetic_image(24, 32, seed=3)
    ad = ProgressiveAdapter("uqdm", str(tiny_model_path), ("denoise", "flow"))
    assert ad.curves() == ["tiny-uqdm-denoise", "tiny-uqdm-flow"] and ad.steps == (1, 2, 3, 4)
    (group, pts), = ad.groups()
    points = ad.run(img, group, pts)
    assert len(points) == 8
    for p in points:
        k, method = p.setting, p.curve.rsplit("-", 1)[1]
        ref = diffcodec.compress(img, model=tiny_model, steps=k)
        assert p.file_bytes == len(ref.data)
        assert np.array_equal(p.decoded, diffcodec.decompress(ref.data, model=tiny_model, method=method))
        assert p.enc_s > 0 and p.dec_s > 0
    # only the needed points are produced (resuming half a curve)
    part = ad.run(img, group, [("tiny-uqdm-flow", 2)])
    assert [(p.curve, p.setting) for p in part] == [("tiny-uqdm-flow", 2)]


def test_rate_points_are_the_files_compress_writes_for_each_target(images_dir, tiny_model_path, tiny_model,
                                                                    tmp_path):
    """--bpp: one file per image and target, the one compress(bpp=target) writes, in curves of their own."""
    from diffcodec.evaluate import RateAdapter

    img = synthetic_image(24, 32, seed=3)
    ad = make_adapter("uqdm", str(tiny_model_path), ("denoise", "flow"), bpp=[8.0, 1.5, 1.5])
    assert isinstance(ad, RateAdapter) and ad.targets == (1.5, 8.0)
    assert ad.curves() == ["tiny-uqdm+bpp-denoise", "tiny-uqdm+bpp-flow"]
    assert ad.config != ProgressiveAdapter("uqdm", str(tiny_model_path)).config
    for group, pts in ad.groups():
        points = ad.run(img, group, pts)
        ref = diffcodec.compress(img, model=tiny_model, bpp=group).data
        assert len(points) == 2
        for p in points:
            assert p.file_bytes == len(ref) and 8.0 * p.file_bytes / (24 * 32) <= group
            assert np.array_equal(p.decoded, diffcodec.decompress(ref, model=tiny_model,
                                                                  method=p.curve.rsplit("-", 1)[1]))
    with pytest.raises(ValueError, match="rate control"):
        make_adapter("uqdm", str(tiny_model_path), bpp=[1.0], steps=[2])
    parted = make_adapter("uqdm", str(tiny_model_path), bpp=[8.0], parts=[0.5])  # the rule of a file in parts
    assert parted.curves() == ["tiny-uqdm+bpp+parts-denoise"] and parted.config != ad.config
    (group, pts), = parted.groups()
    ref = diffcodec.compress(img, model=tiny_model, bpp=8.0, parts=[0.5]).data
    assert parted.run(img, group, pts)[0].file_bytes == len(ref)
    out = tmp_path / "res"
    assert main(eval_args(images_dir, out, tiny_model_path, "--bpp", "1.5,8", "-q", "--no-swd")) == 0
    res = load_results(out / "tiny-uqdm+bpp-denoise.json")["results"]
    assert len(res["bpp"]) == 2 and res["bpp"][0] <= 1.5 and res["bpp"][1] <= 8.0
    assert main(eval_args(images_dir, out, tiny_model_path, "--bpp", "x")) == 1


def test_progressive_decode_time_counts_every_network_evaluation(tiny_model_path, monkeypatch):
    """decode_steps reuses x_hat(z_k)'s evaluation for step k+1, but point k's decoding time is still
    what decoding that prefix alone costs: k evaluations for its sections + 1 for x_hat(z_k)."""
    import time

    from diffcodec.diffusion import DiffusionModel

    real = DiffusionModel.evaluate_network

    def slow(self, z, gamma):
        time.sleep(0.05)
        return real(self, z, gamma)

    monkeypatch.setattr(DiffusionModel, "evaluate_network", slow)
    ad = ProgressiveAdapter("uqdm", str(tiny_model_path), ("denoise",), steps=[1, 2, 3])
    (group, pts), = ad.groups()
    points = ad.run(synthetic_image(24, 32, seed=4), group, pts)
    assert [p.setting for p in points] == [1, 2, 3]
    for p in points:
        assert (p.setting + 1) * 0.05 <= p.dec_s < (p.setting + 1) * 0.05 + 0.5


def test_bd_table_identity_and_known_rate_factor():
    base = {"name": "anchor", "results": {"bpp": [0.2, 0.4, 0.8, 1.6], "psnr-rgb": [27.0, 30.0, 33.5, 37.0],
                                          "ms-ssim-rgb": [0.93, 0.96, 0.98, 0.99]}}
    shifted = {"name": "x1.1", "results": {**base["results"], "bpp": [1.1 * b for b in base["results"]["bpp"]]}}
    rows, text = bd_table([base, shifted], [base])
    got = {r["curve"]: r["bd-rate-psnr"] for r in rows}
    assert got["anchor"] == pytest.approx(0.0, abs=1e-9)
    assert got["x1.1"] == pytest.approx(10.0, abs=1e-6)
    assert rows[1]["bd-rate-ms-ssim"] == pytest.approx(10.0, abs=1e-6)
    assert "+10.0%" in text and "+0.0%" in text
    far = {"name": "far", "results": {"bpp": [0.2, 0.4], "psnr-rgb": [60.0, 70.0]}}
    rows, text = bd_table([far], [base])
    assert rows[0]["bd-rate-psnr"] is None and "n/a" in text


def test_baseline_point_roundtrips_through_its_codec(tmp_path):
    img = synthetic_image(24, 32, seed=5)
    ad = BaselineAdapter("jpg", qualities=[30, 80])
    assert ad.curves() == ["jpeg"] and ad.qualities == (30.0, 80.0)
    codec = get_baseline("jpeg")
    data, dec = codec(img, 80.0)
    (p,) = ad.run(img, 80.0, [("jpeg", 80.0)])
    assert p.file_bytes == len(data) and np.array_equal(p.decoded, dec)
    assert np.array_equal(codec.decode(data), p.decoded)  # the whole file alone decodes to the point
    # the cached reconstruction is lossless
    report = run_eval({"a": img}, [ad], tmp_path, swd=True, progress=False, log=None, plots=False)
    cache = RecordCache(tmp_path)
    rec = cache.get("a", image_sha(img), "jpeg", 80.0, ad.config, need_recon=True)
    assert rec["bytes"] == len(data) and np.array_equal(cache.load_recon(rec), dec)
    assert report["curves"][0]["results"]["bpp"][1] == pytest.approx(8 * len(data) / img[..., 0].size)
    with pytest.raises(ValueError, match="outside"):
        BaselineAdapter("jpeg", qualities=[0])


def test_a_decoding_time_recorded_as_null_is_reported_as_not_measured(tmp_path):
    import json

    img = synthetic_image(24, 32, seed=6)
    ad = BaselineAdapter("jpeg", qualities=[30, 80])
    run_eval({"a": img}, [ad], tmp_path, swd=False, progress=False, log=None, plots=False)
    records = tmp_path / "cache" / "records.jsonl"
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    for r in recs:
        r["dec_s"] = None if r["setting"] == 80.0 else r["dec_s"]
    records.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report = run_eval({"a": img}, [ad], tmp_path, swd=False, progress=False, log=None, plots=False)
    assert report["jobs_run"] == 0
    dec = report["curves"][0]["results"]["decoding_time"]
    assert dec[0] is not None and dec[1] is None
    assert json.loads((tmp_path / "jpeg.json").read_text())["results"]["decoding_time"][1] is None


def test_records_of_a_superseded_config_are_dropped_after_a_run(tmp_path):
    """A curve recomputed under another config (a re-exported model, new decoder defaults) leaves no
    records of its old config behind; records of curves outside the run stay."""
    import json

    img = synthetic_image(24, 32, seed=6)
    jpeg, webp = BaselineAdapter("jpeg", qualities=[30, 80]), BaselineAdapter("webp", qualities=[50])
    run_eval({"a": img}, [jpeg, webp], tmp_path, swd=False, progress=False, log=None, plots=False)
    records = tmp_path / "cache" / "records.jsonl"
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    records.write_text("".join(json.dumps({**r, "config": r["config"] + "-old"}) + "\n" for r in recs
                               if r["codec"] == "jpeg") + records.read_text())
    report = run_eval({"a": img}, [jpeg], tmp_path, swd=False, progress=False, log=None, plots=False)
    assert report["jobs_run"] == 0
    left = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted((r["codec"], r["config"]) for r in left) == sorted((r["codec"], r["config"]) for r in recs)


def test_records_and_set_metrics_reproduce_an_eval_without_the_reconstructions(tmp_path):
    """What a results folder commits (records.jsonl, set_metrics.json, no PNGs) is enough to rebuild its
    outputs; without the cached SWD the points are recomputed (their PNGs are then needed)."""
    import shutil

    imgs = {"a": synthetic_image(24, 32, seed=6), "b": synthetic_image(24, 32, seed=7)}
    first = run_eval(imgs, [BaselineAdapter("jpeg", qualities=[30, 80])], tmp_path, swd=True, progress=False,
                     log=None, plots=False)
    shutil.rmtree(tmp_path / "cache" / "recon")
    again = run_eval(imgs, [BaselineAdapter("jpeg", qualities=[30, 80])], tmp_path, swd=True, progress=False,
                     log=None, plots=False)
    assert first["jobs_run"] == 4 and again["jobs_run"] == 0 and again["points_cached"] == 4
    assert again["curves"][0]["results"] == first["curves"][0]["results"]
    # a new curve beside the cached one is computed (with its PNGs), the cached one is not
    both = run_eval(imgs, [BaselineAdapter("jpeg", qualities=[30, 80]), BaselineAdapter("webp", qualities=[50])],
                    tmp_path, swd=True, progress=False, log=None, plots=False)
    assert both["jobs_run"] == 2 and both["curves"][0]["results"]["swd"] == first["curves"][0]["results"]["swd"]
    (tmp_path / "cache" / "set_metrics.json").unlink()
    redo = run_eval(imgs, [BaselineAdapter("jpeg", qualities=[30, 80])], tmp_path, swd=True, progress=False,
                    log=None, plots=False)
    assert redo["jobs_run"] == 4
    assert redo["curves"][0]["results"]["swd"] == pytest.approx(first["curves"][0]["results"]["swd"])


def test_results_do_not_depend_on_worker_count(images_dir, tiny_model_path, tmp_path):
    from diffcodec.evaluate import load_images

    images = load_images(images_dir)

    def evaluate(out, workers):
        adapters = [ProgressiveAdapter("uqdm", str(tiny_model_path), steps=[2, 3]), BaselineAdapter("jpeg", [20, 60])]
        rep = run_eval(images, adapters, out, workers=workers, plots=False, progress=False, log=None)
        assert rep["jobs_run"] == 2 + 4
        return {c["name"]: {k: v for k, v in c["results"].items() if "time" not in k} for c in rep["curves"]}

    one, two = evaluate(tmp_path / "w1", 1), evaluate(tmp_path / "w2", 2)  # in-process vs 2 spawned workers
    assert one == two and set(one) == {"tiny-uqdm-denoise", "jpeg"}
    assert one["tiny-uqdm-denoise"]["quality"] == [2, 3] and all(v > 0 for v in one["jpeg"]["swd"])


def test_eval_usage_errors(images_dir, tiny_model_path, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["eval", str(images_dir), "--out", out]) == 1  # nothing to evaluate
    assert main(["eval", str(images_dir), "--baselines", "nosuch", "--out", out]) == 1
    assert main(["eval", str(images_dir), "--codec", "uqdm", "--model", str(tiny_model_path), "--methods",
                 "sharpen", "--out", out]) == 1
    assert main(["eval", str(tmp_path / "missing"), "--baselines", "jpeg", "--out", out]) == 1
    err = capsys.readouterr().err
    assert err.count("diffcodec: error:") == 4 and "Traceback" not in err
    with pytest.raises(ValueError, match="unknown codec"):
        make_adapter("nosuch")


def test_eval_rvgc_sweeps_q_on_the_same_images(images_dir, tmp_path, capsys):
    """rvgc: one point per q for each decoder, bpp decreasing with q, from real files."""
    from conftest import make_tiny
    from diffcodec.models import save_model

    path = tmp_path / "tiny-rvgc.safetensors"
    save_model(make_tiny("rvgc"), path)
    out = tmp_path / "res"
    assert main(["eval", str(images_dir), "--codec", "rvgc", "--model", str(path), "--num-q", "3",
                 "--baselines", "none", "--out", str(out), "-q"]) == 0
    for method in ("deterministic", "sampler"):
        res = load_results(out / f"tiny-rvgc-{method}.json")
        bpp = res["results"]["bpp"]
        steps = np.diff(bpp)
        assert len(bpp) == 3 and (np.all(steps <= 0) or np.all(steps >= 0)), bpp  # whole 4-byte words: ties
        assert all(np.isfinite(res["results"]["psnr-rgb"]))


def test_eval_rvgc_default_curve_is_the_models_own_decoder(images_dir, tmp_path):
    """The ``default`` curve is what decompress gives: the plain synthesis above sampler_max_q, the sampler
    at or below; reusing the other curves' decodes gives the same points as decoding it on its own."""
    from conftest import make_tiny
    from diffcodec.models import save_model

    m = make_tiny("rvgc")
    q_min, q_max = (float(v) for v in m.q_range)
    m.sampler_max_q = 1.001 * float(np.sqrt(q_max * q_min))  # the middle of 3 log-spaced q's and below: sampler
    path = tmp_path / "tiny-rvgc.safetensors"
    save_model(m, path)
    out, alone = tmp_path / "res", tmp_path / "alone"
    assert main(["eval", str(images_dir), "--codec", "rvgc", "--model", str(path), "--num-q", "3",
                 "--baselines", "none", "--out", str(out), "-q", "--no-swd"]) == 0
    assert main(["eval", str(images_dir), "--codec", "rvgc", "--model", str(path), "--num-q", "3",
                 "--methods", "default", "--baselines", "none", "--out", str(alone), "-q", "--no-swd"]) == 0
    res = {k: load_results(out / f"tiny-rvgc-{k}.json")["results"] for k in ("deterministic", "sampler", "default")}
    assert res["default"]["quality"] == res["sampler"]["quality"] and res["default"]["quality"][0] > m.sampler_max_q
    for i, q in enumerate(res["default"]["quality"]):
        ref = res["deterministic"] if q > m.sampler_max_q else res["sampler"]
        assert res["default"]["psnr-rgb"][i] == ref["psnr-rgb"][i]
    assert res["deterministic"]["psnr-rgb"][0] != res["sampler"]["psnr-rgb"][0]  # the two decoders differ
    assert load_results(alone / "tiny-rvgc-default.json")["results"]["psnr-rgb"] == res["default"]["psnr-rgb"]


def test_diffc_points_follow_the_channel_aware_choice(tmp_path):
    """diffc curves reconstruct as decompress does (channel-aware by default) and keep the two choices
    apart in the cache; records of the received latent keep their old config."""
    from conftest import make_tiny
    from diffcodec.models import save_model

    path = tmp_path / "tiny-diffc.safetensors"
    save_model(make_tiny("diffc", 0, num_steps=3, c_max=8), path)
    img = synthetic_image(16, 16, seed=6)
    aware = ProgressiveAdapter("diffc", str(path), ("denoise",), steps=[2])
    raw = ProgressiveAdapter("diffc", str(path), ("denoise",), steps=[2], channel_aware=False)
    assert aware.config == raw.config + ":channel-aware"
    assert ProgressiveAdapter("diffc", str(path)).channel_aware
    for ad, flag in ((aware, True), (raw, False)):
        (group, pts), = ad.groups()
        (p,) = ad.run(img, group, pts)
        ref = diffcodec.compress(img, model=str(path), steps=2)
        assert np.array_equal(p.decoded, diffcodec.decompress(ref.data, model=str(path), channel_aware=flag))
