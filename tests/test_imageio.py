"""Image reading: what is accepted, converted losslessly, or refused with a clear message."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffcodec.errors import ImageError
from diffcodec.imageio import read_image, to_pil


def _rgb(h=9, w=13, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_and_gray_round_trip_exactly():
    a = _rgb()
    assert np.array_equal(read_image(_save(Image.fromarray(a), "PNG")), a)
    g = a[:, :, 0]
    out = read_image(_save(Image.fromarray(g), "PNG"))
    assert out.shape == (9, 13, 1) and np.array_equal(out[:, :, 0], g)
    assert np.array_equal(np.asarray(to_pil(out)), g)


def test_palette_and_one_bit_expand_losslessly():
    pal = Image.fromarray(_rgb()).quantize(16)
    out = read_image(_save(pal, "PNG"))
    assert out.shape == (9, 13, 3) and np.array_equal(out, np.asarray(pal.convert("RGB")))
    bw = Image.fromarray((_rgb()[:, :, 0] > 127).astype(np.uint8) * 255).convert("1")
    out = read_image(_save(bw, "PNG"))
    assert out.shape == (9, 13, 1) and set(np.unique(out)) <= {0, 255}


def test_exif_orientation_is_applied():
    a = _rgb(6, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    out = read_image(_save(Image.fromarray(a), "PNG", exif=exif))
    assert out.shape == (10, 6, 3)
    assert np.array_equal(out, np.rot90(a, k=-1))


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("CMYK", "JPEG"), ("I", "TIFF"), ("F", "TIFF")])
def test_modes_that_would_need_a_lossy_conversion_are_refused(mode, fmt):
    g = _rgb()[:, :, 0]
    im = Image.fromarray(g.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(_rgb()).convert(mode)
    with pytest.raises(ImageError, match="unsupported image mode"):
        read_image(_save(im, fmt))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_refused_unless_dropped(mode):
    im = Image.fromarray(_rgb()).convert(mode)
    data = _save(im, "PNG")
    with pytest.raises(ImageError, match="alpha"):
        read_image(data)
    out = read_image(data, alpha="drop")
    assert out.shape[2] == (3 if mode == "RGBA" else 1)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_animations_and_multi_page_files_are_refused(fmt):
    frames = [Image.fromarray(_rgb(seed=s)) for s in range(3)]
    data = _save(frames[0], fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="3 frames"):
        read_image(data)
    assert read_image(_save(frames[0], fmt)).shape == (9, 13, 3)  # one frame is fine


@pytest.mark.parametrize("side", [9000, 40000])
def test_huge_dimensions_are_refused_before_decoding(side):
    # PNG headers claiming more pixels than allowed (and holding almost no data): past our limit, and
    # far past it (where Pillow's own decompression-bomb check fires first)
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    with pytest.raises(ImageError, match="too large"):
        read_image(data)


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n"])
def test_unreadable_bytes_are_refused(data):
    with pytest.raises(ImageError, match="not a readable image"):
        read_image(data)
