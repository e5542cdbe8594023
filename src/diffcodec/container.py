"""The .dfc container: one self-describing, progressive file format for every codec (DESIGN §3).

Layout (integers little-endian; ``varint`` = unsigned LEB128)::

    magic      8 bytes  89 'D' 'F' 'C' 0D 0A 1A 0A   (PNG-style: catches text-mode mangling)
    version    u8       FORMAT_VERSION
    codec      u8 length + ASCII codec id ("uqdm", ...)
    model      u8 length + ASCII model id, then 8 bytes of model hash
    width      varint, height varint, channels u8 (1 = gray, 3 = RGB)
    seed       varint   (shared randomness: z_T, dither, candidates)
    params     varint length + codec parameter bytes
    nsections  varint   (number of sections the *encoder* wrote)
    crc32      u32 of everything above (magic included)
    then ``nsections`` times:
      kind     u8  (codec-defined: 0 = step, 1 = final lossless, 2/3 = rvgc hyper-latent/latent,
                    4 = a leading part of a uqdm step written in parts, whose last part is a step)
      params   varint length + bytes
      length   varint  payload length
      symcrc   u32     CRC32 of the decoded symbols (detects decoder desync)
      crc32    u32     of kind..symcrc and the payload
      payload  ``length`` bytes

Every byte of a file is covered by a CRC32: the header's (all header fields) or its section's
(kind, params, length, symbol CRC and payload).

A file cut after its k-th section is a valid *partial* file: it decodes to what the first k
sections give (progressive download); :attr:`Container.complete` says whether all the sections
the encoder wrote are present.  A section cut in the middle is dropped (``truncated``).

Robustness rules of the parser (any byte string either parses or raises :class:`FormatError`):

* Nothing is allocated from a declared size: fields are bounds-checked against the data before
  they are sliced, varints are at most 10 bytes, and the header's image size, section count and
  parameter lengths are checked against :class:`Limits` right after the header checksum.  The
  pixel cap is configurable (``Limits(max_pixels=...)``, ``DIFFCODEC_MAX_PIXELS``, the CLI's
  ``--max-pixels``); a decoder then allocates only what an image of the declared size needs.
* A checksum mismatch, an impossible value (a section parameter block above ``MAX_PARAMS``, a
  payload larger than any codec can produce for the declared image, a malformed varint) or
  bytes after the last section are reported as corruption.  A field or payload that runs past
  the end of the data is what a partial download looks like: the complete sections before it
  are kept and ``truncated`` is set.  (A bit flip that makes a length point past the end of the
  file is therefore reported as truncation, not as corruption: the sections before it are
  still intact and decode correctly.)
"""

from __future__ import annotations

import numbers
import os
import struct
import zlib
from dataclasses import dataclass, field

from .codecs.base import Section
from .errors import DiffcodecError, FormatError, LimitError
from .varint import put_varint

MAGIC = b"\x89DFC\r\n\x1a\n"
FORMAT_VERSION = 1
MAX_SIDE = 1 << 15  # format limits: what a writer may declare at all
MAX_PIXELS = 1 << 26
MAX_SECTIONS = 4096
MAX_PARAMS = 1 << 16
MAX_SEED = (1 << 64) - 1
MAX_PAYLOAD_BITS_PER_DIM = 64  # no codec spends more on one channel of one (padded) pixel
PAYLOAD_PAD = 64  # padding of each side allowed for in the payload bound
PAYLOAD_SLACK = 1 << 16  # bytes: range-coder flush, side information

DEFAULT_MAX_PIXELS = 25 * 10**6  # a 24-megapixel photo (6000x4000, 6016x4016); = api.MAX_CODE_PIXELS
ENV_MAX_PIXELS = "DIFFCODEC_MAX_PIXELS"


