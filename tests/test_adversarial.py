"""Decoder fine-tuning (``diffcodec train --decoder-only`` / ``--gan-weight``) and its GAN losses."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from conftest import launcher_errors, make_image_folder, synthetic_image
from diffcodec.adversarial import PatchDiscriminator, disc_loss, gen_loss
from diffcodec.cli import main
from diffcodec.models import load_model


def test_discriminator_shapes_and_loss_signs():
    d = PatchDiscriminator(3, 8, width=4)
    x, y = torch.randn(2, 3, 32, 48), torch.randn(2, 8, 2, 3)
    assert d(x, y).shape == (2, 1, 4, 6)
    loss, real, fake = disc_loss(d, x, x + 1, y)
    assert loss.shape == (2,) and real.shape == () and fake.shape == ()
    assert gen_loss(d, x, y).shape == (2,)
    # the hinge loss is 0 when real logits are >= 1 and fake logits <= -1, and 2 when all logits are 0
    def confident(a, b):  # real first, then fake (disc_loss's batch order)
        return torch.where(torch.arange(a.shape[0]) < 2, 2.0, -2.0).view(-1, 1, 1, 1)

    assert torch.equal(disc_loss(confident, x, x, y)[0], torch.zeros(2))
    assert torch.equal(disc_loss(lambda a, b: torch.zeros(a.shape[0], 1, 3, 3), x, x, y)[0], torch.full((2,), 2.0))


def test_discriminator_learns_to_tell_smooth_from_noisy():
    """The losses drive learning: a few steps separate flat 'real' images from noisy 'fakes'."""
    torch.manual_seed(0)
    d = PatchDiscriminator(3, 4, width=8)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.5, 0.999))
    y = torch.zeros(4, 4, 2, 2)
    real = torch.rand(4, 3, 1, 1).expand(4, 3, 32, 32)
    first = None
    for _ in range(40):
        fake = real + 0.5 * torch.randn(4, 3, 32, 32)
        loss = disc_loss(d, real, fake, y)[0].mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 1.5 and float(loss.detach()) < 0.5
    assert float(gen_loss(d, real + 0.5 * torch.randn(4, 3, 32, 32), y).detach().mean()) > 1.0  # fakes are caught


def _train(*args) -> int:
    return main(["train", "--codec", "rvgc", "--batch", "2", "--crop", "32", "--val-batch", "2", "-q", *args])


def test_fine_tuning_changes_only_the_decoder_and_keeps_files(tmp_path):
    """--gan-weight trains g_s alone: every other weight is kept exactly, so the fine-tuned model writes
    the same bits as its init model; the discriminator is checkpointed and --resume continues the run."""
    from diffcodec.codecs.rvgc import RVGC

    data = make_image_folder(tmp_path, size=40)
    src, ft = tmp_path / "src", tmp_path / "ft"
    assert _train("--data", str(data), "--out", str(src), "--preset", "tiny", "--iters", "2") == 0
    args = ["--data", str(data), "--out", str(ft), "--init", str(src / "model.safetensors"), "--gan-weight", "1",
            "--lr", "1e-2", "--warmup", "1", "--ckpt-every", "2"]
    assert _train(*args, "--iters", "3") == 0
    a, b = load_model(str(src / "model.safetensors")), load_model(str(ft / "model.safetensors"))
    changed = {k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])}
    assert changed and all(k.startswith("g_s.") for k in changed), changed
    assert b.card["train"]["gan_weight"] == 1.0
    img = synthetic_image(32, 48)
    ya, yb = a.analyse(img.transpose(2, 0, 1)), b.analyse(img.transpose(2, 0, 1))
    sa, ha = RVGC.encode_latent(a, ya, 2.0)
    sb, hb = RVGC.encode_latent(b, yb, 2.0)
    assert [s.payload for s in sa] == [s.payload for s in sb] and np.array_equal(ha, hb)
    assert not np.array_equal(a.synthesize(ha, 2.0), b.synthesize(hb, 2.0))
    ck = torch.load(ft / "checkpoint.pt", weights_only=False)
    assert {"disc", "opt_disc"} <= set(ck)
    assert _train(*args, "--iters", "5", "--resume") == 0
    log = [json.loads(line) for line in (ft / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["d_loss"]) and np.isfinite(r["g_adv"]) for r in log)


def test_decoder_only_fine_tuning_without_a_discriminator(tmp_path):
    data = make_image_folder(tmp_path, size=40)
    src, ft = tmp_path / "src", tmp_path / "ft"
    assert _train("--data", str(data), "--out", str(src), "--preset", "tiny", "--iters", "2") == 0
    assert _train("--data", str(data), "--out", str(ft), "--init", str(src / "model.safetensors"), "--decoder-only",
                  "--lr", "1e-2", "--warmup", "1", "--iters", "2") == 0
    a, b = load_model(str(src / "model.safetensors")), load_model(str(ft / "model.safetensors"))
    changed = {k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])}
    assert changed and all(k.startswith("g_s.") for k in changed), changed
    assert "disc" not in torch.load(ft / "checkpoint.pt", weights_only=False)
    rec = json.loads((ft / "log.jsonl").read_text().splitlines()[-1])
    assert "d_loss" not in rec and np.isfinite(rec["psnr_sampled"])


def test_gan_weight_needs_an_rvgc_model_to_start_from(tmp_path, capsys):
    data = make_image_folder(tmp_path, size=40)
    assert _train("--data", str(data), "--out", str(tmp_path / "a"), "--preset", "tiny", "--iters", "1",
                  "--gan-weight", "1") == 1
    assert "--init" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "u"), "--preset", "tiny", "--iters", "1",
                 "--batch", "2", "--crop", "16", "--val-batch", "2", "-q"]) == 0
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "b"), "--init",
                 str(tmp_path / "u" / "model.safetensors"), "--iters", "1", "--gan-weight", "1", "--batch", "2",
                 "--crop", "16", "--val-batch", "2", "-q"]) == 1
    assert "rvgc" in capsys.readouterr().err


def test_torchrun_adversarial_fine_tuning(tmp_path):
    """Decoder and discriminator both under DistributedDataParallel (2 processes, gloo)."""
    data = make_image_folder(tmp_path, size=40)
    src, out = tmp_path / "src", tmp_path / "run"
    assert _train("--data", str(data), "--out", str(src), "--preset", "tiny", "--iters", "1") == 0
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "diffcodec.cli", "--threads", "1", "train", "--codec", "rvgc", "--data", str(data),
                        "--out", str(out), "--init", str(src / "model.safetensors"), "--gan-weight", "1",
                        "--iters", "2", "--batch", "2", "--crop", "32", "--val-batch", "2", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, launcher_errors(p.stderr)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_decoder_fine_tuning_sees_the_latent_the_decoder_receives():
    """quantized_latent reproduces the coder's y_hat exactly (float64), unlike the training proxy y + q u."""
    from conftest import make_tiny

    m = make_tiny("rvgc", 0)._f64()
    y = m.analyse(synthetic_image(48, 64).transpose(2, 0, 1))
    for q in (0.7, 2.0, 9.0):
        _, y_hat = m.encode_latent(y, q)
        got = m.quantized_latent(torch.from_numpy(y), torch.tensor([q], dtype=torch.float64))
        assert np.array_equal(got.detach().numpy(), y_hat)
    with torch.no_grad():
        out = m.decoder_forward(torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1)
    assert out["x_hat"].shape == out["x_sampled"].shape == (2, 3, 32, 32) and out["loss"].shape == (2,)


