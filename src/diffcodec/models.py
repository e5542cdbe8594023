"""Model files: safetensors weights + JSON config, identity hashes, and the bundled models.

A model file is a ``.safetensors`` file whose metadata holds ``diffcodec.config`` (the codec's
architecture config, JSON) and ``diffcodec.card`` (a short JSON model card).  The *model hash*
is computed over the tensors only (sorted names, dtypes, shapes, bytes), so editing the card
does not invalidate files encoded with the model, but any change of weights does.  Every .dfc
file records the hash and decoding with another model is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelError

BUNDLED_DIR = "weights"
DEFAULT_MODELS = {"uqdm": "uqdm-medium10", "diffc": "diffc-small4", "rvgc": "rvgc-small5"}


def _codec_classes() -> dict:
    from .codecs.diffc import DiffC
    from .codecs.rvgc import RVGC
    from .codecs.uqdm import UQDM

    return {"uqdm": UQDM, "diffc": DiffC, "rvgc": RVGC}


def build_model(config: dict):
    """Instantiate an (untrained) model from a config dict."""
    codec = config.get("codec")
    classes = _codec_classes()
    if codec not in classes:
        raise ModelError(f"unknown codec {codec!r} in model config (known: {', '.join(classes)})")
    return classes[codec].from_config(config)


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """16-hex-digit identity of a set of weights (first 8 bytes of a SHA-256)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_model(model, path: str | Path, card: dict | None = None, half: bool = False) -> str:
    """Write ``model`` to ``path`` atomically; returns the model hash.

    With ``half=True`` floating-point tensors are stored as float16 (the stored tensors *are* the
    model: the hash and the codec use exactly them).
    """
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point():
            v = v.half()
        elif v.is_floating_point():
            v = v.float()
        tensors[k] = v.clone()
    meta = {"diffcodec.config": json.dumps(model.config_dict()), "diffcodec.card": json.dumps(card or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return tensors_hash(tensors)


def bundled_models() -> dict[str, Path]:
    """Names and paths of the models shipped inside the package."""
    root = resources.files("diffcodec") / BUNDLED_DIR
    out = {}
    if not root.is_dir():  # an installation without bundled weights
        return out
    for entry in root.iterdir():
        if entry.name.endswith(".safetensors"):
            out[entry.name[: -len(".safetensors")]] = Path(str(entry))
    return dict(sorted(out.items()))


def resolve(name_or_path: str) -> tuple[str, Path]:
    """(model id, path) for a bundled model name or a path to a .safetensors file."""
    models = bundled_models()
    if name_or_path in models:
        return name_or_path, models[name_or_path]
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.exists():
        if not p.is_file():
            raise ModelError(f"model file not found: {p}")
        return p.stem, p
    known = ", ".join(models) or "none"
    raise ModelError(f"unknown model {name_or_path!r} (bundled: {known}; or pass a .safetensors path)")


def read_metadata(path: str | Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ModelError(f"cannot read model file {path}: {e}") from None
    if "diffcodec.config" not in meta:
        raise ModelError(f"{path} is not a diffcodec model (no diffcodec.config metadata)")
    return {"config": json.loads(meta["diffcodec.config"]), "card": json.loads(meta.get("diffcodec.card", "{}"))}


def load_model(name_or_path: str):
    """Load a model for coding: eval mode, float64 weights, ``model_id`` and ``model_hash`` set."""
    model_id, path = resolve(name_or_path)
    meta = read_metadata(path)
    model = build_model(meta["config"])
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    missing = set(model.state_dict()) - set(tensors)
    if missing:
        raise ModelError(f"model file {path} lacks tensors: {sorted(missing)[:3]}")
    model.load_state_dict({k: v.to(torch.float64) for k, v in tensors.items()}, strict=True)
    model.double().eval()
    model.model_id = model_id
    model.model_hash = tensors_hash(tensors)
    model.card = meta["card"]
    model.path = path
    return model
