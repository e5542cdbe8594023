"""Reading and writing images and files safely.

* Anything Pillow reads is accepted; EXIF orientation is applied (what a viewer shows is what is
  coded).  Palette and 1-bit images are expanded losslessly.  16-bit, float and CMYK images are
  refused with a clear message rather than silently converted, and so are animations and multi-page
  files (coding their first frame alone would lose the rest without a word).
* An alpha channel is never dropped silently: ``alpha="error"`` (default) refuses, ``"drop"``
  discards it on explicit request.
* Outputs are written atomically (temp file + fsync + rename), never onto an input file, and
  (``overwrite=False``, the CLI without ``--force``) never onto any existing file.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DiffcodecError, ImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}
MAX_IMAGE_PIXELS = 1 << 26  # 64 megapixels: refuse before decoding anything larger
MAX_SIDE = 1 << 15


def read_image(src, alpha: str = "error") -> np.ndarray:
    """Read an image to uint8 (H, W, C) with C = 1 (gray) or 3 (RGB)."""
    if alpha not in ("error", "drop"):
        raise ValueError("alpha must be 'error' or 'drop'")
    name = str(src) if not isinstance(src, (bytes, bytearray)) else "<bytes>"
    try:
        im = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS or max(w, h) > MAX_SIDE:
            raise ImageError(f"{name}: {w}x{h} is too large (limit {MAX_IMAGE_PIXELS} pixels, {MAX_SIDE} per side)")
        frames = int(getattr(im, "n_frames", 1) or 1)
        if frames > 1:
            raise ImageError(f"{name}: has {frames} frames (an animation or a multi-page file); diffcodec codes "
                             "still images: save the frame you want as its own file")
        im = ImageOps.exif_transpose(im)
        im.load()
    except DiffcodecError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except Image.DecompressionBombError as e:  # Pillow's own check, at open, of sizes far past ours
        raise ImageError(f"{name}: too large (limit {MAX_IMAGE_PIXELS} pixels; {e})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({e})") from None
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode == "PA":
        im = im.convert("RGBA")
    mode = im.mode
    if mode in ("LA", "RGBA", "La", "RGBa"):
        if alpha == "error":
            raise ImageError(f"{name}: has an alpha channel, which the codecs do not code; "
                             "pass --drop-alpha (alpha='drop') to discard it explicitly")
        im = im.convert("L" if mode.startswith("L") else "RGB")
    mode = im.mode
    if mode not in ("L", "RGB"):
        raise ImageError(f"{name}: unsupported image mode {mode!r} (8-bit gray or RGB images only)")
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def to_pil(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


def check_output(path: str | Path, inputs: tuple = (), overwrite: bool = True) -> None:
    """Refuse an output that is one of ``inputs`` (always) or, unless ``overwrite``, any existing file.

    Called before the work (fail fast) and again by :func:`atomic_write`.
    """
    path = Path(path)
    for src in inputs:
        try:
            if src is not None and path.exists() and os.path.samefile(path, src):
                raise DiffcodecError(f"refusing to overwrite the input file {src}")
        except FileNotFoundError:
            pass
    if not overwrite and (path.exists() or path.is_symlink()):
        raise DiffcodecError(f"{path} exists; pass --force to overwrite")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes, inputs: tuple = (), overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename.

    Readers (and a crash or kill at any moment) see either the old file or the complete new one,
    never a partial file; on any error the temp file is removed.  An input file is never
    overwritten; with ``overwrite=False`` no existing file is (the final step is then a hard
    link, which fails atomically if the name was taken meanwhile).  The file gets the usual
    permissions (0666 minus the umask), not the temp file's 0600.
    """
    path = Path(path)
    check_output(path, inputs, overwrite)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DiffcodecError(f"output folder does not exist: {parent}")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise DiffcodecError(f"{path} exists; pass --force to overwrite") from None
            except OSError:  # a file system without hard links: check, then rename
                check_output(path, inputs, overwrite)
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def encode_image(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    to_pil(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: str | Path, arr: np.ndarray, inputs: tuple = (), overwrite: bool = True) -> None:
    """Save uint8 (H, W, C) atomically; format from the suffix (PNG if unknown)."""
    ext = Path(path).suffix.lower()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
           ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM"}.get(ext, "PNG")
    atomic_write(path, encode_image(arr, fmt), inputs=inputs, overwrite=overwrite)