def test_grown_decoder_starts_out_decoding_like_the_original(tmp_path):
    """``with_decoder`` (a wider g_s and a full-resolution head) keeps every other weight and, at the
    start, the decoder's function; the grown architecture saves and loads; decoders only grow."""
    import pytest

    from conftest import make_tiny
    from diffcodec.models import save_model

    m = make_tiny("rvgc", 0).float()
    w = m.with_decoder(16, 8)
    assert (w.N_s, w.refine, w.g_s.ups[1].weight.shape[:2]) == (16, 8, (16, 16))
    other = {k: v for k, v in m.state_dict().items() if not k.startswith("g_s.")}
    assert all(torch.equal(v, w.state_dict()[k]) for k, v in other.items())
    y = torch.randn(2, m.M, 3, 5)
    emb = m.embed(torch.log(torch.tensor([4.0, 0.7])))
    with torch.no_grad():
        ref, got = m.g_s(y, emb), w.g_s(y, emb)
    assert torch.allclose(got, ref, atol=1e-5)
    assert w.g_s.head_conv.weight.abs().sum() > 0  # the head's inner layers are random, only its output is zero
    save_model(w, tmp_path / "w.safetensors")
    back = load_model(str(tmp_path / "w.safetensors"))
    assert back.config_dict()["N_s"] == 16 and back.config_dict()["refine"] == 8
    assert "N_s" not in m.config_dict() and "refine" not in m.config_dict()  # old models' configs are unchanged
    with pytest.raises(ValueError):
        w.with_decoder(8, 8)


def test_decoder_growth_in_a_fine_tune_keeps_files(tmp_path, capsys):
    """``--decoder-width/--decoder-refine`` grow the --init model's g_s and train it alone: the coded
    sections equal the init model's, the decoder differs, and --resume continues the grown run."""
    from diffcodec.codecs.rvgc import RVGC

    data = make_image_folder(tmp_path, size=40)
    src, ft = tmp_path / "src", tmp_path / "ft"
    assert _train("--data", str(data), "--out", str(src), "--preset", "tiny", "--iters", "2") == 0
    args = ["--data", str(data), "--out", str(ft), "--init", str(src / "model.safetensors"), "--decoder-only",
            "--decoder-width", "16", "--decoder-refine", "8", "--lr", "1e-2", "--warmup", "1", "--ckpt-every", "2"]
    assert _train(*args, "--iters", "2") == 0
    a, b = load_model(str(src / "model.safetensors")), load_model(str(ft / "model.safetensors"))
    assert (b.N_s, b.refine) == (16, 8)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items() if not k.startswith("g_s."))
    img = synthetic_image(32, 48).transpose(2, 0, 1)
    sa, ha = RVGC.encode_latent(a, a.analyse(img), 2.0)
    sb, hb = RVGC.encode_latent(b, b.analyse(img), 2.0)
    assert [s.payload for s in sa] == [s.payload for s in sb] and np.array_equal(ha, hb)
    assert not np.array_equal(a.synthesize(ha, 2.0), b.synthesize(hb, 2.0))
    assert _train(*args, "--iters", "4", "--resume") == 0
    assert load_model(str(ft / "model.safetensors")).card["step"] == 4
    capsys.readouterr()
    assert _train("--data", str(data), "--out", str(tmp_path / "x"), "--init", str(src / "model.safetensors"),
                  "--decoder-width", "16", "--iters", "1") == 1
    assert "--decoder-only" in capsys.readouterr().err
    assert _train("--data", str(data), "--out", str(tmp_path / "y"), "--preset", "tiny", "--decoder-only",
                  "--decoder-refine", "8", "--iters", "1") == 1  # nothing to grow from: not silently ignored
    assert "--init" in capsys.readouterr().err
    assert _train(*args, "--decoder-width", "24", "--iters", "5", "--resume") == 1  # not the run's decoder
    assert "resume with the options" in capsys.readouterr().err
