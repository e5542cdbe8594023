"""Types shared by every codec: a coded section of a .dfc file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Section:
    """One independently checksummed unit of a progressive bitstream.

    kind: codec-defined (e.g. 0 = diffusion step, 1 = final lossless section)
    index: 1-based position in the progressive order
    params: small codec-defined bytes the decoder needs for this section (e.g. table width)
    payload: entropy-coded bytes
    symbols_crc: CRC32 of the decoded symbols, to detect encoder/decoder desync
    ideal_bits: the model's ideal code length of the payload (not stored in the file)
    """

    kind: int
    index: int
    params: bytes
    payload: bytes
    symbols_crc: int
    ideal_bits: float = 0.0
