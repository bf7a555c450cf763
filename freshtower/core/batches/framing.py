"""TFRecord framing: each record is its length, the masked CRC32C of the
length, the payload and the masked CRC32C of the payload. The ``tfrecord``
package reads these files but never checks the CRCs; ``record_frames``
does, so a corrupt or truncated file is named with its byte offset.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np

from freshtower.core.batches.schema import BatchFormatError

_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_HEADER_BYTES = 12  # 8-byte length + 4-byte masked CRC of the length
_FOOTER_BYTES = 4  # masked CRC of the payload


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data``."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One TFRecord frame: length, CRC of length, payload, CRC of payload."""
    length = _LENGTH.pack(len(payload))
    return length + _CRC.pack(masked_crc32c(length)) + payload + _CRC.pack(masked_crc32c(payload))



def record_frames(
    path: Path | str, data: bytes, end: int | None = None, check_crcs: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame offset, payload start, payload length) of each record up to
    ``end`` bytes, checking both masked CRC32Cs of every record unless
    ``check_crcs`` is False (the bytes matched a SHA-256 already)."""
    limit = len(data) if end is None else end
    if limit > len(data):
        raise BatchFormatError(path, len(data), f"file is truncated: expected at least {limit} bytes")
    offsets: list[int] = []
    lengths: list[int] = []
    view = memoryview(data)
    offset = 0
    unpack_length, unpack_crc, crc = _LENGTH.unpack_from, _CRC.unpack_from, masked_crc32c
    while offset < limit:
        if offset + _HEADER_BYTES > limit:
            raise BatchFormatError(path, offset, "truncated record header")
        (length,) = unpack_length(data, offset)
        if check_crcs and crc(view[offset : offset + 8]) != unpack_crc(data, offset + 8)[0]:
            raise BatchFormatError(path, offset, "record length fails its CRC (corrupt file)")
        stop = offset + _HEADER_BYTES + length
        if stop + _FOOTER_BYTES > limit:
            raise BatchFormatError(path, offset, f"truncated record: {length} bytes announced")
        if check_crcs and crc(view[offset + _HEADER_BYTES : stop]) != unpack_crc(data, stop)[0]:
            raise BatchFormatError(path, offset, "record payload fails its CRC (corrupt file)")
        offsets.append(offset)
        lengths.append(length)
        offset = stop + _FOOTER_BYTES
    frame_offsets = np.asarray(offsets, dtype=np.int64)
    return frame_offsets, frame_offsets + _HEADER_BYTES, np.asarray(lengths, dtype=np.int64)


def iter_record_payloads(path: Path | str, data: bytes | None = None, end: int | None = None) -> Iterator[tuple[int, memoryview]]:
    """Yield (byte offset, payload) of each record, CRCs checked."""
    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise BatchFormatError(path, None, f"cannot read batch file: {error}") from error
    view = memoryview(data)
    for offset, start, length in zip(*(a.tolist() for a in record_frames(path, data, end))):
        yield offset, view[start : start + length]


