"""Helpers of the benchmark scripts (the scripts themselves need the bundled models and Kodak)."""

from conftest import load_repo_module


def _load(name: str):
    return load_repo_module("benchmarks", name)


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


def test_diffc_gap_by_nfe_matches_decompress(tmp_path):
    """Part C's real-file PSNRs are those of the files a user decodes with that nfe."""
    import numpy as np

    import diffcodec
    from conftest import make_tiny
    from diffcodec.metrics import psnr
    from diffcodec.models import load_model, save_model

    bench = _load("diffc_kodak")
    save_model(make_tiny("diffc", num_steps=4, c_max=8), tmp_path / "tiny-diffc.safetensors")
    model = load_model(str(tmp_path / "tiny-diffc.safetensors"))
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = bench.part_c(model, [("a", img)], points=[2], nfes=[1, 3])
    assert out["nfe"] == [1, 3] and set(out) == {"nfe", "points", "real", "ideal"}
    data = diffcodec.compress(img, model=model, steps=model.num_steps).data
    row = out["real"][2]
    for n in (1, 3):
        for method in ("flow", "ancestral"):
            y = diffcodec.decompress(data, model=model, steps=2, method=method, nfe=n)
            assert row[method][n] == psnr(img, y)
        assert row["flow_minus_ancestral_db"][n] == row["flow"][n] - row["ancestral"][n]
    assert row["denoise"] == psnr(img, diffcodec.decompress(data, model=model, steps=2))
    assert out["ideal"][2]["flow"][1] != row["flow"][1]  # exact samples, not the file's


def test_diffc_efficiency_part_reports_the_decoders_estimate(tmp_path):
    """Part D: per coded step, the estimate is the decoder's own value and the encoder's actual
    efficiency is a projection ratio of the real sample (finite, below ~1)."""
    import numpy as np

    import diffcodec
    from conftest import make_tiny
    from diffcodec.models import load_model, save_model

    bench = _load("diffc_kodak")
    save_model(make_tiny("diffc", num_steps=4, c_max=8), tmp_path / "tiny-diffc.safetensors")
    model = load_model(str(tmp_path / "tiny-diffc.safetensors"))
    img = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    files = {"a": diffcodec.compress(img, model=model, steps=model.num_steps).data}
    out = bench.part_d(model, [("a", img)], files)
    assert out and set(out) <= {1, 2, 3, 4}
    for row in out.values():
        assert np.sqrt(0.5) - 1e-9 <= row["estimate"] <= 1.0
        assert 0.0 < row["actual"] < 1.3 and 0.0 < row["layout"] <= 1.0 and row["kl_bits"] > 0


def test_rvgc_rate_monotone_in_q_whatever_the_order_of_q():
    mono = _load("rvgc_kodak").rate_monotone_in_q
    assert mono([16, 8, 4], {"a": [0.1, 0.3, 0.5]}) and mono([4, 16, 8], {"a": [0.5, 0.1, 0.3]})
    assert not mono([16, 8, 4], {"a": [0.1, 0.3, 0.5], "b": [0.1, 0.3, 0.2]})
    assert not mono([4, 8], {"a": [0.3, 0.3]})


def test_rvgc_ceiling_decodes_the_exact_latent_of_any_size():
    """The ceiling is g_s(g_a(x)) at the clean level, on edge-padded images cropped back to their size."""
    import numpy as np

    from conftest import make_tiny, synthetic_image
    from diffcodec.metrics import psnr

    bench = _load("rvgc_ceiling")
    m = make_tiny("rvgc", 0)._f64()
    images = {"a": synthetic_image(20, 36, seed=1), "b": synthetic_image(40, 24, seed=2)}
    row = bench.ceiling(m, images)
    assert row["swd_resolutions"] == [20] and len(row["swd_per_level"]) == 1

    def decoded(im):
        h, w = im.shape[:2]
        pad = np.pad(im, ((0, -h % 16), (0, -w % 16), (0, 0)), mode="edge")
        return m.synthesize(m.analyse(pad.transpose(2, 0, 1)), m.clean_level)[0].transpose(1, 2, 0)[:h, :w]

    expect = np.mean([psnr(im, decoded(im)) for im in images.values()])
    assert abs(row["psnr"] - expect) < 1e-9


