"""Format stability: files made by earlier releases decode to the same pixels, and re-encoding
gives the same bytes.  ``tests/data/golden`` holds a 56x40 crop of the bundled sample, the .dfc
files each bundled model made of it (with the code of the commit that added them) and their
decoded images.  A speed-up or refactor that changes a decoded bit fails here.  Models retired from
the package are extracted from the repository's history (``scripts/archived_model.py``) onto
``$DIFFCODEC_MODEL_PATH``, so their files keep decoding too."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffcodec
from conftest import load_repo_module
from diffcodec.errors import DecodeError, ModelError
from diffcodec.models import MODEL_PATH_ENV, RETIRED_MODELS, bundled_models

GOLDEN = Path(__file__).parent / "data" / "golden"
UQDM_CASES = ["uqdm-small", "uqdm-medium", *(f"uqdm-medium{k}" for k in range(2, 13))]
CASES = {
    # the files of the format before box priors: re-encoded in it (box_prior=False); the box-prior format's
    # files are {name}.box.dfc (test_golden_box_prior_file_decodes_and_reencodes_identically)
    **{name: dict(codec="uqdm", lossless=True, box_prior=False) for name in UQDM_CASES},
    "diffc-small": dict(codec="diffc", steps=6),
    "diffc-small2": dict(codec="diffc", steps=6),
    "diffc-small3": dict(codec="diffc", steps=6),
    "diffc-small4": dict(codec="diffc", steps=6),
    "rvgc-small": dict(codec="rvgc", q=2.0),
    "rvgc-small2": dict(codec="rvgc", q=2.0),
    "rvgc-small3": dict(codec="rvgc", q=2.0),
    "rvgc-small4": dict(codec="rvgc", q=2.0),
    "rvgc-small5": dict(codec="rvgc", q=2.0),
    "rvgc-small6": dict(codec="rvgc", q=2.0),
    "rvgc-small7": dict(codec="rvgc", q=2.0),
    "rvgc-small8": dict(codec="rvgc", q=2.0),
}


def _png(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def _avx512() -> bool:
    """Whether numpy runs its AVX-512 kernels here (unknown: assumed, so that a failure fails)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return True
    return bool(__cpu_features__.get("AVX512F")) and bool(__cpu_features__.get("AVX512_SKX"))


def _decompress(data: bytes, **kw) -> np.ndarray:
    """decompress a golden uqdm file, or skip on a CPU without AVX-512, where they do not decode (found
    2026-12-08 on an AVX2-only EPYC: re-encoded there, the same symbols, other entropy-coded bytes).  The
    likely cause: numpy's float64 exp / log / expm1 run AVX-512 kernels on the machines that made the files
    and the C library elsewhere, and the uqdm tables are built from them (README, *Known limitations*).  On an
    AVX-512 machine a failure still fails."""
    try:
        return diffcodec.decompress(data, **kw)
    except DecodeError:
        if not _avx512():
            pytest.skip("golden uqdm files were made on CPUs with AVX-512 and do not decode on this one "
                        "(README, Known limitations)")
        raise


@pytest.fixture(scope="module")
def retired_dir(tmp_path_factory):
    """Every retired model, extracted from the repository's history (skips in a clone without it)."""
    archived = load_repo_module("scripts", "archived_model")
    out = tmp_path_factory.mktemp("retired")
    try:
        for name in RETIRED_MODELS:
            archived.extract(name, out)
    except ModelError as e:
        pytest.skip(f"retired models cannot be extracted here: {e}")
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_file_decodes_and_reencodes_identically(name, request, monkeypatch):
    if name in RETIRED_MODELS:
        monkeypatch.setenv(MODEL_PATH_ENV, str(request.getfixturevalue("retired_dir")))
    data = (GOLDEN / f"{name}.dfc").read_bytes()
    if CASES[name]["codec"] == "diffc":
        # decoded.png predates channel-aware reconstruction: it is the received latent's image, which
        # is still what channel_aware=False gives; the default is pinned by aware.png
        assert np.array_equal(diffcodec.decompress(data, channel_aware=False), _png(GOLDEN / f"{name}.decoded.png"))
        assert np.array_equal(diffcodec.decompress(data), _png(GOLDEN / f"{name}.aware.png"))
    else:
        assert np.array_equal(_decompress(data), _png(GOLDEN / f"{name}.decoded.png"))
    res = diffcodec.compress(_png(GOLDEN / "input.png"), model=name, seed=7, **CASES[name])
    assert res.data == data


