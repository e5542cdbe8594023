"""Reliability and security of the decoder and of the files diffcodec writes.

* any byte string given to decompress/info decodes (to the sections it holds) or raises a
  DiffcodecError, quickly and without allocating more than the declared image needs;
* corruption is reported, never decoded into garbage; truncation decodes the complete sections;
* header-declared sizes are capped before any allocation (configurable: max_pixels,
  DIFFCODEC_MAX_PIXELS, --max-pixels);
* decoding is bit-exact in another process with another thread count (uqdm and diffc);
* outputs are atomic and not overwritten without --force; training checkpoints survive SIGKILL.
"""

from __future__ import annotations

import functools
import json
import os
import random
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import diffcodec
from conftest import launcher_errors, make_tiny, synthetic_image
from diffcodec import api, container
from diffcodec.cli import main
from diffcodec.codecs.base import Section
from diffcodec.errors import DiffcodecError, FormatError, LimitError, ModelError
from diffcodec.models import MODEL_PATH_ENV, load_model, save_model
from diffcodec.varint import put_varint

FUZZ = dict(max_examples=150, deadline=timedelta(seconds=2), derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------- files
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (the machine is shared), and the small files built before any timing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    for codec in ("uqdm", "diffc", "rvgc"):
        _base(codec)
    yield
    torch.set_num_threads(before)


@functools.cache
def _model(codec: str):
    m = make_tiny(codec) if codec == "rvgc" else make_tiny(codec, num_steps=4)
    m.double().eval()
    m.model_id, m.model_hash = f"tiny-{codec}", "0123456789abcdef"
    return m


@functools.cache
def _base(codec: str):
    """(file bytes, image, set of every legitimate reconstruction as bytes) of a small file."""
    m = _model(codec)
    img = synthetic_image(4, 6, seed=1)
    if codec == "rvgc":  # two sections: hyper-latent (a preview on its own) and latent
        data = diffcodec.compress(img, model=m, q=2.0).data
        cut = container.unpack(data).offsets[1]
        legit = {diffcodec.decompress(d, model=m).tobytes() for d in (data, data[:cut])}
        return data, img, legit
    if codec == "uqdm":
        data = diffcodec.compress(img, model=m, lossless=True).data
    else:
        data = diffcodec.compress(img, model=m, steps=4, c_max=6).data
    legit = {diffcodec.decompress(data, model=m, steps=k).tobytes() for k in range(1, 5)}
    legit.add(diffcodec.decompress(data, model=m).tobytes())
    return data, img, legit


def _decode_outcome(data: bytes, codec: str):
    """Decode with info + decompress; returns the image bytes, or None for a clean DiffcodecError."""
    try:
        meta = diffcodec.info(data)
    except DiffcodecError:
        meta = None
    try:
        out = diffcodec.decompress(data, model=_model(codec))
    except DiffcodecError:
        return None
    assert meta is not None, "decompress accepted what info refused"
    return out.tobytes()


def _crc(b: bytes) -> bytes:
    return struct.pack("<I", zlib.crc32(b) & 0xFFFFFFFF)


def _raw_header(width=4, height=4, channels=3, seed=0, params=b"\x04", nparams=None, nsec=1, codec=b"uqdm",
                model=b"tiny-uqdm", version=1) -> bytes:
    """A header with arbitrary field values and a *valid* checksum (what a forger writes)."""
    b = container.MAGIC + bytes([version, len(codec)]) + codec + bytes([len(model)]) + model + bytes(8)
    b += put_varint(width) + put_varint(height) + bytes([channels]) + put_varint(seed)
    b += put_varint(len(params) if nparams is None else nparams) + params + put_varint(nsec)
    return b + _crc(b)


def _raw_section(kind=0, params=b"\x01\x00", payload=b"\0\0\0\0", nparams=None, length=None) -> bytes:
    head = bytes([kind]) + put_varint(len(params) if nparams is None else nparams) + params
    head += put_varint(len(payload) if length is None else length) + struct.pack("<I", 0)
    return head + _crc(head + payload) + payload


# ---------------------------------------------------------------------------------------------- fuzzing
def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        pos = pos % (len(b) + 1)
        if op == "flip" and pos < len(b):
            b[pos] ^= 1 << (arg % 8)
        elif op == "set" and pos < len(b):
            b[pos] = arg % 256
        elif op == "insert":
            b[pos:pos] = bytes([arg % 256]) * (1 + arg % 3)
        elif op == "delete":
            del b[pos : pos + 1 + arg % 4]
        elif op == "truncate":
            del b[pos:]
    return bytes(b)


_ops = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                          st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=3)


