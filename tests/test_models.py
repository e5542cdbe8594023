"""Model lookup: bundled models, $DIFFCODEC_MODEL_PATH, retired models and their error messages."""

import json
import os
import shutil

import numpy as np
import pytest

import diffcodec
from conftest import load_repo_module, make_image_folder, make_tiny, synthetic_image
from diffcodec.cli import main
from diffcodec.errors import ModelError
from diffcodec.models import (
    DEFAULT_MODELS,
    MODEL_PATH_ENV,
    RETIRED_MODELS,
    bundled_models,
    find_model,
    load_model,
    path_models,
    resolve,
    save_model,
)


@pytest.fixture
def model_dir(tmp_path, tiny_model_path, monkeypatch):
    """A directory on the model path holding the tiny model, plus a missing directory before it."""
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(tiny_model_path, d / "path-uqdm.safetensors")
    monkeypatch.setenv(MODEL_PATH_ENV, os.pathsep.join([str(tmp_path / "absent"), str(d)]))
    return d


def test_a_model_on_the_path_is_found_by_name_and_decodes_its_files(model_dir, tmp_path):
    assert find_model("path-uqdm") == model_dir / "path-uqdm.safetensors"
    assert resolve("path-uqdm") == ("path-uqdm", model_dir / "path-uqdm.safetensors")
    assert "path-uqdm" in path_models()
    img = synthetic_image(12, 16)
    res = diffcodec.compress(img, model="path-uqdm", lossless=True)
    assert res.model == "path-uqdm"
    assert np.array_equal(diffcodec.decompress(res.data), img)  # the file's name is looked up on the path


def test_bundled_names_cannot_be_shadowed(model_dir, tiny_model_path):
    name = DEFAULT_MODELS["uqdm"]
    shutil.copy(tiny_model_path, model_dir / f"{name}.safetensors")
    assert find_model(name) == bundled_models()[name]
    assert name not in path_models()


def test_only_plain_names_are_looked_up(model_dir):
    for name in ("", ".", "..", "../models/path-uqdm", "models/path-uqdm", str(model_dir / "path-uqdm")):
        assert find_model(name) is None


def test_missing_model_error_names_the_variable(model_dir, monkeypatch):
    img = synthetic_image(8, 8)
    data = diffcodec.compress(img, model="path-uqdm", steps=1).data
    monkeypatch.delenv(MODEL_PATH_ENV)
    with pytest.raises(ModelError, match=r"'path-uqdm' \(hash [0-9a-f]{16}\).*DIFFCODEC_MODEL_PATH"):
        diffcodec.decompress(data)
    # --model PATH still works without the variable
    assert diffcodec.decompress(data, model=str(model_dir / "path-uqdm.safetensors")).shape == img.shape


def test_retired_model_error_says_how_to_get_it(tmp_path, tiny_model_path, monkeypatch):
    """A file whose model was retired (name and hash of RETIRED_MODELS) points at the archive script."""
    from diffcodec import container

    monkeypatch.delenv(MODEL_PATH_ENV, raising=False)
    name, model_hash = next(iter(RETIRED_MODELS.items()))
    data = diffcodec.compress(synthetic_image(8, 8), model=str(tiny_model_path), steps=1).data
    cont = container.unpack(data)
    cont.header.model_id, cont.header.model_hash = name, model_hash
    with pytest.raises(ModelError, match=f"retired.*archived_model.py {name}"):
        diffcodec.decompress(container.pack(cont.header, cont.sections))


def test_models_lists_path_models(model_dir, capsys):
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["path-uqdm"]["bundled"] is False and listed["path-uqdm"]["codec"] == "uqdm"
    assert all(listed[n]["bundled"] for n in bundled_models())
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("+ path-uqdm") for line in out.splitlines())


def test_bundled_weights_stay_within_budget():
    """The package ships only current models (a wheel on PyPI is capped at 100 MB by default);
    superseded ones are retired (RETIRED_MODELS).  Retirement goes in batches (each removal is
    submitted as a diff); the package now fits under that cap."""
    total = sum(p.stat().st_size for p in bundled_models().values())
    assert total < 100e6, f"bundled weights {total / 1e6:.1f} MB: retire superseded models"


def test_a_retired_name_says_how_to_get_it(monkeypatch):
    monkeypatch.delenv(MODEL_PATH_ENV, raising=False)
    name = next(iter(RETIRED_MODELS))
    with pytest.raises(ModelError, match=f"retired.*archived_model.py {name}"):
        resolve(name)


def test_export_defaults_changes_decoder_defaults_not_the_weights(tmp_path, monkeypatch):
    """scripts/export_model.py defaults: a bundled rvgc model's decoder defaults change in its file's
    config; its tensors, hence its hash and every file made with it, stay the same."""
    exporter = load_repo_module("scripts", "export_model")
    monkeypatch.setattr(exporter, "WEIGHTS", tmp_path)
    m = make_tiny("rvgc", 0)
    m.sampler_max_q = 3.0
    h = save_model(m, tmp_path / "r.safetensors")
    exporter.set_defaults("r", "4000:6,2000:5")
    again = load_model(str(tmp_path / "r.safetensors"))
    assert again.model_hash == h and again.sampler_max_q == 3.0
    assert again.sampler_max_q_by_pixels == ((2000, 5.0), (4000, 6.0))
    exporter.set_defaults("r", summary="rvgc model for tests")
    assert exporter.read_metadata(tmp_path / "r.safetensors")["card"]["summary"] == "rvgc model for tests"
    assert load_model(str(tmp_path / "r.safetensors")).model_hash == h
    m.sampler_max_q = None  # nothing for the pixel rule to refine
    save_model(m, tmp_path / "s.safetensors")
    with pytest.raises(SystemExit, match="sampler_max_q"):
        exporter.set_defaults("s", "2000:5")


def test_val_bpd_script_reports_the_trainers_validation_number(tmp_path, capsys):
    """scripts/val_bpd.py evaluates a model on the crops a run of that crop size validates on."""
    from diffcodec.data import validation_batch
    from diffcodec.train import evaluate_bpd

    script = load_repo_module("scripts", "val_bpd")
    data = make_image_folder(tmp_path, size=24, n=3)
    path = tmp_path / "u.safetensors"
    save_model(make_tiny("uqdm", 0), path)
    script.main([str(path), "--data", str(data), "--crop", "16", "--n", "2", "--threads", "1"])
    got = json.loads(capsys.readouterr().out.splitlines()[-1])["val_bpd"][str(path)]
    assert got == evaluate_bpd(load_model(str(path)).float(), validation_batch(data, 16, 2)) > 0
    # --keep default --bf16: kept-share files' code length, the network under bf16 autocast (a CPU run's log)
    script.main([str(path), "--data", str(data), "--crop", "16", "--n", "2", "--threads", "1", "--keep", "default",
                 "--bf16"])
    kept = json.loads(capsys.readouterr().out.splitlines()[-1])["val_bpd"][str(path)]
    model = load_model(str(path)).float()
    model.autocast_bf16 = True
    shares = model.check_keep([round(255 * f) for f in model.default_keep()])
    assert kept == evaluate_bpd(model, validation_batch(data, 16, 2), keep=shares) != got
