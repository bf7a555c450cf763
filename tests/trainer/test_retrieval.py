from __future__ import annotations

import numpy as np
import pytest
from freshtower.trainer.metrics import ranking_metrics
from freshtower.trainer.retrieval import ExactRetriever, IndexSettings, build_index, recall_against_exact


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_exact_retriever_returns_the_best_items_in_order():
    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    scores, indices = ExactRetriever(items).search(np.array([[1.0, 0.0]], dtype=np.float32), 2)
    # cosines with [1, 0]: 1.0, 0.0, 0.6 -> items 0, 2
    assert indices.tolist() == [[0, 2]]
    assert scores[0].tolist() == pytest.approx([1.0, 0.6])


def test_small_catalogues_use_exact_faiss_search_equal_to_the_oracle():
    items, queries = unit_vectors(2000, 16, 0), unit_vectors(50, 16, 1)
    index = build_index(items, IndexSettings(exact_below=10_000))
    assert index.kind == "IndexFlatIP"
    _, approximate = index.search(queries, 20)
    _, exact = ExactRetriever(items).search(queries, 20)
    assert recall_against_exact(approximate, exact) == 1.0


def test_hnsw_recall_against_the_exact_oracle():
    items, queries = unit_vectors(20_000, 32, 2), unit_vectors(100, 32, 3)
    index = build_index(items, IndexSettings(exact_below=1000, hnsw_m=16, hnsw_ef_search=128))
    assert index.kind == "hnsw"
    _, approximate = index.search(queries, 100)
    _, exact = ExactRetriever(items).search(queries, 100)
    assert recall_against_exact(approximate, exact) >= 0.95


def test_ranking_metrics_by_hand():
    retrieved = np.array([[3, 1, 2], [9, 8, 7]])
    # user 0 clicked {1, 5}: top-1 misses, top-3 finds 1 of 2; user 1 clicked {7}: found at rank 3
    metrics = ranking_metrics(retrieved, [{1, 5}, {7}], ks=(1, 3))
    assert metrics == {"recall@1": 0.0, "hitrate@1": 0.0, "recall@3": 0.75, "hitrate@3": 1.0}


@pytest.mark.parametrize("ef_search, k", [(16, 50), (128, 50), (8, 8)])
def test_search_one_answers_what_a_batch_search_answers(ef_search, k):
    # efSearch below k takes the per-call parameters (made once per k), at or above it the index's own
    items, queries = unit_vectors(3000, 16, 4), unit_vectors(20, 16, 5)
    index = build_index(items, IndexSettings(exact_below=1000, hnsw_m=8, hnsw_ef_search=ef_search))
    scores, indices = index.search(queries, k)
    for q, query in enumerate(queries):
        one_scores, one_indices = index.search_one(query, k)
        assert one_indices.tolist() == indices[q].tolist()
        np.testing.assert_array_equal(one_scores, scores[q])
    with pytest.raises(ValueError, match="query must have 16 values"):
        index.search_one(queries[0][:8], k)
