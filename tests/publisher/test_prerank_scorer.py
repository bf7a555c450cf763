from __future__ import annotations

import numpy as np
import pytest
import torch
from freshtower.publisher.item_cache import CatalogueItems, ItemTowerCache
from freshtower.publisher.prerank_scorer import STAGES, PrerankScorer, top_order

from freshtower.core.statistics import encode_statistics
from tests.publisher.prerank_world import PRERANK, T, category_of, small_model, statistics, user_inputs


def scorer_for(model, item_stats, user_stats, warm=True, max_candidates=50, **kwargs):
    items = CatalogueItems(model)
    cache = ItemTowerCache(100, model.cold_item_row(), items)
    if warm:
        cache.fill(*items.everything())
    return PrerankScorer(model, cache, item_stats.snapshot(T), user_stats.snapshots(T), max_candidates, **kwargs)


def oracle_logits(model, item_stats, user_stats, user, candidates):
    """The model's training forward pass on the same request, with the
    statistics counted by the stream's own classes as of T."""
    known = [c in model.catalogue for c in candidates]
    categories = [category_of(int(c[1:])) if k else "" for c, k in zip(candidates, known)]
    counts = np.hstack([item_stats.counts(candidates, T), user_stats.counts([f"u{user}"] * len(candidates), categories, T)])
    features = torch.from_numpy(encode_statistics(counts, PRERANK.ctr_prior, PRERANK.ctr_prior_strength))
    items = model.item_inputs(candidates, {"category": categories})
    with torch.no_grad():
        return model(user_inputs(model, user), items, features, request_of=torch.zeros(len(candidates), dtype=torch.long)).numpy()


@pytest.mark.parametrize("warm", [True, False])
def test_scores_equal_the_training_forward_pass_over_the_same_statistics(warm):
    model = small_model()
    item_stats, user_stats = statistics()
    scorer = scorer_for(model, item_stats, user_stats, warm=warm)
    rng = np.random.default_rng(0)
    for user in range(4):
        candidates = [f"i{k}" for k in rng.permutation(34)[:25].tolist()]  # i30..i33 are unknown to the model
        result = scorer.score(f"u{user}", user_inputs(model, user), candidates)
        expected = oracle_logits(model, item_stats, user_stats, user, candidates)
        assert np.allclose(result.logits, expected, atol=1e-5), np.abs(result.logits - expected).max()
        assert sorted(result.order.tolist()) == list(range(25)) and np.all(np.diff(result.logits[result.order]) <= 0)
        assert sorted(result.unknown_ids) == sorted(c for c in candidates if int(c[1:]) >= 30)
        assert result.statistics_as_of_ms == T


def test_the_statistics_reach_the_scores():
    # the same request with the statistics zeroed scores differently: the cross tower is in the path
    model = small_model()
    item_stats, user_stats = statistics()
    empty_items, empty_users = statistics(seed=1)
    with_counts = scorer_for(model, item_stats, user_stats).score("u1", user_inputs(model, 1), ["i1", "i2", "i3"])
    other_counts = scorer_for(model, empty_items, empty_users).score("u1", user_inputs(model, 1), ["i1", "i2", "i3"])
    assert not np.allclose(with_counts.logits, other_counts.logits, atol=1e-4)


def test_every_stage_is_timed_and_reported():
    model = small_model()
    item_stats, user_stats = statistics()
    seen = []
    scorer = scorer_for(model, item_stats, user_stats, warm=False, on_timing=lambda stage, s: seen.append(stage))
    result = scorer.score("u0", user_inputs(model, 0), ["i1", "i2", "nobody"])
    assert set(result.seconds) == set(STAGES) and all(s >= 0 for s in result.seconds.values())
    assert sorted(seen) == sorted(s for s in STAGES if s != "item_tower")  # the cache reports the item tower itself
    assert (result.hits, result.misses, result.unknown_ids) == (0, 2, ["nobody"])
    again = scorer.score("u0", user_inputs(model, 0), ["i1", "i2", "nobody"])
    assert (again.hits, again.misses) == (2, 0)
    assert np.array_equal(again.logits, result.logits)


def test_too_many_candidates_are_refused_and_none_is_fine():
    model = small_model()
    item_stats, user_stats = statistics()
    scorer = scorer_for(model, item_stats, user_stats, max_candidates=5)
    with pytest.raises(ValueError, match="6 candidates exceed the maximum of 5"):
        scorer.score("u0", user_inputs(model, 0), [f"i{k}" for k in range(6)])
    empty = scorer.score("u0", user_inputs(model, 0), [])
    assert empty.logits.shape == (0,) and empty.order.shape == (0,)


def test_keeping_the_best_cuts_a_full_stable_sort():
    rng = np.random.default_rng(5)
    for _ in range(50):
        scores = rng.integers(0, 6, rng.integers(1, 40)).astype(np.float32)  # many ties
        full = np.argsort(-scores, kind="stable")
        for keep in (0, 1, 3, len(scores) - 1, len(scores), len(scores) + 5):
            assert top_order(scores, keep).tolist() == full[: max(keep, 0)].tolist()
    model = small_model()
    item_stats, user_stats = statistics()
    candidates = [f"i{k}" for k in range(20)]
    result = scorer_for(model, item_stats, user_stats).score("u2", user_inputs(model, 2), candidates, keep=5)
    assert result.order.tolist() == np.argsort(-result.logits, kind="stable")[:5].tolist()
