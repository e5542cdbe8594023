"""The models shipped in the package and the quick-start demo."""

import json

import numpy as np
from PIL import Image

import diffcodec
from conftest import synthetic_image
from diffcodec.cli import main
from diffcodec.demo import run_demo, sample_image_path
from diffcodec.imageio import read_image
from diffcodec.models import DEFAULT_MODELS, bundled_models


def test_default_models_are_bundled_with_cards(capsys):
    models = bundled_models()
    for codec, name in DEFAULT_MODELS.items():
        assert name in models, f"default {codec} model {name} is not bundled"
        assert models[name].stat().st_size < 25e6
        assert models[name].with_suffix(".md").exists(), "model card missing"
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    for codec, name in DEFAULT_MODELS.items():
        m = listed[name]
        assert m["codec"] == codec and m["default"] and m["iterations"] > 0 and "kodak" in m
        if codec == "rvgc":
            lo, hi = m["q_range"]
            assert lo <= m["default_q"] <= hi
        else:
            assert m["steps"] >= 1 and m["default_steps"] >= 1


def test_default_model_round_trip():
    img = synthetic_image(20, 24)
    res = diffcodec.compress(img, lossless=True)  # no model given: the bundled default
    assert res.model == DEFAULT_MODELS["uqdm"]
    assert np.array_equal(diffcodec.decompress(res.data), img)


def test_default_rvgc_model_round_trip():
    img = synthetic_image(40, 48)
    res = diffcodec.compress(img, codec="rvgc")
    assert res.model == DEFAULT_MODELS["rvgc"] and res.q is not None
    for kw in ({}, {"deterministic": True}):
        out = diffcodec.decompress(res.data, **kw)
        assert out.shape == img.shape


def test_demo_runs_on_an_image(tmp_path):
    small = tmp_path / "s.png"
    Image.fromarray(synthetic_image(24, 32)).save(small)
    lines = []
    rows = run_demo(image=str(small), echo=lines.append, methods=("denoise",))
    assert rows[-1]["lossless"] == float("inf") and "bit-exactly: yes" in lines[-1]
    assert [r["bytes"] for r in rows] == sorted(r["bytes"] for r in rows)


def test_bundled_sample_image_readable():
    img = read_image(sample_image_path())
    assert img.shape == (192, 256, 3)