@settings(**FUZZ)
@given(codec=st.sampled_from(["uqdm", "diffc", "rvgc"]), ops=_ops)
def test_fuzz_mutated_files(codec, ops):
    """Random flips/insertions/deletions/truncations: a clean error or a legitimate (prefix) decode."""
    data, _, legit = _base(codec)
    bad = _mutate(data, ops)
    t0 = time.perf_counter()
    out = _decode_outcome(bad, codec)
    assert time.perf_counter() - t0 < 1.5
    event("decoded" if out is not None else "refused")
    if out is not None:
        assert out in legit, "a mutated file decoded to something no prefix of the file gives"


@settings(**{**FUZZ, "max_examples": 80})
@given(codec=st.sampled_from(["uqdm", "diffc", "rvgc"]), data=st.data())
def test_fuzz_forged_checksums(codec, data):
    """Structure-aware fuzzing with *valid* checksums (a forger's files): any field, any value ->
    a DiffcodecError or an image of the declared size, never another exception."""
    orig, _, _ = _base(codec)
    cont = container.unpack(orig)
    h = cont.header
    draw = data.draw
    if draw(st.booleans()):
        h.width, h.height = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        h.channels = draw(st.sampled_from([1, 3]))
    if draw(st.booleans()):
        h.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.integers(0, 5)) == 0:
        h.params = draw(st.binary(max_size=3))
    secs = list(cont.sections)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(secs) - 1))
        s = secs[i]
        what = draw(st.sampled_from(["kind", "params", "payload", "symcrc", "drop", "dup", "swap"]))
        if what == "kind":
            secs[i] = Section(draw(st.integers(0, 255)), s.index, s.params, s.payload, s.symbols_crc)
        elif what == "params":
            secs[i] = Section(s.kind, s.index, draw(st.binary(max_size=6)), s.payload, s.symbols_crc)
        elif what == "payload":
            secs[i] = Section(s.kind, s.index, s.params, _mutate(s.payload, draw(_ops)), s.symbols_crc)
        elif what == "symcrc":
            secs[i] = Section(s.kind, s.index, s.params, s.payload, draw(st.integers(0, 2**32 - 1)))
        elif what == "drop" and len(secs) > 1:
            del secs[i]
        elif what == "dup":
            secs.insert(i, s)
        elif what == "swap":
            j = draw(st.integers(0, len(secs) - 1))
            secs[i], secs[j] = secs[j], secs[i]
    forged = container.pack(h, secs)
    t0 = time.perf_counter()
    try:
        out = diffcodec.decompress(forged, model=_model(codec))
    except DiffcodecError as e:
        event(type(e).__name__)
        return
    finally:
        assert time.perf_counter() - t0 < 1.5
    assert out.shape == (h.height, h.width, h.channels) and out.dtype == np.uint8


@pytest.mark.parametrize("codec", ["uqdm", "diffc", "rvgc"])
def test_every_truncation_offset(codec):
    """Every prefix: a clean error (header incomplete / no complete section) or exactly the decode
    of the complete sections it holds, with info() saying how many.  (uqdm: every prefix is
    decoded; diffc: every prefix is parsed, and decoded at and next to section boundaries.)"""
    data, img, _ = _base(codec)
    m = _model(codec)
    cont = container.unpack(data)
    ends = [o + s for o, s in zip(cont.offsets, cont.sizes)]
    n = len(ends)
    if codec == "rvgc":  # k = 1: the hyper-latent preview
        by_k = {k: diffcodec.decompress(data[: ends[k - 1]], model=m) for k in (1, 2)}
    else:
        by_k = {k: diffcodec.decompress(data, model=m, steps=k) for k in range(1, 5)}
    near = {e + d for e in [cont.offsets[0], *ends] for d in (-1, 0, 1, 5)}
    for cut in range(len(data) + 1):
        part = data[:cut]
        k = sum(e <= cut for e in ends)
        if cut < cont.offsets[0]:
            with pytest.raises(FormatError):
                diffcodec.info(part)
            continue
        meta = diffcodec.info(part)
        assert meta["sections_in_file"] == k and meta["complete"] == (k == n)
        assert meta["truncated"] == (cut not in ends and cut != cont.offsets[0])
        if codec == "diffc" and cut not in near:
            continue
        if k == 0:
            with pytest.raises(DiffcodecError, match="no complete section"):
                diffcodec.decompress(part, model=m)
            continue
        out = diffcodec.decompress(part, model=m)
        if k == n:
            assert np.array_equal(out, img if codec == "uqdm" else by_k[max(by_k)])
        else:
            assert np.array_equal(out, by_k[min(k, 4)])