def test_uqdm_bench_runs_a_model_at_another_step_count(tmp_path):
    """--num-steps: real files on another grid, decodable only by the model run the same way;
    the original model object is untouched."""
    import numpy as np
    import pytest

    import diffcodec
    from conftest import make_tiny_uqdm
    from diffcodec.errors import DiffcodecError
    from diffcodec.models import load_model, save_model

    bench = _load("uqdm_kodak")
    save_model(make_tiny_uqdm(), tmp_path / "tiny-uqdm.safetensors")
    model = load_model(str(tmp_path / "tiny-uqdm.safetensors"))
    T = model.num_steps
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    other = bench.with_num_steps(model, 2 * T)
    assert other.num_steps == 2 * T and model.num_steps == T and bench.with_num_steps(model, T) is model
    summary, per = bench.summarise(other, [("a", img)], scale=1)
    assert summary["num_steps"] == 2 * T and len(summary["steps"]) == 2 * T and summary["lossless_all_exact"]
    bpp = [s["bpp"] for s in summary["steps"]]
    assert bpp == sorted(bpp) and per["a"]["lossless_ok"]
    quick, _ = bench.summarise(model, [("a", img)], scale=1, methods=("denoise",))  # one reconstruction only
    assert set(quick["steps"][0]) == {"step", "bpp", "denoise"}
    lossless, per_lossless = bench.summarise(model, [("a", img)], scale=1, methods=())  # --lossless-only
    assert lossless["steps"] == [] and lossless["lossless_all_exact"]
    assert lossless["lossless_bpd"] == quick["lossless_bpd"]  # the same files
    assert per_lossless["a"]["steps"] == [] and per_lossless["a"]["lossless_ok"]
    data = diffcodec.compress(img, model=other, steps=2 * T).data
    with pytest.raises(DiffcodecError):
        diffcodec.decompress(data, model=model)
    for codec in ("jpeg", "webp"):  # the anchors of its BD-rates
        curve = bench.baseline_curve([("a", img)], codec)
        bpp = curve["results"]["bpp"]
        assert curve["name"] == codec and len(bpp) == len(curve["results"]["quality"]) and bpp == sorted(bpp)


def test_noise_basis_costs_favour_a_compacting_basis():
    """uqdm_noise_basis: a residual that is one smooth luminance image costs fewer bits in the opponent
    DCT basis than per RGB sub-pixel; a box centred on the prior with a narrow scale costs ~0 bits."""
    import torch

    bench = _load("uqdm_noise_basis")
    tiny = torch.full((4,), 1e-4, dtype=torch.float64)
    assert float(bench.step_cost(torch.zeros(4, dtype=torch.float64), tiny, 1.0).max()) < 1e-3
    g = torch.Generator().manual_seed(0)
    lum = torch.nn.functional.interpolate(torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64), size=(16, 16),
                                          mode="bilinear", align_corners=False)
    r = 0.05 * lum.repeat(1, 3, 1, 1)
    s = torch.full((2 * 16 * 16 // 16,), 0.02, dtype=torch.float64)
    rgb = bench.fitted_cost(bench.fixed_matrix("rgb", 4) @ bench.blocks(r, 4), s, 1.0)
    dct = bench.fitted_cost(bench.fixed_matrix("opponent", 4) @ bench.blocks(r, 4), s, 1.0)
    assert dct < 0.7 * rgb
    b = bench.blocks(torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4), 2)
    assert b.shape == (12, 8) and b[:, 0].tolist()[:4] == [0.0, 1.0, 4.0, 5.0]


def test_fit_scale_offsets_lowers_the_expected_bits():
    """scripts/fit_scale_offsets.py: on a tiny model the fitted offsets never cost more bits than none
    (0 is a candidate) and the fitted model codes losslessly."""
    import numpy as np
    import torch

    import diffcodec
    from conftest import make_tiny, synthetic_image

    mod = load_repo_module("scripts", "fit_scale_offsets")
    model = make_tiny("uqdm", noise_basis="opponent-dct4", scale_offsets=True).double().eval()
    x = torch.from_numpy(np.stack([synthetic_image(16, 16, seed=i) for i in range(2)])).permute(0, 3, 1, 2)
    offsets, report = mod.fit(model, x.double() * (2 / 256) + (1 / 256 - 1))
    assert offsets.shape == model.scale_offset.shape and len(report) == model.num_steps
    assert all(r["bits_per_pixel_after"] <= r["bits_per_pixel_before"] + 1e-12 for r in report)
    with torch.no_grad():
        model.scale_offset.copy_(offsets)
    model.model_id, model.model_hash = "tiny", "0123456789abcdef"
    img = synthetic_image(16, 20, seed=5)
    assert np.array_equal(diffcodec.decompress(diffcodec.compress(img, model=model, lossless=True).data,
                                               model=model), img)
