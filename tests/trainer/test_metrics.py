"""Ranking metrics against a brute-force oracle: the full ranking by a
stable sort, and recall / hit rate counted item by item."""

from __future__ import annotations

import numpy as np
import pytest
from freshtower.trainer.metrics import hits_per_unit, ranking_metrics, recall_per_unit, relevant_positions, top_k


def oracle_ranking(scores: np.ndarray) -> np.ndarray:
    """Every column of each row, best first, ties by lower column."""
    return np.array([sorted(range(len(row)), key=lambda c: (-row[c], c)) for row in scores.tolist()], dtype=np.int64)


def oracle_recall(ranking: list[int], relevant: set[int], k: int) -> float:
    if not relevant:
        return 0.0
    return sum(1 for item in ranking[:k] if item in relevant) / len(relevant)


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    units, items = int(rng.integers(1, 8)), int(rng.integers(1, 30))
    # few distinct values: many ties, also across the k-th place
    scores = rng.integers(0, 4, size=(units, items)).astype(np.float64)
    scores[rng.random((units, items)) < 0.1] = -np.inf  # excluded items
    relevant = [set(rng.choice(items + 3, size=int(rng.integers(0, 5)), replace=False).tolist()) for _ in range(units)]
    relevant = [{i if i < items else -(i - items + 2) for i in r} for r in relevant]  # some outside the catalogue
    return scores, relevant


@pytest.mark.parametrize("seed", range(200))
def test_top_k_equals_the_head_of_the_full_stable_ranking(seed):
    scores, _ = random_case(seed)
    ranking = oracle_ranking(scores)
    for k in (1, 2, 3, 5, scores.shape[1], scores.shape[1] + 4):
        assert top_k(scores, k).tolist() == ranking[:, :k].tolist(), (k, scores)


@pytest.mark.parametrize("seed", range(200))
def test_recall_and_hit_rate_equal_counting_item_by_item(seed):
    scores, relevant = random_case(seed)
    ranking = oracle_ranking(scores).tolist()
    ks = (1, 3, 10)
    retrieved = top_k(scores, max(ks))
    metrics = ranking_metrics(retrieved, relevant, ks)
    for k in ks:
        recall = [oracle_recall(r, wanted, k) for r, wanted in zip(ranking, relevant)]
        hits = [float(any(item in wanted for item in r[:k])) for r, wanted in zip(ranking, relevant)]
        assert recall_per_unit(retrieved, relevant, k).tolist() == pytest.approx(recall)
        assert hits_per_unit(retrieved, relevant, k).tolist() == hits
        assert metrics[f"recall@{k}"] == pytest.approx(np.mean(recall))
        assert metrics[f"hitrate@{k}"] == pytest.approx(np.mean(hits))


def test_ties_at_the_cut_go_to_the_lower_column():
    scores = np.array([[1.0, 2.0, 2.0, 2.0, 0.0]])
    # three columns tie for first; k=2 keeps the two lowest of them
    assert top_k(scores, 2).tolist() == [[1, 2]]
    assert top_k(scores, 4).tolist() == [[1, 2, 3, 0]]


def test_excluded_items_come_last_and_only_when_nothing_else_is_left():
    scores = np.array([[-np.inf, 0.5, -np.inf, 0.1]])
    assert top_k(scores, 3).tolist() == [[1, 3, 0]]


def test_an_item_outside_the_catalogue_counts_as_a_miss():
    # the unit wanted catalogue item 2 and two unknown items: one of three found
    relevant = [relevant_positions([2, -1, -1])]
    assert recall_per_unit(np.array([[2, 0]]), relevant, 2).tolist() == pytest.approx([1 / 3])


def test_units_without_relevant_items_count_zero_in_the_mean():
    # unit 0 finds 1 of 1, unit 1 has nothing relevant: mean recall 0.5
    assert ranking_metrics(np.array([[4], [5]]), [{4}, set()], ks=(1,)) == {"recall@1": 0.5, "hitrate@1": 0.5}


def test_mismatched_rows_are_refused():
    with pytest.raises(ValueError, match="2 retrieved rows for 1 relevant sets"):
        recall_per_unit(np.array([[1], [2]]), [{1}], 1)