@dataclass(frozen=True)
class Limits:
    """Caps on header-declared sizes, checked before anything is allocated for them.

    ``max_pixels`` bounds width * height (and with it every per-pixel array a decoder allocates);
    it defaults to ``$DIFFCODEC_MAX_PIXELS`` or :data:`DEFAULT_MAX_PIXELS` (see :meth:`default`).
    Values above the format's own limits are clamped to them.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = MAX_SIDE
    max_sections: int = MAX_SECTIONS
    max_params: int = MAX_PARAMS

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_side", "max_sections", "max_params"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise DiffcodecError(f"{name} must be a positive integer, got {v!r}")

    @classmethod
    def default(cls, max_pixels: int | None = None) -> Limits:
        """Limits with ``max_pixels`` from the argument, else ``$DIFFCODEC_MAX_PIXELS``, else the default."""
        if max_pixels is None:
            env = os.environ.get(ENV_MAX_PIXELS, "").strip()
            if env:
                try:
                    max_pixels = int(float(env)) if any(c in env for c in ".eE") else int(env)
                except (ValueError, OverflowError):
                    raise DiffcodecError(f"{ENV_MAX_PIXELS} must be a positive integer, got {env!r}") from None
            else:
                max_pixels = DEFAULT_MAX_PIXELS
        return cls(max_pixels=max_pixels)

    def check_image(self, width: int, height: int) -> None:
        """Raise :class:`LimitError` if a ``width`` x ``height`` image is above these limits."""
        side = min(self.max_side, MAX_SIDE)
        if width > side or height > side:
            raise LimitError(f"image size {width}x{height} exceeds the limit of {side} pixels per side")
        cap = min(self.max_pixels, MAX_PIXELS)
        if width * height > cap:
            raise LimitError(f"image size {width}x{height} = {width * height} pixels exceeds the limit {cap} "
                             f"(raise it with --max-pixels or {ENV_MAX_PIXELS})")


@dataclass
class Header:
    codec: str
    model_id: str
    model_hash: str  # 16 hex digits
    width: int
    height: int
    channels: int
    seed: int
    params: bytes = b""
    num_sections: int = 0


@dataclass
class Container:
    header: Header
    sections: list[Section] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # byte offset of each section's start
    sizes: list[int] = field(default_factory=list)  # bytes each section occupies (headers included)
    truncated: bool = False  # the file ended inside a section (that section was dropped)

    @property
    def complete(self) -> bool:
        return len(self.sections) == self.header.num_sections and not self.truncated


def max_payload_bytes(header: Header) -> int:
    """Largest payload any codec can write for one section of this header's image."""
    dims = 3 * (header.width + PAYLOAD_PAD) * (header.height + PAYLOAD_PAD)
    return dims * MAX_PAYLOAD_BITS_PER_DIM // 8 + PAYLOAD_SLACK


def _is_identifier(b: bytes) -> bool:
    """Non-empty printable ASCII: ids end up in messages, which must stay one clean line."""
    return len(b) > 0 and all(0x20 <= c < 0x7F for c in b)


def _short_str(s: str) -> bytes:
    b = s.encode("ascii")
    if len(b) > 255:
        raise ValueError("identifier too long")
    if not _is_identifier(b):
        raise ValueError(f"identifier {s!r} must be printable ASCII")
    return bytes([len(b)]) + b


class _Short(Exception):
    """The data ended before a field (truncation)."""


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:  # checked before slicing: nothing is allocated from n
            raise _Short
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise _Short
        self.pos += 1
        return self.data[self.pos - 1]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def varint(self, what: str) -> int:
        """An unsigned LEB128 of at most 10 bytes (< 2^70); :class:`_Short` if the data ends in it."""
        n = shift = 0
        for _ in range(10):
            b = self.u8()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
        raise FormatError(f"malformed {what} (corrupt file)")


def section_size(sec: Section) -> int:
    """``len(section_bytes(sec))`` without serialising the payload (rate control sizes many candidate files)."""
    return 1 + len(put_varint(len(sec.params))) + len(sec.params) + len(put_varint(len(sec.payload))) + 8 + len(
        sec.payload)


def section_bytes(sec: Section) -> bytes:
    if not 0 <= sec.kind <= 255:
        raise ValueError("section kind must be in 0..255")
    if len(sec.params) > MAX_PARAMS:
        raise ValueError("section parameters too long")
    head = bytes([sec.kind]) + put_varint(len(sec.params)) + sec.params + put_varint(len(sec.payload))
    head += struct.pack("<I", sec.symbols_crc & 0xFFFFFFFF)
    crc = zlib.crc32(sec.payload, zlib.crc32(head)) & 0xFFFFFFFF
    return head + struct.pack("<I", crc) + sec.payload


def header_bytes(h: Header) -> bytes:
    if not (1 <= h.width <= MAX_SIDE and 1 <= h.height <= MAX_SIDE and h.width * h.height <= MAX_PIXELS):
        raise ValueError("image size outside the format limits")
    if h.channels not in (1, 3):
        raise ValueError("channels must be 1 or 3")
    if not 0 <= h.seed <= MAX_SEED:
        raise ValueError("seed must be in [0, 2^64)")
    if len(h.params) > MAX_PARAMS or not 0 <= h.num_sections <= MAX_SECTIONS:
        raise ValueError("codec parameters or section count outside the format limits")
    if len(bytes.fromhex(h.model_hash)) != 8:
        raise ValueError("model hash must be 8 bytes")
    b = MAGIC + bytes([FORMAT_VERSION]) + _short_str(h.codec) + _short_str(h.model_id)
    b += bytes.fromhex(h.model_hash) + put_varint(h.width) + put_varint(h.height) + bytes([h.channels])
    b += put_varint(h.seed) + put_varint(len(h.params)) + h.params + put_varint(h.num_sections)
    return b + struct.pack("<I", zlib.crc32(b) & 0xFFFFFFFF)


