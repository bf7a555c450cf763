from __future__ import annotations

import numpy as np
import pytest
from freshtower.trainer.fingerprint_table import FingerprintTable

from freshtower.core.fingerprints import fingerprint_strings


def test_agrees_with_a_dict_through_growth_and_clustered_keys():
    rng = np.random.default_rng(0)
    table, oracle = FingerprintTable(16), {}
    for round_ in range(30):
        # Keys sharing their low bits pile into one probe cluster.
        keys = np.unique(rng.integers(1, 2**20, size=200).astype(np.uint64) << np.uint64(rng.integers(0, 40)))
        keys = keys[keys != 0]
        values = rng.integers(0, 10**6, size=len(keys))
        table.put(keys, values)
        oracle.update(zip(keys.tolist(), values.tolist()))
    queries = np.array(list(oracle.keys()) + [7, 9, 12345], dtype=np.uint64)
    expected = [oracle.get(k, -1) for k in queries.tolist()]
    assert table.get(queries).tolist() == expected
    assert len(table) == len(oracle)


def test_rebuild_drops_entries_and_zero_is_reserved():
    table = FingerprintTable()
    table.put(np.array([5, 6], dtype=np.uint64), np.array([1, 2]))
    table.rebuild(np.array([6], dtype=np.uint64), np.array([3]))
    assert table.get(np.array([5, 6], dtype=np.uint64)).tolist() == [-1, 3]
    with pytest.raises(ValueError):
        table.put(np.array([0], dtype=np.uint64), np.array([1]))


def test_string_fingerprints_are_stable_and_distinct():
    ids = [f"user-{n}" for n in range(100_000)] + ["", "é", "a" * 1000]
    fingerprints = fingerprint_strings(ids)
    assert len(set(fingerprints.tolist())) == len(ids)
    assert np.all(fingerprints != 0)
    assert fingerprint_strings(["ab", "abc"]).tolist()[0] != fingerprint_strings(["abc"]).tolist()[0]


# Part of stored state (frequency buckets, statistics keys): a change of the
# hash would silently orphan every stored bucket. Literal values, computed
# once with the pure-Python reference below (the docstring's description).
GOLDEN = {
    "": 0xE9E0033E3BADAF36,
    "u1": 0x0D6BCC7BE135F5EC,
    "i42": 0x83DDBA480B88EF91,
    "user-12345678": 0x93233B21CFD854BB,  # two 8-byte words, the second partial
    "é": 0x1B13CEB1C5D2C52B,  # UTF-8 bytes, not code points
    "a" * 17: 0xB1BCB76BC669ADCE,
}


def _reference_fingerprint(text: str) -> int:
    """SplitMix64 over little-endian 8-byte words of the UTF-8 bytes."""
    m = 2**64 - 1

    def mix(h):
        h ^= h >> 30
        h = (h * 0xBF58476D1CE4E5B9) & m
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & m
        return h ^ (h >> 31)

    data = text.encode()
    h = 0x243F6A8885A308D3 ^ ((len(data) * 0x9E3779B97F4A7C15) & m)
    for k in range((len(data) + 7) // 8):
        word = int.from_bytes(data[8 * k : 8 * k + 8].ljust(8, b"\0"), "little")
        h = mix(h ^ ((word + 0x9E3779B97F4A7C15 * (k + 1)) & m))
    return mix(h) or 1


def test_string_fingerprints_are_pinned_to_literal_values():
    assert fingerprint_strings(list(GOLDEN)).tolist() == list(GOLDEN.values())
    assert [_reference_fingerprint(text) for text in GOLDEN] == list(GOLDEN.values())