# ---------------------------------------------------------------------------------------------- limits
def _refused_quickly(blob: bytes, match: str, model=None) -> None:
    """info and decompress both refuse ``blob`` with ``match``, in < 0.2 s and < 2 MB allocated."""
    for fn in (lambda: diffcodec.info(blob), lambda: diffcodec.decompress(blob, model=model or _model("uqdm"))):
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            with pytest.raises(FormatError, match=match):
                fn()
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert time.perf_counter() - t0 < 0.2
        assert peak < 2 * 2**20 + 2 * len(blob), peak


EXTREME_HEADERS = [
    (dict(width=2**32 - 1), "width = 4294967295 exceeds the limit"),
    (dict(height=2**32 - 1), "height = 4294967295 exceeds the limit"),
    (dict(width=2**32 - 1, height=2**32 - 1), "exceeds the limit"),
    (dict(width=2**64 + 5), "exceeds the limit"),
    (dict(width=2**75), "malformed width"),
    (dict(width=0), "outside the format limits"),
    (dict(height=0), "outside the format limits"),
    (dict(width=2**15, height=2**15), "outside the format limits"),
    (dict(width=8000, height=8000), "--max-pixels"),
    (dict(nsec=2**63), "section count = 9223372036854775808 exceeds the limit"),
    (dict(nsec=container.MAX_SECTIONS + 1), "section count .* exceeds the limit"),
    (dict(nparams=2**40), "truncated header"),
    (dict(params=bytes(container.MAX_PARAMS + 1)), "codec parameter length .* exceeds the limit"),
    (dict(seed=2**64), "seed .* exceeds the limit"),
    (dict(channels=0), "channel count"),
    (dict(channels=255), "channel count"),
    (dict(codec=b"uq\x1b[31mdm"), "malformed codec id"),
    (dict(model=b"m\nx"), "malformed model id"),
    (dict(model=b""), "malformed model id"),
    (dict(version=2), "format version 2"),
]


@pytest.mark.parametrize("fields,match", EXTREME_HEADERS, ids=[str(i) for i in range(len(EXTREME_HEADERS))])
def test_extreme_header_values(fields, match):
    _refused_quickly(_raw_header(**fields) + _raw_section(), match)


@pytest.mark.parametrize("section,match", [
    (dict(length=2**60), "section 1 length .* impossible"),
    (dict(length=2**32 - 1), "impossible"),
    (dict(nparams=2**40), "section 1 parameter length .* exceeds the limit"),
    (dict(nparams=container.MAX_PARAMS + 1), "exceeds the limit"),
])
def test_extreme_section_values(section, match):
    _refused_quickly(_raw_header() + _raw_section(**section), match)


def test_malformed_and_garbage_bytes():
    _refused_quickly(_raw_header()[:-4] + b"\xff" * 12, "header checksum mismatch")
    _refused_quickly(_raw_header() + b"\0" + b"\xff" * 12, "malformed section 1 parameter length")
    _refused_quickly(container.MAGIC + b"\xff" * 10**5, "version")
    _refused_quickly(container.MAGIC + bytes([1]) + b"\xff" * 10**5, "malformed width")
    _refused_quickly(container.MAGIC + bytes([1, 200]) + b"uqdm", "truncated header")
    h = _raw_header()
    _refused_quickly(h[:-1] + bytes([h[-1] ^ 1]), "header checksum")
    # a huge, well-formed section count with as many empty sections: parsed in linear time
    many = _raw_header(nsec=container.MAX_SECTIONS) + _raw_section(params=b"", payload=b"") * container.MAX_SECTIONS
    t0 = time.perf_counter()
    assert diffcodec.info(many)["sections_in_file"] == container.MAX_SECTIONS
    with pytest.raises(DiffcodecError):
        diffcodec.decompress(many, model=_model("uqdm"))
    assert time.perf_counter() - t0 < 2.0


