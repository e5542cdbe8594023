"""Shared fixtures: tiny models built in milliseconds, small synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcodec.codecs.diffc import DiffC
from diffcodec.codecs.rvgc import RVGC
from diffcodec.codecs.uqdm import UQDM
from diffcodec.models import load_model, save_model
from diffcodec.networks import UNetConfig
from diffcodec.train import PRESETS


def make_tiny(codec: str = "uqdm", seed: int = 0, random_weights: bool = True, net: dict | None = None, **kwargs):
    """A tiny model of any codec (random weights: zero-initialised output layers would give trivial
    outputs and hide bugs); ``net`` overrides UNet config fields of uqdm/diffc (e.g. ``patch``)."""
    torch.manual_seed(seed)
    if codec == "rvgc":
        m = RVGC.from_config({**RVGC.preset_config("tiny"), **kwargs})
        if random_weights:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        return m
    if codec == "uqdm":
        m = UQDM(UNetConfig(**{**PRESETS["tiny"], **(net or {})}), **kwargs)
    else:
        m = DiffC(UNetConfig(**{**PRESETS["tiny"], **(net or {})}, out_channels=3), **kwargs)
    if random_weights:
        with torch.no_grad():
            for p in m.net.parameters():
                p.add_(0.03 * torch.randn_like(p))
    return m


def make_tiny_uqdm(seed: int = 0, num_steps: int = 4) -> UQDM:
    return make_tiny("uqdm", seed, num_steps=num_steps)


def make_tiny_uqdm_variant(variant: str, model_id: str) -> UQDM:
    """A tiny uqdm model as the bundled ones are built (``context``: opponent-dct4 noise, opponent final
    basis, checkerboard context with non-zero weights) or the plain one (``plain``), named for files."""
    if variant == "context":  # the checkerboard context sees only the first-pass values decoded so far
        m = make_tiny("uqdm", noise_basis="opponent-dct4", final_basis="opponent", context="checkerboard",
                      scale_offsets=True)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            m.context_weight.copy_(0.05 * torch.randn(m.context_weight.shape, generator=g))
    else:
        m = make_tiny("uqdm")
    m.model_id, m.model_hash = model_id, "0123456789abcdef"
    return m


def under_threads(fn, counts=(1, 2)) -> list:
    """fn() once under each torch thread count (then back to 1): decoded bits must not depend on it."""
    outs = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            outs.append(fn())
    finally:
        torch.set_num_threads(1)
    return outs


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-uqdm.safetensors"
    save_model(make_tiny_uqdm(), path, card={"default_steps": 2})
    return path


@pytest.fixture(scope="session")
def other_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "other-uqdm.safetensors"
    save_model(make_tiny_uqdm(seed=1), path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    return load_model(str(tiny_model_path))


def load_repo_module(folder: str, name: str):
    """A script of the repository (``benchmarks/`` or ``scripts/``, not a package) imported as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_image_folder(root, size: int = 24, n: int = 3):
    """A folder of ``n`` synthetic size x size training images under ``root``."""
    from PIL import Image

    data = root / "data"
    data.mkdir()
    for i in range(n):
        Image.fromarray(synthetic_image(size, size, seed=i)).save(data / f"{i}.png")
    return data


@pytest.fixture
def image_folder(tmp_path):
    """Three small training images."""
    return make_image_folder(tmp_path)


def synthetic_image(h: int = 20, w: int = 28, c: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus texture: compressible but not trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 40 + 150 * (xx / max(1, w - 1))[..., None] * np.ones((1, 1, c)) + 30 * np.sin(yy / 3.0)[..., None]
    img = base + rng.normal(0, 8, size=(h, w, c))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@pytest.fixture
def image():
    return synthetic_image()


def launcher_errors(stderr: str) -> str:
    """A failed torchrun's stderr without the launcher's own traceback: the workers' messages (e.g. gloo's
    ``terminate called ... what(): ...``) come first and would be cut off by a plain tail."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "torch/distributed/" not in ln]
    return "\n".join(lines[:40] + ["..."] + lines[-20:]) if len(lines) > 60 else "\n".join(lines)