def pack(header: Header, sections: list[Section]) -> bytes:
    header.num_sections = len(sections)
    return header_bytes(header) + b"".join(section_bytes(s) for s in sections)


def _parse_header(data: bytes, limits: Limits) -> tuple[Header, int]:
    if len(data) == 0:
        raise FormatError("empty file")
    if not data.startswith(MAGIC[: min(len(data), len(MAGIC))]):
        raise FormatError("not a .dfc file (bad magic)")
    if len(data) < len(MAGIC):
        raise FormatError("file too short to be a .dfc file")
    r = _Reader(data, len(MAGIC))
    try:
        version = r.u8()
        if version != FORMAT_VERSION:
            raise FormatError(f"unsupported .dfc format version {version} (this diffcodec reads version "
                              f"{FORMAT_VERSION}; the file is corrupt or from a newer diffcodec)")
        codec = r.take(r.u8())
        model_id = r.take(r.u8())
        model_hash = r.take(8).hex()
        width = r.varint("width")
        height = r.varint("height")
        channels = r.u8()
        seed = r.varint("seed")
        nparams = r.varint("codec parameter length")
        params = r.take(nparams)
        nsec = r.varint("section count")
        end = r.pos
        crc = r.u32()
    except _Short:
        raise FormatError("truncated header (file cut short or corrupt)") from None
    # the checksum first: a flipped bit anywhere in the header is reported as corruption
    if zlib.crc32(data[:end]) & 0xFFFFFFFF != crc:
        raise FormatError("header checksum mismatch (corrupt file)")
    # then the values (a file with a valid checksum and impossible values was forged or mis-written)
    if not _is_identifier(codec):
        raise FormatError("malformed codec id")
    if not _is_identifier(model_id):
        raise FormatError("malformed model id")
    for what, v, limit in (("width", width, MAX_SIDE), ("height", height, MAX_SIDE), ("seed", seed, MAX_SEED),
                           ("codec parameter length", nparams, min(limits.max_params, MAX_PARAMS)),
                           ("section count", nsec, min(limits.max_sections, MAX_SECTIONS))):
        if v > limit:
            raise LimitError(f"{what} = {v} exceeds the limit {limit}")
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise FormatError(f"image size {width}x{height} outside the format limits")
    limits.check_image(width, height)
    if channels not in (1, 3):
        raise FormatError(f"unsupported channel count {channels}")
    header = Header(codec.decode("ascii"), model_id.decode("ascii"), model_hash, width, height, channels, seed,
                    params, nsec)
    return header, end + 4


def unpack(data: bytes, max_sections: int | None = None, limits: Limits | None = None) -> Container:
    """Parse a .dfc file (or a prefix of one).  Raises :class:`FormatError` on anything invalid.

    ``max_sections``: stop after that many sections.  ``limits``: caps on the header's declared
    sizes (default :meth:`Limits.default`: ``$DIFFCODEC_MAX_PIXELS`` or 25 megapixels).
    """
    data = bytes(data)
    header, pos = _parse_header(data, limits or Limits.default())
    cont = Container(header)
    nsec = header.num_sections
    max_payload = max_payload_bytes(header)
    limit = nsec if max_sections is None else min(nsec, max_sections)
    r = _Reader(data, pos)
    while len(cont.sections) < limit and r.pos < len(data):
        start = r.pos
        which = f"section {len(cont.sections) + 1}"
        try:
            kind = r.u8()
            nparams = r.varint(f"{which} parameter length")
            if nparams > MAX_PARAMS:
                raise FormatError(f"{which} parameter length {nparams} exceeds the limit {MAX_PARAMS} (corrupt file)")
            sparams = r.take(nparams)
            length = r.varint(f"{which} length")
            if length > max_payload:
                raise FormatError(f"{which} length {length} is impossible for a {header.width}x{header.height} "
                                  "image (corrupt file)")
            symcrc = r.u32()
            head_end = r.pos
            crc = r.u32()
            payload = r.take(length)
        except _Short:
            # a field or payload running past the end of the data: a partial download
            cont.truncated = True
            break
        got = zlib.crc32(payload, zlib.crc32(data[start:head_end])) & 0xFFFFFFFF
        if got != crc:
            raise FormatError(f"{which} checksum mismatch (corrupt file)")
        cont.sections.append(Section(kind, len(cont.sections) + 1, sparams, payload, symcrc))
        cont.offsets.append(start)
        cont.sizes.append(r.pos - start)
    if r.pos < len(data) and len(cont.sections) == nsec:
        raise FormatError("trailing bytes after the last section (corrupt file)")
    return cont
