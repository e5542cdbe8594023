"""Training crops: the legacy random stream, scale augmentation (``zoom``, ``zoom_min``), the held-out split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import diffcodec
from diffcodec import container
from diffcodec.cli import main
from diffcodec.data import CropSampler, list_images, split_files


@pytest.fixture
def noise_folder(tmp_path):
    """Two pixel-noise images: every neighbouring pair differs, so smoothing is easy to see."""
    rng = np.random.default_rng(3)
    d = tmp_path / "noise"
    d.mkdir()
    for i, (h, w) in enumerate([(64, 80), (72, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def _legacy_batch(images, weights, rng, n, c):
    """The crop stream of earlier versions (no zoom), written out independently."""
    out = []
    for i in rng.choice(len(images), size=n, p=weights):
        im = images[i]
        y = rng.integers(0, im.shape[1] - c + 1)
        x = rng.integers(0, im.shape[2] - c + 1)
        patch = im[:, y : y + c, x : x + c]
        out.append(patch[:, :, ::-1] if rng.random() < 0.5 else patch)
    return np.stack(out)


def _to_pixels(batch) -> np.ndarray:
    return (batch.numpy() + 1.0) * 128.0 - 0.5


def test_zoom_one_keeps_the_legacy_stream(noise_folder):
    s = CropSampler(list_images(noise_folder), 16, seed=5)
    ref = _legacy_batch(s.images, s.weights, np.random.default_rng(5), 6, 16)
    got = _to_pixels(s.batch(6))
    assert np.array_equal(got, ref.astype(np.float64))


def test_zoom_upsamples_onto_the_pixel_grid(noise_folder):
    plain = _to_pixels(CropSampler(list_images(noise_folder), 16, seed=1).batch(32))
    zoomed = _to_pixels(CropSampler(list_images(noise_folder), 16, seed=1, zoom=4.0).batch(32))
    assert zoomed.shape == plain.shape == (32, 3, 16, 16)
    assert np.array_equal(zoomed, np.round(zoomed)) and zoomed.min() >= 0 and zoomed.max() <= 255

    def roughness(b):
        return float(np.abs(np.diff(b, axis=-1)).mean())

    # noise has no correlation between neighbours; upsampled crops (mean factor 2) have a lot
    assert roughness(zoomed) < 0.75 * roughness(plain)
    # zoom is a range, not one factor: crops come out with very different smoothness
    per_crop = np.abs(np.diff(zoomed, axis=-1)).mean(axis=(1, 2, 3))
    assert per_crop.max() > 2.0 * per_crop.min()


def test_zoom_min_shrinks_larger_cuts_onto_the_pixel_grid(tmp_path):
    """zoom_min < 1: crops cut up to crop / zoom_min (clamped to the photo) and shrunk, antialiased: a
    smooth photo gets more detail per pixel, and an antialiased shrink of a flat image stays flat."""
    d = tmp_path / "smooth"
    d.mkdir()
    yy, xx = np.mgrid[0:48, 0:56]
    wave = 127.5 + 120 * np.sin(xx / 5.0)[..., None] * np.cos(yy / 7.0)[..., None] * np.ones(3)
    Image.fromarray(wave.round().astype(np.uint8)).save(d / "wave.png")
    Image.fromarray(np.full((40, 40, 3), 77, np.uint8)).save(d / "flat.png")
    files = list_images(d)
    plain = _to_pixels(CropSampler(files, 16, seed=2).batch(64))
    shrunk = _to_pixels(CropSampler(files, 16, seed=2, zoom_min=0.125).batch(64))  # cuts up to 128 -> 40/48
    assert shrunk.shape == plain.shape == (64, 3, 16, 16)
    assert np.array_equal(shrunk, np.round(shrunk)) and shrunk.min() >= 0 and shrunk.max() <= 255
    flat = shrunk.reshape(64, -1).std(1) == 0
    assert flat.any() and np.all(shrunk[flat] == 77)  # crops of the flat image

    def roughness(b):
        return float(np.abs(np.diff(b, axis=-1)).mean())

    assert roughness(shrunk[~flat]) > 1.5 * roughness(plain[plain.reshape(64, -1).std(1) > 0])


@pytest.mark.parametrize("kw", [{"zoom": 0.5}, {"zoom": 9.0}, {"zoom": float("nan")}, {"zoom_min": 0.1},
                                {"zoom_min": 1.5}, {"zoom_min": float("nan")}])
def test_zoom_out_of_range_is_refused(noise_folder, kw):
    with pytest.raises(ValueError, match="zoom"):
        CropSampler(list_images(noise_folder), 16, **kw)


def test_held_out_split_is_disjoint(tmp_path):
    files = [tmp_path / f"{i:03d}.png" for i in range(45)]
    train, val = split_files(files)
    assert [f.name for f in val] == ["010.png", "030.png"]
    assert not set(train) & set(val) and len(train) + len(val) == 45


def test_train_command_records_zoom(tmp_path, image_folder, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(image_folder), "--out", str(out), "--preset", "tiny", "--batch", "2",
                 "--crop", "16", "--zoom", "2", "--zoom-min", "0.5", "--iters", "2", "--val-batch", "2", "-q"]) == 0
    ck = __import__("torch").load(out / "checkpoint.pt", weights_only=False)
    assert ck["config"]["zoom"] == 2.0 and ck["config"]["zoom_min"] == 0.5
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    assert main(["train", "--data", str(image_folder), "--out", str(tmp_path / "bad"), "--preset", "tiny",
                 "--crop", "16", "--zoom", "20", "--iters", "1", "-q"]) == 1


def test_init_fine_tunes_from_a_trained_model(tmp_path, image_folder):
    """--init starts at step 0 from another run's weights and architecture (not --preset's), the card
    says where from, and --resume of the fine-tuning run keeps that architecture."""
    import torch

    from diffcodec.data import validation_batch
    from diffcodec.models import load_model
    from diffcodec.train import evaluate_bpd

    base = ["train", "--data", str(image_folder), "--crop", "16", "--batch", "2", "--val-batch", "2", "-q"]
    src = tmp_path / "src"
    assert main([*base, "--out", str(src), "--preset", "tiny", "--iters", "2"]) == 0
    ft = tmp_path / "ft"
    # --preset small is ignored: the architecture comes from the init model
    args = [*base, "--out", str(ft), "--preset", "small", "--init", str(src / "model.safetensors"), "--zoom", "1.5"]
    before = load_model(str(src / "model.safetensors"))
    assert main([*args, "--iters", "1", "--lr", "0"]) == 0
    after = load_model(str(ft / "model.safetensors"))
    assert after.config_dict() == before.config_dict()
    for k, v in before.state_dict().items():  # lr 0: the EMA of unchanged weights is the init
        assert torch.equal(after.state_dict()[k].float(), v.float()), k
    assert after.card["init"] == {"model": str(src / "model.safetensors"), "model_hash": before.model_hash}
    assert main([*args, "--iters", "3", "--resume"]) == 0
    resumed = load_model(str(ft / "model.safetensors"))
    assert resumed.config_dict() == before.config_dict() and resumed.card["step"] == 3
    assert resumed.card["init"]["model_hash"] == before.model_hash
    # --num-steps with --init fine-tunes to another step count, --train-steps on several grids
    t8 = tmp_path / "t8"
    assert main([*base, "--out", str(t8), "--init", str(src / "model.safetensors"), "--num-steps", "8",
                 "--train-steps", "6,8,12", "--iters", "2"]) == 0
    moved = load_model(str(t8 / "model.safetensors"))
    assert moved.num_steps == 8 and before.num_steps != 8
    assert {k: v for k, v in moved.config_dict().items() if k != "num_steps"} == \
        {k: v for k, v in before.config_dict().items() if k != "num_steps"}
    ck = torch.load(t8 / "checkpoint.pt", weights_only=False)
    assert ck["config"]["train_steps"] == "6,8,12" and ck["model_config"]["num_steps"] == 8
    # --step-weights: the loss weights each step; the log keeps the code length and the weighted loss
    sw = tmp_path / "sw"
    assert main([*base, "--out", str(sw), "--init", str(src / "model.safetensors"), "--step-weights",
                 ",".join(["1"] * (before.num_steps - 1) + ["0"]), "--iters", "2"]) == 0
    recs = [json.loads(line) for line in (sw / "log.jsonl").read_text().splitlines()]
    assert all("loss" in r and r["loss"] != r["bpd"] for r in recs)
    # --keep-chain: the chain and code length of kept-share files; validation is their code length
    kc = tmp_path / "kc"
    assert main([*base, "--out", str(kc), "--init", str(src / "model.safetensors"), "--keep-chain", "default",
                 "--iters", "2", "--val-every", "1"]) == 0
    recs = [json.loads(line) for line in (kc / "log.jsonl").read_text().splitlines()]
    val = validation_batch(str(image_folder), 16, 2)
    kept = load_model(str(kc / "model.safetensors")).float()
    kept.autocast_bf16 = True  # as the trainer's EMA model validates
    assert recs[-1]["val_bpd"] == pytest.approx(evaluate_bpd(kept, val, keep=kept.check_keep(
        [round(255 * f) for f in kept.default_keep()])), rel=1e-5)
    assert recs[-1]["val_bpd"] != pytest.approx(evaluate_bpd(kept, val), rel=1e-5)
    assert torch.load(kc / "checkpoint.pt", weights_only=False)["config"]["keep_chain"] == "default"
    for bad in (["--train-steps", "6,x"], ["--train-steps", "0"], ["--codec", "diffc", "--train-steps", "8"],
                ["--step-weights", "1,1"], ["--step-weights", "1,x,1,1"], ["--step-weights", "0,0,0,0"],
                ["--step-weights", "1,1,1,1", "--train-steps", "4,8"], ["--codec", "diffc", "--step-weights", "1"],
                ["--keep-chain", "x"], ["--keep-chain", "0.1,0.2"], ["--keep-chain", "0"],
                ["--keep-chain", "default", "--train-steps", "4,8"], ["--codec", "diffc", "--keep-chain", "default"]):
        assert main([*base, "--out", str(tmp_path / "bad"), "--preset", "tiny", "--iters", "1", *bad]) == 1
    # --mid-blocks grows the network at its coarsest level: with lr 0 the grown model codes like the init
    mb = tmp_path / "mb"
    grow = [*base, "--out", str(mb), "--init", str(src / "model.safetensors"), "--mid-blocks", "3", "--lr", "0"]
    assert main([*grow, "--iters", "1"]) == 0
    grown = load_model(str(mb / "model.safetensors"))
    assert grown.config_dict()["unet"]["mid_blocks"] == 3 and before.config_dict()["unet"].get("mid_blocks", 2) == 2
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    files = [diffcodec.compress(img, model=m, steps=2).data for m in (grown, before)]
    assert [s.payload for s in container.unpack(files[0]).sections] == \
        [s.payload for s in container.unpack(files[1]).sections]
    assert np.array_equal(diffcodec.decompress(files[0], model=grown), diffcodec.decompress(files[1], model=before))
    assert main([*grow, "--iters", "2", "--resume"]) == 0
    for bad in (["--init", str(mb / "model.safetensors"), "--mid-blocks", "2"],  # cannot shrink
                ["--codec", "rvgc", "--mid-blocks", "3"]):
        assert main([*base, "--out", str(tmp_path / "bad2"), "--preset", "tiny", "--iters", "1", *bad]) == 1
    assert main([*base, "--out", str(mb), "--init", str(src / "model.safetensors"), "--mid-blocks", "4",
                 "--iters", "3", "--resume"]) == 1  # the resumed run has 3
    # a model of another codec is refused with a clear error
    code = main(["train", "--codec", "rvgc", *base[1:], "--out", str(tmp_path / "x"),
                 "--init", str(src / "model.safetensors"), "--iters", "1"])
    assert code == 1


def test_init_with_scale_offsets_at_another_step_count(tmp_path, image_folder):
    """--init of a uqdm model with fitted scale offsets and --num-steps keeps the offsets on the grid
    they were fitted on (this crashed with an IndexError before)."""
    import torch

    from conftest import make_tiny
    from diffcodec.models import load_model, save_model

    src = make_tiny("uqdm", seed=1, noise_basis="opponent-dct4", scale_offsets=True)
    with torch.no_grad():
        src.scale_offset.uniform_(-0.5, 0.5)
    save_model(src, tmp_path / "src.safetensors")
    out = tmp_path / "t8"
    assert main(["train", "--data", str(image_folder), "--crop", "16", "--batch", "2", "--val-batch", "2", "-q",
                 "--out", str(out), "--init", str(tmp_path / "src.safetensors"), "--num-steps", "8",
                 "--iters", "1", "--lr", "0"]) == 0
    moved = load_model(str(out / "model.safetensors"))
    assert moved.num_steps == 8 and moved.config_dict()["scale_offset_steps"] == src.num_steps
    assert torch.equal(moved.scale_offset.float(), src.scale_offset.float())


def test_init_with_a_context_at_another_step_count_and_basis(tmp_path, image_folder):
    """--init of a uqdm model with a fitted context: --num-steps keeps the context's grid; another
    --noise-basis drops the offsets and context (fitted to the old coordinates)."""
    import torch

    from conftest import make_tiny
    from diffcodec.models import load_model, save_model

    src = make_tiny("uqdm", seed=1, noise_basis="opponent-dct4", scale_offsets=True, context="checkerboard")
    with torch.no_grad():
        src.context_weight.uniform_(-0.1, 0.1)
    save_model(src, tmp_path / "src.safetensors")
    base = ["train", "--data", str(image_folder), "--crop", "16", "--batch", "2", "--val-batch", "2", "-q",
            "--init", str(tmp_path / "src.safetensors"), "--iters", "1", "--lr", "0"]
    assert main([*base, "--out", str(tmp_path / "t8"), "--num-steps", "8"]) == 0
    moved = load_model(str(tmp_path / "t8" / "model.safetensors"))
    assert moved.num_steps == 8 and moved.config_dict()["context_steps"] == src.num_steps
    assert torch.equal(moved.context_weight.float(), src.context_weight.float())
    assert main([*base, "--out", str(tmp_path / "rgb"), "--noise-basis", "rgb"]) == 0
    rgb = load_model(str(tmp_path / "rgb" / "model.safetensors"))
    assert rgb.noise_basis == "rgb" and not rgb.context and not rgb.scale_offsets
