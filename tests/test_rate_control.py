"""uqdm rate control (``compress(bpp=...)``): the file ends with one step at the largest kept share that fits,
or the step before it at a larger one, whichever decodes nearer the image."""

import numpy as np
import pytest

import diffcodec
from conftest import make_tiny_uqdm_variant, synthetic_image
from diffcodec import api, container
from diffcodec.cli import main
from diffcodec.errors import DiffcodecError


@pytest.fixture(scope="module", params=["context", "plain"])
def model(request):
    return make_tiny_uqdm_variant(request.param, f"tiny-rate-{request.param}")


def mse(img: np.ndarray, data: bytes, model) -> float:
    return float(np.mean((diffcodec.decompress(data, model=model).astype(np.float64) - img) ** 2))


def shares(data: bytes) -> tuple[int, ...]:
    return diffcodec.info(data)["keep"]


def test_a_budget_between_steps_is_used_and_decodes_no_worse_than_the_whole_steps(model):
    img = synthetic_image(32, 48, seed=3)
    px, T = 32 * 48, model.num_steps
    whole = [diffcodec.compress(img, model=model, steps=k) for k in range(1, T + 1)]
    default = shares(whole[0].data)
    for k in range(1, T):  # budgets between the files of k and k + 1 whole steps
        for frac in (0.3, 0.7):
            bpp = 8.0 * (whole[k - 1].file_bytes + frac * (whole[k].file_bytes - whole[k - 1].file_bytes)) / px
            res = diffcodec.compress(img, model=model, bpp=bpp)
            assert res.bpp <= bpp and res.keep == shares(res.data) == res.summary()["keep"]
            # the longest whole-step file that fits is one of the candidates: never worse, never bigger
            assert res.file_bytes >= whole[k - 1].file_bytes
            assert mse(img, res.data, model) <= mse(img, whole[k - 1].data, model)
            assert res.steps in (k, k + 1)
            changed = [j for j, (a, b) in enumerate(zip(shares(res.data), default)) if a != b]
            assert len(changed) <= 1  # one step's share moved, the others are the model's
            if res.steps == k + 1:  # the step over budget, coded at a smaller share
                assert changed == [k] and shares(res.data)[k] < default[k]


def test_the_share_is_the_largest_that_fits(model):
    img = synthetic_image(32, 48, seed=4)
    two, three = (diffcodec.compress(img, model=model, steps=k) for k in (2, 3))
    bpp = 8.0 * (two.file_bytes + 0.5 * (three.file_bytes - two.file_bytes)) / (32 * 48)
    res = diffcodec.compress(img, model=model, bpp=bpp)
    keep = list(shares(res.data))
    step = res.steps - 1  # the index of the file's last step among the kept shares
    assert step < len(keep)
    if keep[step] < 255:
        keep[step] += 1  # one 255th more of that step's coordinates no longer fits
        more = diffcodec.compress(img, model=model, steps=res.steps, keep=[v / 255 for v in keep])
        assert more.bpp > bpp


def test_a_budget_below_the_first_step_takes_a_smaller_first_share(model):
    img = synthetic_image(32, 48, seed=5)
    one = diffcodec.compress(img, model=model, steps=1)
    bpp = 8.0 * one.file_bytes * 0.9 / (32 * 48)
    res = diffcodec.compress(img, model=model, bpp=bpp)
    assert res.steps == 1 and res.bpp <= bpp and shares(res.data)[0] < shares(one.data)[0]
    assert diffcodec.decompress(res.data, model=model).shape == img.shape
    head = len(container.header_bytes(container.unpack(res.data).header))
    with pytest.raises(DiffcodecError, match="cannot reach"):
        diffcodec.compress(img, model=model, bpp=8.0 * (head + 2) / (32 * 48))


def test_the_encoder_judges_the_candidates_by_what_the_decoder_gets(model, monkeypatch):
    """The candidates' errors come from replaying only the last steps from the encoder's latent: the same as
    decoding the whole file."""
    img = synthetic_image(32, 48, seed=6)
    two, three = (diffcodec.compress(img, model=model, steps=k) for k in (2, 3))
    bpp = 8.0 * (two.file_bytes + 0.4 * (three.file_bytes - two.file_bytes)) / (32 * 48)
    seen = []
    error = api._KeptFit._error

    def checked(self, recoder, i, keep, sections):
        e = error(self, recoder, i, keep, sections)
        seen.append((e, mse(img, container.pack(self._header(keep), sections), model)))
        return e

    monkeypatch.setattr(api._KeptFit, "_error", checked)
    diffcodec.compress(img, model=model, bpp=bpp)
    assert len(seen) >= 2 and all(a == b for a, b in seen)


def test_files_coding_every_coordinate_keep_the_longest_prefix(model):
    """keep=1 (every coordinate, no kept shares in the header): rate control cuts a file in parts, as before."""
    img = synthetic_image(32, 48, seed=7)
    res = diffcodec.compress(img, model=model, bpp=1.5, keep=1)
    assert "keep" not in diffcodec.info(res.data) or diffcodec.info(res.data)["keep"] is None
    assert res.bpp <= 1.5
    whole = diffcodec.compress(img, model=model, steps=3, keep=1, parts=api.DEFAULT_PARTS).data
    body, whole_body = (d[container.unpack(d).offsets[0]:] for d in (res.data, whole))
    assert whole_body.startswith(body)  # a prefix of the file in parts
    # and so do files without box priors (the format before), whose encoder does not track the decoder's box
    old = diffcodec.compress(img, model=model, bpp=1.5, keep=0.3, box_prior=False)
    assert old.bpp <= 1.5 and all(s["kind"] in ("step", "part") for s in old.sections)


def test_cli_bpp_writes_the_fitted_file(model, tmp_path):
    from PIL import Image

    from diffcodec.models import save_model

    path = tmp_path / f"{model.model_id}.safetensors"
    save_model(model, path)
    img = synthetic_image(32, 48, seed=8)
    Image.fromarray(img).save(tmp_path / "a.png")
    ref = diffcodec.compress(img, model=str(path), bpp=1.0)
    assert main(["compress", str(tmp_path / "a.png"), "-o", str(tmp_path / "a.dfc"), "--model", str(path),
                 "--bpp", "1.0"]) == 0
    assert (tmp_path / "a.dfc").read_bytes() == ref.data


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 3, 3), (17, 9, 1), (9, 31)])
def test_odd_sizes_and_grayscale(model, shape):
    img = synthetic_image(shape[0], shape[1], shape[2] if len(shape) == 3 else 1)
    if len(shape) == 2:
        img = img[:, :, 0]
    px = shape[0] * shape[1]
    bpp = 8.0 * diffcodec.compress(img, model=model, steps=2).file_bytes / px
    res = diffcodec.compress(img, model=model, bpp=bpp)
    out = diffcodec.decompress(res.data, model=model)
    assert res.bpp <= bpp and out.shape == (img if img.ndim == 3 else img[:, :, None]).shape
