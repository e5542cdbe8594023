import struct

import pytest

from diffcodec import container
from diffcodec.codecs.base import Section
from diffcodec.errors import DiffcodecError, FormatError, LimitError
from diffcodec.varint import put_varint


def _file(n=3):
    h = container.Header("uqdm", "m1", "0123456789abcdef", 30, 20, 3, 5, params=b"\x04")
    secs = [Section(0, i + 1, b"\x02\x00", bytes([i]) * (10 + i), 1000 + i) for i in range(n)]
    return container.pack(h, secs), secs


def test_roundtrip():
    data, secs = _file()
    c = container.unpack(data)
    assert c.complete and c.header.width == 30 and c.header.height == 20 and c.header.seed == 5
    assert [s.payload for s in c.sections] == [s.payload for s in secs]
    assert [s.symbols_crc for s in c.sections] == [1000, 1001, 1002]
    assert c.offsets[0] + sum(c.sizes) == len(data)


def test_every_truncation_is_error_or_prefix():
    data, secs = _file()
    c = container.unpack(data)
    ends = [o + s for o, s in zip(c.offsets, c.sizes)]
    for cut in range(1, len(data)):
        try:
            part = container.unpack(data[:cut])
        except FormatError:
            assert cut < c.offsets[0]  # only a cut header may be refused
            continue
        k = sum(e <= cut for e in ends)
        assert len(part.sections) == k
        assert part.truncated == (cut not in ends and cut >= c.offsets[0] and cut != c.offsets[0])


def test_corrupt_byte_detected_everywhere():
    data, _ = _file()
    for pos in range(len(container.MAGIC), len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        try:
            c = container.unpack(bytes(bad))
        except FormatError:
            continue
        # a corrupted length field can only make the parse look like a truncated download
        assert c.truncated or len(c.sections) < 3


@pytest.mark.parametrize("blob,msg", [(b"", "empty"), (b"PK\x03\x04junk", "not a .dfc"),
                                      (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a .dfc"),
                                      (container.MAGIC[:5], "too short")])
def test_foreign_and_empty(blob, msg):
    with pytest.raises(FormatError, match=msg):
        container.unpack(blob)


def test_limits_checked_before_allocation():
    h = container.Header("uqdm", "m", "0123456789abcdef", 1, 1, 3, 0, params=b"\x04")
    data = bytearray(container.header_bytes(h))
    # rewrite width to 2^31 (above MAX_SIDE) and fix the CRC: must be refused by the limit check
    body = data[:-4]
    i = body.index(bytes.fromhex("0123456789abcdef")) + 8
    body = body[:i] + b"\x80\x80\x80\x80\x08" + body[i + 1 :]
    forged = bytes(body) + struct.pack("<I", __import__("zlib").crc32(bytes(body)))
    with pytest.raises(FormatError, match="exceeds the limit"):
        container.unpack(forged)


def test_version_and_trailing_garbage():
    data, _ = _file()
    bad = bytearray(data)
    bad[len(container.MAGIC)] = 99
    with pytest.raises(FormatError, match="version"):
        container.unpack(bytes(bad))
    with pytest.raises(FormatError, match="trailing"):
        container.unpack(data + b"xx")


def test_every_header_bit_flip_is_reported_as_corruption():
    """The header CRC covers every header field (magic and version are checked by value)."""
    data, _ = _file()
    end = container.unpack(data).offsets[0]
    for pos in range(end):
        for bit in range(8):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            with pytest.raises(FormatError) as e:
                container.unpack(bytes(bad))
            msg = str(e.value)
            assert ("corrupt" in msg) if pos >= len(container.MAGIC) else ("bad magic" in msg), (pos, msg)


def test_every_section_bit_flip_is_corruption_or_looks_cut():
    """Kind, params, length, symbol CRC and payload are all under the section CRC: a flipped bit is
    corruption, except a length now pointing past the end of the file, which looks like a partial
    download: then only the intact sections before it are returned."""
    data, secs = _file()
    c = container.unpack(data)
    for pos in range(c.offsets[0], len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            try:
                part = container.unpack(bytes(bad))
            except FormatError as e:
                assert "corrupt" in str(e)
                continue
            k = len(part.sections)
            assert part.truncated and pos >= c.offsets[k]
            assert [s.payload for s in part.sections] == [s.payload for s in secs[:k]]


def test_limits_are_configurable():
    data, _ = _file()  # 30 x 20 = 600 pixels
    assert container.unpack(data, limits=container.Limits(max_pixels=600)).complete
    with pytest.raises(LimitError, match="600 pixels exceeds the limit 599"):
        container.unpack(data, limits=container.Limits(max_pixels=599))
    with pytest.raises(LimitError, match="per side"):
        container.unpack(data, limits=container.Limits(max_side=29))
    with pytest.raises(LimitError, match="section count = 3 exceeds the limit 2"):
        container.unpack(data, limits=container.Limits(max_sections=2))
    assert issubclass(LimitError, FormatError)
    assert container.Limits.default(123).max_pixels == 123
    with pytest.raises(DiffcodecError):
        container.Limits(max_pixels=0)


def test_section_length_bound_and_identifiers():
    h = container.Header("uqdm", "m", "0123456789abcdef", 2, 2, 3, 0, params=b"\x04")
    bound = container.max_payload_bytes(h)
    data = container.pack(h, [Section(0, 1, b"", b"x" * 10, 0)])
    i = len(container.header_bytes(h)) + 2  # kind, params length, then the payload length
    forged = data[:i] + put_varint(bound + 1) + data[i + 1 :]
    with pytest.raises(FormatError, match="impossible for a 2x2 image"):
        container.unpack(forged)
    for bad in ("", "a\nb", "\x1b[2J", "x" * 256):
        with pytest.raises(ValueError):
            container.header_bytes(container.Header("uqdm", bad, "0123456789abcdef", 2, 2, 3, 0))


def test_section_size_is_the_serialised_length():
    for params, payload in ((b"", b""), (b"\x01\x02", b"x" * 200), (b"p" * 130, b"y" * 20000)):
        sec = Section(0, 1, params, payload, 123)
        assert container.section_size(sec) == len(container.section_bytes(sec))