@pytest.mark.parametrize("name", sorted(UQDM_CASES))
def test_golden_box_prior_file_decodes_and_reencodes_identically(name, request, monkeypatch):
    """The uqdm format since 2026-12-07 (steps coded under their priors restricted to the earlier steps' box;
    ``{name}.box.dfc``, made by the commit that added it, before kept coordinates: ``keep=1``): lossless, and
    re-encoded byte for byte; the files above, in the format before it, are re-encoded with ``box_prior=False``."""
    if name in RETIRED_MODELS:
        monkeypatch.setenv(MODEL_PATH_ENV, str(request.getfixturevalue("retired_dir")))
    data = (GOLDEN / f"{name}.box.dfc").read_bytes()
    assert diffcodec.info(data)["box_prior"] is True
    assert np.array_equal(_decompress(data), _png(GOLDEN / "input.png"))
    kwargs = {**{k: v for k, v in CASES[name].items() if k != "box_prior"}, "keep": 1}  # every coordinate
    assert diffcodec.compress(_png(GOLDEN / "input.png"), model=name, seed=7, **kwargs).data == data
    assert len(data) < len((GOLDEN / f"{name}.dfc").read_bytes())


@pytest.mark.parametrize("method", ["denoise", "flow"])
def test_golden_uqdm_box_reconstruction(method, request, monkeypatch):
    """uqdm's channel-aware reconstruction of a cut file (codecs/box.py), pinned when it was added and again
    on 2026-12-07, when each step's box began to be intersected with the boxes before it (StepBox.within:
    +0.16 dB denoise, +0.07 dB flow on this image)."""
    if "uqdm-medium7" in RETIRED_MODELS:
        monkeypatch.setenv(MODEL_PATH_ENV, str(request.getfixturevalue("retired_dir")))
    data = (GOLDEN / "uqdm-medium7.dfc").read_bytes()
    expect = _png(GOLDEN / f"uqdm-medium7.steps2.{method}.aware.png")
    assert np.array_equal(_decompress(data, steps=2, method=method), expect)


def test_every_model_has_a_golden_case():
    """A bundled or retired model without a golden file would have no format-stability check."""
    assert set(bundled_models()) | set(RETIRED_MODELS) == set(CASES)
    assert not set(bundled_models()) & set(RETIRED_MODELS)


@pytest.mark.parametrize("kind, kwargs, shares", [("keep", {"keep": 0.3}, (76, 76, 255)),
                                                  ("default", {"keep": (0.1, 0.3, 0.8)}, (26, 76, 204))])
def test_golden_kept_coordinates_file(kind, kwargs, shares):
    """The uqdm format with kept coordinates (``keep``, header flag 2; ``uqdm-medium12.keep.dfc``, made by the
    commit that added it with keep 0.3, and ``uqdm-medium12.default.dfc``, the default shares from 2026-12-07
    to 2026-12-08, 10% / 30% / 80%, written again with those shares given): lossless, the step-2 cut decodes to
    the pinned image (pinned again when a complete kept step after the first came to be reconstructed from its
    prior mean), and it re-encodes byte for byte."""
    data = (GOLDEN / f"uqdm-medium12.{kind}.dfc").read_bytes()
    assert diffcodec.info(data)["keep"] == shares
    assert np.array_equal(_decompress(data), _png(GOLDEN / "input.png"))
    assert np.array_equal(_decompress(data, steps=2), _png(GOLDEN / f"uqdm-medium12.{kind}.steps2.png"))
    res = diffcodec.compress(_png(GOLDEN / "input.png"), model="uqdm-medium12", seed=7, lossless=True, **kwargs)
    assert res.data == data
