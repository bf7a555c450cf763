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
    # Part of stored state (frequency buckets): pinned.
    assert fingerprint_strings(["u1"]).tolist() == fingerprint_strings(["u1"]).tolist()
    assert fingerprint_strings(["ab", "abc"]).tolist()[0] != fingerprint_strings(["abc"]).tolist()[0]
