"""Unsigned LEB128 varints, the integer encoding of the .dfc container and the channel layouts."""


def put_varint(n: int) -> bytes:
    """Encode a non-negative integer in 7-bit groups, low first, high bit = more follows."""
    if n < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
