"""64-bit fingerprints of IDs, computed with numpy over many IDs at once.

The trainers look IDs up millions of times; a Python dict lookup with a
freshly decoded string costs ~0.5 us here (hash + cache misses), so hot
paths look up fingerprints in numpy tables instead and keep the string
dicts as the exact record (``trainer/fingerprint_table.py`` explains how a
collision is caught). The function is stable across processes and
versions: it is part of the stored state (frequency-estimator buckets).

The hash reads each ID's UTF-8 bytes in little-endian 8-byte words and
mixes them with the SplitMix64 finaliser.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
PAD = 8  # bytes a buffer needs after its last range


def _mix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(27))
    h = h * _MIX2
    return h ^ (h >> np.uint64(31))


def fingerprint_ranges(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Fingerprints (uint64, never 0) of the byte ranges [starts, ends) of
    ``buf``, which must extend at least ``PAD`` bytes past every range."""
    n = len(starts)
    lengths = (ends - starts).astype(np.int64)
    h = np.full(n, 0x243F6A8885A308D3, dtype=np.uint64) ^ (lengths.astype(np.uint64) * _GOLDEN)
    if n == 0:
        return h
    windows = np.lib.stride_tricks.sliding_window_view(buf, 8)
    words = int((lengths.max() + 7) // 8)
    with np.errstate(over="ignore"):
        for k in range(words):
            active = np.flatnonzero(lengths > 8 * k)
            if len(active) == 0:
                break
            word = np.ascontiguousarray(windows[starts[active] + 8 * k]).view("<u8").ravel()
            remaining = lengths[active] - 8 * k
            partial = remaining < 8
            if partial.any():  # zero the bytes past the end of the ID
                shift = (remaining[partial] * 8).astype(np.uint64)
                word[partial] &= (np.uint64(1) << shift) - np.uint64(1)
            h[active] = _mix(h[active] ^ (word + _GOLDEN * np.uint64(k + 1)))
        h = _mix(h)
    h[h == 0] = 1  # 0 marks an empty slot in fingerprint tables
    return h


def fingerprint_strings(values: Sequence[str]) -> np.ndarray:
    """Fingerprints of Python strings (their UTF-8 bytes), same as
    ``fingerprint_ranges`` over the encoded bytes.

    >>> a, b, c = fingerprint_strings(["u1", "u2", "u1"]).tolist()
    >>> a == c, a != b
    (True, True)
    """
    joined = "".join(values).encode()
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))  # characters
    if len(joined) != int(lengths.sum()):  # not all ASCII: a character may take several bytes
        encoded = [v.encode() for v in values]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        joined = b"".join(encoded)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    buf = np.frombuffer(joined + b"\x00" * PAD, dtype=np.uint8)
    return fingerprint_ranges(buf, starts, ends)
