"""``fingerprint_strings`` is stored state (frequency-estimator buckets, ID
tables): every path through it must give the fingerprints of the IDs' UTF-8
bytes, ASCII-only lists (one join, one encode) and others alike."""

from __future__ import annotations

import random

import numpy as np

from freshtower.core.fingerprints import PAD, fingerprint_ranges, fingerprint_strings


def byte_by_byte(values: list[str]) -> np.ndarray:
    encoded = [v.encode() for v in values]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    ends = np.cumsum(lengths)
    buf = np.frombuffer(b"".join(encoded) + b"\x00" * PAD, dtype=np.uint8)
    return fingerprint_ranges(buf, ends - lengths, ends)


def test_ascii_and_multibyte_lists_fingerprint_their_utf8_bytes():
    rng = random.Random(0)
    for trial in range(100):
        alphabet = "abc019_-" if trial % 2 else "abc\u00e9\u4e2d\U0001f600x"
        values = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(rng.randint(0, 200))]
        assert (fingerprint_strings(values) == byte_by_byte(values)).all()


def test_fingerprints_stay_what_earlier_versions_stored():
    assert fingerprint_strings(["u1", "i42", "\u00e9\u4e2d"]).tolist() == [967091377432557036, 9501955607415549841, 14377341532121868705]
    assert fingerprint_strings([]).tolist() == []
