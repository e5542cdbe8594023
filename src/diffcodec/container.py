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
    crc32      u32 of everything above
    then ``nsections`` times:
      kind     u8  (codec-defined: 0 = step, 1 = final lossless, ...)
      params   varint length + bytes
      length   varint  payload length
      symcrc   u32     CRC32 of the decoded symbols (detects decoder desync)
      crc32    u32     of kind..symcrc and the payload
      payload  ``length`` bytes

A file cut after its k-th section is a valid *partial* file: it decodes to what the first k
sections give (progressive download).  A section cut in the middle is dropped with a warning.
All counts and sizes are checked against hard limits *before* anything is allocated.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from .codecs.base import Section
from .errors import FormatError
from .varint import put_varint

MAGIC = b"\x89DFC\r\n\x1a\n"
FORMAT_VERSION = 1
MAX_SIDE = 1 << 15
MAX_PIXELS = 1 << 26
MAX_SECTIONS = 4096
MAX_PARAMS = 1 << 16


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


def _short_str(s: str) -> bytes:
    b = s.encode("ascii")
    if len(b) > 255:
        raise ValueError("identifier too long")
    return bytes([len(b)]) + b


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.data):
            raise _Short(what)

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def varint(self, what: str, limit: int) -> int:
        n = shift = 0
        for _ in range(10):
            b = self.u8(what)
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                if n > limit:
                    raise FormatError(f"{what} = {n} exceeds the limit {limit}")
                return n
            shift += 7
        raise FormatError(f"malformed {what}")

    def short_str(self, what: str) -> str:
        n = self.u8(what)
        try:
            return self.take(n, what).decode("ascii")
        except UnicodeDecodeError:
            raise FormatError(f"malformed {what}") from None


class _Short(Exception):
    """The data ended before a field (truncation)."""


def section_bytes(sec: Section) -> bytes:
    head = bytes([sec.kind]) + put_varint(len(sec.params)) + sec.params + put_varint(len(sec.payload))
    head += struct.pack("<I", sec.symbols_crc & 0xFFFFFFFF)
    crc = zlib.crc32(sec.payload, zlib.crc32(head)) & 0xFFFFFFFF
    return head + struct.pack("<I", crc) + sec.payload


def header_bytes(h: Header) -> bytes:
    if not (1 <= h.width <= MAX_SIDE and 1 <= h.height <= MAX_SIDE and h.width * h.height <= MAX_PIXELS):
        raise ValueError("image size outside the format limits")
    if len(bytes.fromhex(h.model_hash)) != 8:
        raise ValueError("model hash must be 8 bytes")
    b = MAGIC + bytes([FORMAT_VERSION]) + _short_str(h.codec) + _short_str(h.model_id)
    b += bytes.fromhex(h.model_hash) + put_varint(h.width) + put_varint(h.height) + bytes([h.channels])
    b += put_varint(h.seed) + put_varint(len(h.params)) + h.params + put_varint(h.num_sections)
    return b + struct.pack("<I", zlib.crc32(b) & 0xFFFFFFFF)


def pack(header: Header, sections: list[Section]) -> bytes:
    header.num_sections = len(sections)
    return header_bytes(header) + b"".join(section_bytes(s) for s in sections)


def unpack(data: bytes, max_sections: int | None = None) -> Container:
    """Parse a .dfc file (or a prefix of one).  Raises :class:`FormatError` on anything invalid."""
    if len(data) == 0:
        raise FormatError("empty file")
    if not data.startswith(MAGIC[: min(len(data), len(MAGIC))]) or len(data) < len(MAGIC):
        if data.startswith(MAGIC[: min(len(data), len(MAGIC))]):
            raise FormatError("file too short to be a .dfc file")
        raise FormatError("not a .dfc file (bad magic)")
    r = _Reader(data, len(MAGIC))
    try:
        version = r.u8("version")
        if version != FORMAT_VERSION:
            raise FormatError(f"unsupported .dfc format version {version} (this diffcodec reads {FORMAT_VERSION})")
        codec = r.short_str("codec id")
        model_id = r.short_str("model id")
        model_hash = r.take(8, "model hash").hex()
        width = r.varint("width", MAX_SIDE)
        height = r.varint("height", MAX_SIDE)
        channels = r.u8("channels")
        seed = r.varint("seed", 2**64 - 1)
        params = r.take(r.varint("codec parameter length", MAX_PARAMS), "codec parameters")
        nsec = r.varint("section count", MAX_SECTIONS)
        end = r.pos
        crc = r.u32("header checksum")
    except _Short:
        raise FormatError("truncated header") from None
    if zlib.crc32(data[:end]) & 0xFFFFFFFF != crc:
        raise FormatError("header checksum mismatch (corrupt file)")
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise FormatError(f"image size {width}x{height} outside the format limits")
    if channels not in (1, 3):
        raise FormatError(f"unsupported channel count {channels}")
    header = Header(codec, model_id, model_hash, width, height, channels, seed, params, nsec)
    cont = Container(header)
    limit = nsec if max_sections is None else min(nsec, max_sections)
    while len(cont.sections) < limit and r.pos < len(data):
        start = r.pos
        try:
            kind = r.u8("section kind")
            sparams = r.take(r.varint("section parameter length", MAX_PARAMS), "section parameters")
            length = r.varint("section length", len(data))
            symcrc = r.u32("section symbol checksum")
            head_end = r.pos
            crc = r.u32("section checksum")
            payload = r.take(length, "section payload")
        except _Short:
            cont.truncated = True
            break
        except FormatError:
            # a length beyond the end of the file is what a truncated download looks like
            cont.truncated = True
            break
        got = zlib.crc32(payload, zlib.crc32(data[start:head_end])) & 0xFFFFFFFF
        if got != crc:
            raise FormatError(f"section {len(cont.sections) + 1} checksum mismatch (corrupt file)")
        cont.sections.append(Section(kind, len(cont.sections) + 1, sparams, payload, symcrc))
        cont.offsets.append(start)
        cont.sizes.append(r.pos - start)
    if r.pos < len(data) and len(cont.sections) == nsec:
        raise FormatError("trailing bytes after the last section (corrupt file)")
    return cont
