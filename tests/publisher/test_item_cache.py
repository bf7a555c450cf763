from __future__ import annotations

import numpy as np
import pytest
import torch
from freshtower.publisher.item_cache import CatalogueItems, ItemTowerCache

from freshtower.core.fingerprints import fingerprint_strings
from tests.publisher.prerank_world import small_model

STRANGERS = ["stranger", "other", "nobody", "who"]  # IDs the model does not know


class CountingCompute:
    """``CatalogueItems`` that records every batch it is asked for."""

    def __init__(self, model):
        self.inner = CatalogueItems(model)
        names = list(model.catalogue.ids) + STRANGERS
        self.by_fingerprint = dict(zip(fingerprint_strings(names).tolist(), names))
        self.calls: list[list[str]] = []  # the IDs of each batch, sorted

    def __call__(self, fingerprints):
        self.calls.append(sorted(self.by_fingerprint[f] for f in fingerprints.tolist()))
        return self.inner(fingerprints)


def make_cache(capacity=64, items=30, **kwargs):
    model = small_model(items)
    compute = CountingCompute(model)
    return model, compute, ItemTowerCache(capacity, model.cold_item_row(), compute, **kwargs)


def lookup(cache, ids):
    out = torch.full((len(ids), cache.width), float("nan"))
    codes = np.full(len(ids), -1, dtype=np.int64)
    return cache.lookup(ids, out, codes), out, codes


def expected_rows(model, ids):
    """The oracle: the item tower on each item's catalogue features, the cold row for strangers."""
    rows, codes = [], []
    vocabulary = model.item_values["category"]
    for item_id in ids:
        if item_id in model.catalogue:
            index = model.catalogue.indices([item_id])
            rows.append(model.item_cache_rows(model.catalogue_inputs(index))[0])
            codes.append(vocabulary.row_of(model.catalogue.features_of(index)[0][0]))
        else:
            rows.append(model.cold_item_row())
            codes.append(0)
    return torch.stack(rows), codes


def test_a_filled_cache_serves_the_precomputed_rows_without_the_item_tower():
    model, compute, cache = make_cache()
    ids, rows, codes = compute.inner.everything()
    assert cache.fill(ids, rows, codes) == 30
    asked = ["i7", "i3", "i7", "i29"]
    result, out, got_codes = lookup(cache, asked)
    want_rows, want_codes = expected_rows(model, asked)
    assert torch.allclose(out, want_rows, atol=1e-6) and got_codes.tolist() == want_codes
    assert (result.hits, result.misses, result.cold, result.unknown_ids) == (4, 0, 0, [])
    assert compute.calls == []
    assert cache.fill(ids, rows, codes) == 0  # already held


def test_misses_go_through_the_item_tower_in_one_batch_and_are_kept():
    model, compute, cache = make_cache()
    asked = ["i5", "i1", "i5", "i2", "i1"]
    result, out, codes = lookup(cache, asked)
    assert compute.calls == [["i1", "i2", "i5"]]  # the distinct misses, in one batch
    assert (result.hits, result.misses, result.cold) == (0, 5, 0)
    want_rows, want_codes = expected_rows(model, asked)
    assert torch.allclose(out, want_rows, atol=1e-6) and codes.tolist() == want_codes
    result, out, _ = lookup(cache, ["i2", "i9"])
    assert compute.calls[-1] == ["i9"] and (result.hits, result.misses) == (1, 1)
    assert torch.allclose(out, expected_rows(model, ["i2", "i9"])[0], atol=1e-6)
    assert len(cache) == 4


def test_unknown_ids_are_scored_as_cold_items_reported_and_never_cached():
    model, compute, cache = make_cache()
    asked = ["i1", "stranger", "i2", "stranger", "other"]
    result, out, codes = lookup(cache, asked)
    assert result.unknown_ids == ["stranger", "other"]
    assert (result.hits, result.misses, result.cold) == (0, 2, 3)
    want_rows, want_codes = expected_rows(model, asked)
    assert torch.allclose(out, want_rows, atol=1e-6) and codes.tolist() == want_codes
    assert torch.allclose(out[1], model.cold_item_row())
    result, _, _ = lookup(cache, ["stranger"])
    assert compute.calls[-1] == ["stranger"] and result.unknown_ids == ["stranger"]  # asked again: a later catalogue may know it
    assert len(cache) == 2
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.cold) == (0, 2, 4) and stats.hit_rate == 0.0


def test_the_least_recently_used_are_evicted_and_the_size_stays_bounded():
    model, compute, cache = make_cache(capacity=16, items=40)
    ids = [f"i{k}" for k in range(16)]
    lookup(cache, ids)  # fills the cache
    lookup(cache, ids[8:])  # i8..i15 used again: i0..i7 are the least recent
    result, out, _ = lookup(cache, ["i20", "i21", "i22"])  # 3 more: at least capacity / 8 = 2 go, here 3
    assert len(cache) == 16 and cache.stats().evictions == 3
    result, _, _ = lookup(cache, ids[8:])
    assert result.hits == 8  # the recent ones stayed
    result, _, _ = lookup(cache, ids[:8])
    assert result.hits == 5 and result.misses == 3  # three of the old ones made room
    assert len(cache) <= 16


def test_a_request_larger_than_the_cache_is_still_scored_exactly():
    model, compute, cache = make_cache(capacity=4, items=40)
    asked = [f"i{k}" for k in range(12)] + ["nobody"]
    result, out, codes = lookup(cache, asked)
    want_rows, want_codes = expected_rows(model, asked)
    assert torch.allclose(out, want_rows, atol=1e-6) and codes.tolist() == want_codes
    assert len(cache) == 4 and (result.misses, result.cold) == (12, 1)


def test_the_item_tower_is_timed_with_the_given_clock():
    ticks = iter([10.0, 10.25])
    seen = []
    model, compute, cache = make_cache(clock=lambda: next(ticks), on_timing=lambda stage, s: seen.append((stage, s)))
    result, _, _ = lookup(cache, ["i1", "i2"])
    assert result.item_tower_seconds == 0.25 and seen == [("item_tower", 0.25)]
    assert cache.stats().item_tower_seconds == 0.25
    lookup(cache, ["i1"])  # all hits: the item tower does not run
    assert seen == [("item_tower", 0.25)] and cache.stats().hit_rate == pytest.approx(1 / 3)


def test_clear_forgets_items_but_keeps_the_cold_row():
    model, compute, cache = make_cache()
    lookup(cache, ["i1", "i2"])
    cache.clear()
    assert len(cache) == 0
    result, out, _ = lookup(cache, ["i1", "who"])
    assert result.misses == 1 and torch.allclose(out[1], model.cold_item_row())


def test_mismatched_buffers_and_fills_are_refused():
    model, compute, cache = make_cache()
    with pytest.raises(ValueError, match=r"needs out \(2, 9\)"):
        cache.lookup(["i1", "i2"], torch.empty(3, 9), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="do not match"):
        cache.fill(["i1"], torch.zeros(2, 9), np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ItemTowerCache(0, model.cold_item_row(), compute)
