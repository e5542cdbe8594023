"""The detail-energy loss (texture.py) and decoder fine-tuning with it (``train --detail-weight``)."""

from __future__ import annotations

import json

import numpy as np
import torch

from conftest import make_image_folder, synthetic_image
from diffcodec.cli import main
from diffcodec.models import load_model
from diffcodec.texture import _blur, detail_bands, detail_energy_loss


def _image(seed: int = 0, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1


def test_bands_sum_back_and_halve():
    """Each band is x minus its blur, and the next level works on the blurred image subsampled by 2."""
    x = _image()
    bands = detail_bands(x, 3)
    assert [b.shape[-1] for b in bands] == [48, 24, 12]
    torch.testing.assert_close(bands[0] + _blur(x), x)
    torch.testing.assert_close(bands[1] + _blur(_blur(x)[..., ::2, ::2]), _blur(x)[..., ::2, ::2])
    # a constant image has no detail; the blur keeps the mean of a constant exactly
    assert all(float(b.abs().max()) < 1e-12 for b in detail_bands(torch.full((1, 3, 16, 16), 0.3), 2))


def test_loss_is_zero_on_the_original_and_ignores_the_phase():
    x = _image()
    assert torch.equal(detail_energy_loss(x, x), torch.zeros(2, dtype=x.dtype))
    blurred = _blur(_blur(x))
    # the same texture shifted by a pixel (other phase, same local strength) costs far less than losing it
    shifted = torch.roll(x, 1, dims=-1)
    lost, moved = detail_energy_loss(blurred, x), detail_energy_loss(shifted, x)
    assert (lost > 0).all() and (moved < 0.1 * lost).all(), (lost, moved)
    assert (detail_energy_loss(x, blurred) > 0).all()  # too much detail is penalised too


def test_gradient_restores_lost_detail():
    """Descending the loss from a blurred image raises its fine-band energy towards the original's."""
    x = _image(1)
    y = _blur(_blur(x)).clone().requires_grad_(True)
    opt = torch.optim.SGD([y], lr=0.5)
    energy = lambda v: float(detail_bands(v, 1)[0].pow(2).mean())  # noqa: E731
    before = energy(y.detach())
    for _ in range(50):
        opt.zero_grad()
        detail_energy_loss(y, x).sum().backward()
        opt.step()
    after = energy(y.detach())
    assert before < after <= 1.2 * energy(x), (before, after, energy(x))


def _train(*args: str) -> int:
    return main(["--threads", "1", "train", "--codec", "rvgc", "--crop", "32", "--batch", "2", "-q",
                 "--val-every", "1000", "--val-batch", "2", *args])


def test_detail_weight_fine_tunes_the_decoder_only(tmp_path):
    """--detail-weight implies --decoder-only: only g_s changes (files stay the same), the loss has the
    detail term (logged), and the weight is recorded in the model card."""
    from diffcodec.codecs.rvgc import RVGC

    data = make_image_folder(tmp_path, size=40)
    src, ft = tmp_path / "src", tmp_path / "ft"
    assert _train("--data", str(data), "--out", str(src), "--preset", "tiny", "--iters", "2") == 0
    assert _train("--data", str(data), "--out", str(ft), "--init", str(src / "model.safetensors"),
                  "--detail-weight", "2", "--lr", "1e-2", "--warmup", "1", "--iters", "2") == 0
    a, b = load_model(str(src / "model.safetensors")), load_model(str(ft / "model.safetensors"))
    changed = {k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])}
    assert changed and all(k.startswith("g_s.") for k in changed), changed
    assert b.card["train"]["detail_weight"] == 2.0
    img = synthetic_image(32, 48).transpose(2, 0, 1)
    assert [s.payload for s in RVGC.encode_latent(a, a.analyse(img), 2.0)[0]] == \
        [s.payload for s in RVGC.encode_latent(b, b.analyse(img), 2.0)[0]]
    recs = [json.loads(line) for line in (ft / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["detail"]) and r["detail"] > 0 for r in recs)


def test_detail_term_enters_the_loss_with_lambda():
    """decoder_forward's loss is lambda(q) (MSE + MSE_sampled + W (D + D_sampled))."""
    from diffcodec.codecs.rvgc import RVGC

    torch.manual_seed(0)
    m = RVGC.from_config(RVGC.preset_config("tiny")).double()
    x = _image(2, 64)
    torch.manual_seed(1)
    plain = m.decoder_forward(x)
    torch.manual_seed(1)
    res = m.decoder_forward(x, detail_weight=3.0)
    assert "detail" not in plain
    torch.testing.assert_close(res["loss"], plain["loss"] + m.lmbda(res["q"]) * 3.0 * res["detail"])
