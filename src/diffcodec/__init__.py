"""diffcodec: image compression with diffusion models.

Public API (see :mod:`diffcodec.api`)::

    compress(image, model=None, steps=None, bpp=None, lossless=False) -> EncodeResult
    decompress(data, model=None, steps=None, method="denoise", nfe=None) -> uint8 array
    decode_steps(data, methods=("denoise",)) -> iterator of (k, {method: image}) per received step
    info(data) -> dict
    list_models() -> list[dict]
"""

__version__ = "0.1.0"

from .api import EncodeResult, compress, decode_steps, decompress, get_model, info, list_models  # noqa: E402
from .errors import DecodeError, DiffcodecError, FormatError, ImageError, ModelError  # noqa: E402
from .models import load_model, save_model  # noqa: E402

__all__ = [
    "EncodeResult", "compress", "decode_steps", "decompress", "get_model", "info", "list_models",
    "load_model", "save_model",
    "DiffcodecError", "DecodeError", "FormatError", "ImageError", "ModelError",
]
