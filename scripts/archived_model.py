"""Extract models retired from the package out of the repository's history.

The package ships only the current models (``src/diffcodec/weights/``); a retired model's weights
and card stay in git history, in the commit before the one that removed them.  This script writes
them into a directory, checks each against the hash in ``diffcodec.models.RETIRED_MODELS``, and
that directory then goes on ``DIFFCODEC_MODEL_PATH`` so that files made with the model decode::

    python scripts/archived_model.py uqdm-medium6 --out ~/diffcodec-models
    python scripts/archived_model.py --all --out ~/diffcodec-models
    DIFFCODEC_MODEL_PATH=~/diffcodec-models diffcodec decompress old.dfc old.png

It needs a clone with history (not ``--depth 1``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from diffcodec.errors import ModelError
from diffcodec.models import RETIRED_MODELS, load_model

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "src/diffcodec/weights"


def _git(*args: str) -> bytes:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True).stdout
    except FileNotFoundError:
        raise ModelError("git is not installed: it is needed to read the repository's history") from None
    except subprocess.CalledProcessError as e:
        raise ModelError(f"git {' '.join(args)}: {e.stderr.decode(errors='replace').strip()}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def extract(name: str, out: Path) -> Path:
    """Write ``name``'s weights (and card) into ``out``; returns the weights' path."""
    if name not in RETIRED_MODELS:
        known = ", ".join(RETIRED_MODELS)
        raise ModelError(f"{name!r} is not a retired model (retired: {known})")
    path = f"{WEIGHTS}/{name}.safetensors"
    removed = _git("log", "--diff-filter=D", "-1", "--format=%H", "--", path).decode().strip()
    if not removed:
        raise ModelError(f"{path} was never removed in this clone's history (a shallow clone?)")
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.safetensors"
    _write_atomic(target, _git("show", f"{removed}^:{path}"))
    got = load_model(str(target)).model_hash
    if got != RETIRED_MODELS[name]:
        target.unlink()
        raise ModelError(f"{name}: history gave weights of hash {got}, expected {RETIRED_MODELS[name]}")
    try:
        _write_atomic(out / f"{name}.md", _git("show", f"{removed}^:{WEIGHTS}/{name}.md"))
    except ModelError:
        pass  # the card is documentation only; the weights carry their own metadata
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="retired model names")
    ap.add_argument("--all", action="store_true", help="every retired model")
    ap.add_argument("--out", type=Path, required=True, help="directory to write into (put it on DIFFCODEC_MODEL_PATH)")
    a = ap.parse_args(argv)
    names = list(RETIRED_MODELS) if a.all else a.names
    if not names:
        ap.error("name a model or pass --all")
    try:
        for name in names:
            print(f"{name}: {extract(name, a.out)} (hash {RETIRED_MODELS[name]})")
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