def test_max_pixels_argument_env_and_cli(tmp_path, monkeypatch, capsys):
    m = _model("uqdm")
    data = diffcodec.compress(synthetic_image(20, 30), model=m, steps=1).data  # 600 pixels
    assert diffcodec.info(data)["width"] == 30
    with pytest.raises(LimitError, match="600 pixels exceeds the limit 599"):
        diffcodec.decompress(data, model=m, max_pixels=599)
    with pytest.raises(LimitError):
        diffcodec.info(data, max_pixels=599)
    with pytest.raises(LimitError):
        list(diffcodec.decode_steps(data, model=m, max_pixels=599))
    assert diffcodec.decompress(data, model=m, max_pixels=600).shape == (20, 30, 3)
    monkeypatch.setenv(container.ENV_MAX_PIXELS, "599")
    with pytest.raises(LimitError, match="DIFFCODEC_MAX_PIXELS"):
        diffcodec.decompress(data, model=m)
    assert diffcodec.info(data, max_pixels=10**6)["complete"]  # the argument wins over the environment
    monkeypatch.setenv(container.ENV_MAX_PIXELS, "6e2")
    assert diffcodec.info(data)["complete"]
    monkeypatch.setenv(container.ENV_MAX_PIXELS, "lots")
    with pytest.raises(DiffcodecError, match="DIFFCODEC_MAX_PIXELS must be a positive integer"):
        diffcodec.info(data)
    monkeypatch.delenv(container.ENV_MAX_PIXELS)
    f = tmp_path / "a.dfc"
    f.write_bytes(data)
    capsys.readouterr()
    assert main(["info", str(f), "--max-pixels", "100"]) == 1
    assert main(["decompress", str(f), "-o", str(tmp_path / "o.png"), "--max-pixels", "100"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("diffcodec: error: image size 30x20") for e in err)
    assert not (tmp_path / "o.png").exists()
    # the default cap accepts what the encoder accepts: a 24-megapixel photo
    assert api.MAX_CODE_PIXELS == container.DEFAULT_MAX_PIXELS >= 6016 * 4016
    container.Limits.default().check_image(6000, 4000)


# ---------------------------------------------------------------------------------------------- identity
def test_file_never_names_a_model_path(tmp_path, monkeypatch):
    """Without --model only names are looked up (bundled, then in $DIFFCODEC_MODEL_PATH's
    directories): a file cannot make the decoder open a path, even one next to a model directory."""
    evil = tmp_path / "evil.safetensors"
    save_model(_model("uqdm"), evil)
    (tmp_path / "models").mkdir()
    monkeypatch.setenv(MODEL_PATH_ENV, str(tmp_path / "models"))
    data = diffcodec.compress(synthetic_image(4, 4), model=load_model(str(evil)), steps=1).data
    cont = container.unpack(data)
    for name in (str(evil), "../evil.safetensors", "../evil", "tiny-uqdm"):
        cont.header.model_id = name
        forged = container.pack(cont.header, cont.sections)
        with pytest.raises(ModelError, match="neither bundled nor in") as e:
            diffcodec.decompress(forged)
        assert repr(name) in str(e.value)  # the message names the model


def test_cli_missing_model_is_named(tmp_path, tiny_model_path, capsys, monkeypatch):
    monkeypatch.delenv(MODEL_PATH_ENV, raising=False)
    png = tmp_path / "in.png"
    Image.fromarray(synthetic_image(8, 8)).save(png)
    f = tmp_path / "a.dfc"
    assert main(["compress", str(png), "-o", str(f), "--model", str(tiny_model_path), "--steps", "1", "-q"]) == 0
    capsys.readouterr()
    assert main(["decompress", str(f), "-o", str(tmp_path / "o.png")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'tiny-uqdm'" in lines[0] and "neither bundled nor in $DIFFCODEC_MODEL_PATH" in lines[0]
    assert not (tmp_path / "o.png").exists()


# ---------------------------------------------------------------------------------------------- determinism
_DECODE_2_THREADS = """
import sys, numpy as np, torch, diffcodec
torch.set_num_threads(2)
out = {}
for codec, model, path in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
    data = open(path, 'rb').read()
    out[codec + '_full'] = diffcodec.decompress(data, model=model)
    method = 'ancestral' if codec.startswith('uqdm') else 'flow'
    out[codec + '_k2'] = diffcodec.decompress(data, model=model, steps=2, method=method, nfe=1)
np.savez(sys.argv[1], **out)
"""


def test_bit_exact_in_another_process_with_2_threads(tmp_path):
    """Encode here with 1 thread; decode in a subprocess with 2 threads: identical for uqdm (also with a
    DCT noise basis, scale offsets and the two-pass context) and diffc."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        img = synthetic_image(32, 28, seed=5)
        args, here = [], {}
        extra = dict(noise_basis="opponent-dct4", scale_offsets=True, context="checkerboard")
        models = (("uqdm", make_tiny("uqdm", seed=3, num_steps=4)), ("diffc", make_tiny("diffc", seed=3, num_steps=4)),
                  ("uqdm_ctx", make_tiny("uqdm", seed=3, num_steps=4, **extra)))
        for codec, model in models:
            if codec == "uqdm_ctx":
                with torch.no_grad():
                    for prm in (model.scale_offset, model.context_weight, model.context_adapt):
                        prm.copy_(0.1 * torch.randn_like(prm))
            path = tmp_path / f"tiny-{codec}.safetensors"
            save_model(model, path)
            m = load_model(str(path))
            kw = dict(lossless=True) if codec.startswith("uqdm") else dict(steps=4, c_max=8)
            f = tmp_path / f"{codec}.dfc"
            f.write_bytes(diffcodec.compress(img, model=m, **kw).data)
            args += [codec, str(path), str(f)]
            data = f.read_bytes()
            here[codec + "_full"] = diffcodec.decompress(data, model=m)
            method = "ancestral" if codec.startswith("uqdm") else "flow"
            here[codec + "_k2"] = diffcodec.decompress(data, model=m, steps=2, method=method, nfe=1)
    finally:
        torch.set_num_threads(before)
    out = tmp_path / "dec.npz"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # 2 threads on a busy machine: sleep, do not spin
    p = subprocess.run([sys.executable, "-c", _DECODE_2_THREADS, str(out), *args], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, launcher_errors(p.stderr)
    there = np.load(out)
    assert sorted(there.files) == sorted(here)
    for key, val in here.items():
        assert np.array_equal(there[key], val), key
    assert np.array_equal(here["uqdm_full"], img) and np.array_equal(here["uqdm_ctx_full"], img)


# ---------------------------------------------------------------------------------------------- outputs
def test_force_and_inputs_untouched(tmp_path, tiny_model_path, capsys):
    png = tmp_path / "in.png"
    Image.fromarray(synthetic_image(10, 12)).save(png)
    png_bytes = png.read_bytes()
    f = tmp_path / "a.dfc"
    base = ["--model", str(tiny_model_path), "-q"]
    assert main(["compress", str(png), "-o", str(f), "--steps", "1", *base]) == 0
    one = f.read_bytes()
    capsys.readouterr()
    assert main(["compress", str(png), "-o", str(f), "--steps", "2", *base]) == 1
    assert capsys.readouterr().err.strip() == f"diffcodec: error: {f} exists; pass --force to overwrite"
    assert f.read_bytes() == one
    assert main(["compress", str(png), "-o", str(f), "--steps", "2", "--force", *base]) == 0
    assert f.read_bytes() != one and len(f.read_bytes()) > len(one)

    out = tmp_path / "o.png"
    out.write_bytes(b"precious")
    assert main(["decompress", str(f), "-o", str(out), *base]) == 1
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["decompress", str(f), "-o", str(out), "--force", *base]) == 0
    assert np.asarray(Image.open(out)).shape == (10, 12, 3)
    mode = out.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not the temp file's 0600

    # inputs are never overwritten, even with --force; failures leave no file behind
    dfc = f.read_bytes()
    assert main(["compress", str(png), "-o", str(png), "--force", *base]) == 1
    assert main(["decompress", str(f), "-o", str(f), "--force", *base]) == 1
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert png.read_bytes() == png_bytes and f.read_bytes() == dfc
    bad = tmp_path / "bad.dfc"
    bad.write_bytes(dfc[:-3] + bytes([dfc[-3] ^ 4]) + dfc[-2:])
    assert main(["decompress", str(bad), "-o", str(tmp_path / "new.png"), *base]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dfc", "bad.dfc", "in.png", "o.png"]


def test_atomic_write_no_clobber(tmp_path):
    from diffcodec.imageio import atomic_write

    p = tmp_path / "x.bin"
    atomic_write(p, b"one", overwrite=False)
    with pytest.raises(DiffcodecError, match="exists; pass --force"):
        atomic_write(p, b"two", overwrite=False)
    assert p.read_bytes() == b"one"
    atomic_write(p, b"three")
    assert p.read_bytes() == b"three" and [q.name for q in tmp_path.iterdir()] == ["x.bin"]


def test_cli_truncated_file_note(tmp_path, tiny_model_path, capsys):
    png = tmp_path / "in.png"
    Image.fromarray(synthetic_image(10, 12)).save(png)
    f = tmp_path / "a.dfc"
    assert main(["compress", str(png), "-o", str(f), "--lossless", "--model", str(tiny_model_path), "-q"]) == 0
    meta = diffcodec.info(f.read_bytes())
    cut = tmp_path / "cut.dfc"
    cut.write_bytes(f.read_bytes()[: meta["sections"][2]["offset"] + 5])  # inside section 3
    capsys.readouterr()
    assert main(["decompress", str(cut), "-o", str(tmp_path / "c.png"), "--model", str(tiny_model_path), "-q"]) == 0
    assert capsys.readouterr().err.strip() == f"diffcodec: note: {cut} is truncated: decoded 2 of 5 sections"
    assert main(["info", str(cut), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["complete"], d["truncated"], d["sections_in_file"], d["sections_encoded"]) == (False, True, 2, 5)
    assert main(["decompress", str(f), "-o", str(tmp_path / "f.png"), "--model", str(tiny_model_path), "-q"]) == 0
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- training
def _temps(out) -> list[str]:
    try:
        return [n for n in os.listdir(out) if n.endswith(".tmp")]
    except FileNotFoundError:
        return []


def _check_run_dir(out) -> int:
    """Whatever a kill left must load: returns the checkpoint's step (0 without one)."""
    step = 0
    if (out / "checkpoint.pt").exists():
        ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
        step = ck["step"]
        assert {"model", "ema", "opt", "step"} <= set(ck)
    if (out / "model.safetensors").exists():
        load_model(str(out / "model.safetensors"))
    return step


def test_training_survives_sigkill_at_any_moment(tmp_path, image_folder):
    data = image_folder
    out = tmp_path / "run"
    iters = 16
    cmd = [sys.executable, "-m", "diffcodec.cli", "--threads", "1", "train", "--data", str(data), "--out", str(out),
           "--preset", "tiny", "--batch", "2", "--crop", "16", "--val-batch", "2", "--ckpt-every", "1",
           "--val-every", "1000", "--iters", str(iters), "-q"]
    rng = random.Random(7)

    def in_write(prefix: str, nth: int):
        seen = [0, None]

        def cond() -> bool:
            names = [n for n in _temps(out) if n.startswith(prefix)]
            if names and names[0] != seen[1]:
                seen[0], seen[1] = seen[0] + 1, names[0]
            return seen[0] >= nth

        return cond

    def ino(p) -> int | None:
        try:
            return os.stat(p).st_ino
        except FileNotFoundError:
            return None

    def after(seconds: float):
        start, first = [None], [ino(out / "checkpoint.pt")]

        def cond() -> bool:  # a random moment once this run has written a checkpoint (training is under way)
            if start[0] is None and ino(out / "checkpoint.pt") not in (None, first[0]):
                start[0] = time.monotonic()
            return start[0] is not None and time.monotonic() - start[0] > seconds

        return cond

    kills = [lambda: in_write("checkpoint.pt", rng.randint(1, 3)),  # during a checkpoint write
             lambda: in_write("model.safetensors", rng.randint(1, 3)),  # during the model export
             lambda: after(rng.uniform(0.0, 0.2))]  # anywhere in the training loop
    for round_, make_cond in enumerate(kills):
        cond = make_cond()
        proc = subprocess.Popen(cmd + (["--resume"] if round_ else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and not cond() and time.monotonic() < deadline:
            time.sleep(0.0002)
        assert proc.poll() is None, f"round {round_}: the run ended before the kill: {proc.stderr.read()[-1000:]}"
        proc.kill()  # SIGKILL
        proc.wait()
        proc.stderr.close()
        _check_run_dir(out)
    p = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, launcher_errors(p.stderr)
    assert _check_run_dir(out) == iters
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, iters + 1))
    assert _temps(out) == []  # temp files of the killed writes were cleaned up
