"""Model files: safetensors weights + JSON config, identity hashes, and the bundled models.

A model file is a ``.safetensors`` file whose metadata holds ``diffcodec.config`` (the codec's
architecture config, JSON) and ``diffcodec.card`` (a short JSON model card).  The *model hash*
is computed over the tensors only (sorted names, dtypes, shapes, bytes), so editing the card
does not invalidate files encoded with the model, but any change of weights does.  Every .dfc
file records the hash and decoding with another model is refused.

Models are found by name among the bundled ones (inside the package), then in the directories of
``$DIFFCODEC_MODEL_PATH`` (``os.pathsep``-separated).  The package ships only the current models;
retired ones stay in the repository's history (``scripts/archived_model.py`` extracts them into such
a directory), so an old file still decodes once its model is put on the path.  A bundled name cannot
be shadowed, and a file's model name is only ever looked up, never opened as a path.
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
MODEL_PATH_ENV = "DIFFCODEC_MODEL_PATH"
DEFAULT_MODELS = {"uqdm": "uqdm-medium12", "diffc": "diffc-small4", "rvgc": "rvgc-small8"}

# Models once bundled and since retired from the package (name -> model hash).  Their weights and
# cards are in the repository's history under src/diffcodec/weights/ (the commit before the one that
# removed them); ``scripts/archived_model.py`` extracts them, checked against these hashes.
RETIRED_MODELS = {
    "uqdm-small": "336a0862969bf7c3",
    "uqdm-medium": "b156301f7dd2a723",
    "uqdm-medium2": "9fdb08aaa5b5fde5",
    "uqdm-medium3": "81e5f4e85fa99901",
    "uqdm-medium4": "13e25cdbe4aac9be",
    "uqdm-medium5": "1cefd92f6c3164e6",
    "uqdm-medium6": "f459db19abf39df5",
    "diffc-small": "dc780fccd1912782",
    "diffc-small2": "45afaf39b85c65f8",
    "diffc-small3": "3b073959260356d2",
    "uqdm-medium7": "0ff3a1fa3d3f7e9c",
    "uqdm-medium8": "ec514882f7732b7f",
    "uqdm-medium9": "fccd3c34d873fe4e",
    "rvgc-small": "4c63c2a68e872af7",
    "rvgc-small2": "b991910aea527bf5",
    "rvgc-small3": "d8b14c124ae42ecc",
    "rvgc-small4": "0d0de2fec0e494ce",
    "rvgc-small7": "9f461dcad409222e",
    "uqdm-medium10": "b04651402d22db9f",
}


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


def model_path_dirs() -> list[Path]:
    """The existing directories named by ``$DIFFCODEC_MODEL_PATH``, in order."""
    raw = os.environ.get(MODEL_PATH_ENV, "")
    return [Path(d) for d in raw.split(os.pathsep) if d and Path(d).is_dir()]


def path_models() -> dict[str, Path]:
    """Models found in ``$DIFFCODEC_MODEL_PATH`` (not bundled ones; the first directory wins)."""
    bundled = bundled_models()
    out: dict[str, Path] = {}
    for d in model_path_dirs():
        for f in sorted(d.glob("*.safetensors")):
            if f.stem not in bundled and f.stem not in out:
                out[f.stem] = f
    return dict(sorted(out.items()))


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and os.sep not in name


def find_model(name: str) -> Path | None:
    """The file of the model called ``name``: bundled first, then ``$DIFFCODEC_MODEL_PATH``.

    Only plain names are looked up (never a path), with one stat per directory, so a decoder can
    call it with the untrusted model name of a file.
    """
    if not _is_plain_name(name):
        return None
    root = resources.files("diffcodec") / BUNDLED_DIR
    candidate = Path(str(root)) / f"{name}.safetensors"
    if candidate.is_file():
        return candidate
    for d in model_path_dirs():
        candidate = d / f"{name}.safetensors"
        if candidate.is_file():
            return candidate
    return None


def retired_hint(name: str) -> str:
    """How to get a retired model back (the end of an error message)."""
    return (f"was retired from the package: extract it from the repository's history with "
            f"'python scripts/archived_model.py {name} --out DIR' and set {MODEL_PATH_ENV}=DIR")


def resolve(name_or_path: str) -> tuple[str, Path]:
    """(model id, path) for a model name (bundled or on the model path) or a .safetensors path."""
    found = find_model(name_or_path)
    if found is not None:
        return name_or_path, found
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.exists():
        if not p.is_file():
            raise ModelError(f"model file not found: {p}")
        return p.stem, p
    if name_or_path in RETIRED_MODELS:
        raise ModelError(f"model {name_or_path!r} {retired_hint(name_or_path)}")
    known = ", ".join(bundled_models()) or "none"
    raise ModelError(f"unknown model {name_or_path!r} (bundled: {known}; others are looked up in "
                     f"${MODEL_PATH_ENV}; or pass a .safetensors path)")


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
