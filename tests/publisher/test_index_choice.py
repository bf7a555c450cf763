"""The full release's index choice: IVF-Flat or HNSW, whichever meets the
recall target against exact search at the lowest single-query p99."""

from __future__ import annotations

import numpy as np
import pytest
from freshtower.publisher.index_choice import choose_index, ladder
from freshtower.publisher.publish import Publisher
from freshtower.trainer.retrieval import FaissRetriever

from freshtower.core.settings import PublisherConfig
from tests.publisher.conftest import publisher_settings

K = 100


def clustered(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    vectors = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=1 / np.sqrt(centres.shape[1]), size=(n, centres.shape[1]))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalogue():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(60, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return clustered(8_000, centres, rng), clustered(150, centres, rng)


def oracle_top_k(items: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top k by a full sort of every score: independent of the code under test."""
    return np.argsort(-(queries.astype(np.float64) @ items.T.astype(np.float64)), axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found.tolist(), truth.tolist())]))


def config(**overrides) -> PublisherConfig:
    base = {"exact_index_below": 1_000, "hnsw_m": 8, "hnsw_ef_construction": 40, "index_recall_target": 0.95}
    return PublisherConfig(**{**base, **overrides})


def test_the_chosen_index_meets_the_recall_target_against_exact_search_at_the_lowest_p99(catalogue, tmp_path):
    items, queries = catalogue
    choice = choose_index(items, queries, config(), k=K)
    assert {c.kind for c in choice.candidates} == {"ivf", "hnsw"}
    truth = oracle_top_k(items, queries, K)
    _, found = choice.index.search(queries, K)
    assert recall(found, truth) >= 0.95
    assert choice.recall == pytest.approx(recall(found, truth), abs=1e-9)
    chosen = next(c for c in choice.candidates if c.kind == choice.index.kind)
    assert chosen.meets_target and chosen.p99_ms == min(c.p99_ms for c in choice.candidates if c.meets_target)
    # The stored parameter is the smallest on its ladder meeting the target: one step down misses it.
    parameter, value = choice.index.search_parameter
    assert (parameter, value) == (chosen.parameter, chosen.value)
    if choice.index.kind == "ivf" and value > 1:
        choice.index.set_nprobe(value // 2)
        assert recall(choice.index.search(queries, K)[1], truth) < 0.95
        choice.index.set_nprobe(value)
    # What serving loads searches as the publisher measured.
    choice.index.save(tmp_path / "index.faiss")
    loaded = FaissRetriever.load(tmp_path / "index.faiss")
    assert loaded.search_parameter == (parameter, value)
    assert recall(loaded.search(queries, K)[1], truth) == pytest.approx(choice.recall)


def test_ivf_alone_finds_the_smallest_nprobe_that_meets_the_target(catalogue):
    items, queries = catalogue
    choice = choose_index(items, queries, config(index_kinds=("ivf",), ivf_lists=64), k=K)
    truth = oracle_top_k(items, queries, K)
    (candidate,) = choice.candidates
    assert candidate.kind == "ivf" and candidate.parameter == "nprobe" and candidate.meets_target
    assert choice.index.index.nlist == 64 and candidate.value in ladder(1, 128)
    assert recall(choice.index.search(queries, K)[1], truth) >= 0.95


def test_when_no_kind_meets_the_target_the_highest_recall_is_kept_and_says_so(catalogue):
    items, queries = catalogue
    choice = choose_index(items, queries, config(index_recall_target=1.0, ivf_lists=128, ivf_max_nprobe=1, hnsw_ef_search=8), k=K)
    assert not any(c.meets_target for c in choice.candidates)
    assert choice.recall == max(c.recall for c in choice.candidates) < 1.0


def test_hnsw_is_left_out_above_its_size_limit_unless_it_is_the_only_kind(catalogue):
    items, queries = catalogue
    assert [c.kind for c in choose_index(items, queries, config(hnsw_max_items=5_000), k=K).candidates] == ["ivf"]
    only = choose_index(items, queries, config(index_kinds=("hnsw",), hnsw_max_items=5_000), k=K)
    assert [c.kind for c in only.candidates] == ["hnsw"]


def test_small_catalogues_are_served_by_exact_search(catalogue):
    items, queries = catalogue
    choice = choose_index(items[:500], queries, config(), k=K)
    assert choice.index.kind == "IndexFlatIP" and choice.recall == 1.0 and choice.candidates == ()


def test_the_release_manifest_reports_the_choice(data_dir):
    settings = publisher_settings(data_dir, publisher={"exact_index_below": 100, "hnsw_m": 8, "index_recall_target": 0.9})
    with Publisher(settings) as publisher:
        outcome = publisher.publish_full_if_new(now_s=0.0)
        assert outcome.status == "published", outcome
        index = publisher.store.get(outcome.version).manifest.index
    assert {c.kind for c in index.candidates} == {"ivf", "hnsw"}
    chosen = next(c for c in index.candidates if c.kind == index.kind)
    assert chosen.meets_target and index.recall_at_100_vs_exact >= 0.9 and index.recall_target == 0.9
    assert (index.search_parameter, index.search_value) == (chosen.parameter, chosen.value)
    assert index.p99_ms == chosen.p99_ms and index.choice_settings["index_kinds"] == ["ivf", "hnsw"]


def test_the_exact_oracle_the_choice_checks_against_is_the_exact_top_k(catalogue):
    from freshtower.publisher.index_choice import exact_top_k

    items, queries = catalogue
    found = exact_top_k(items, queries, K)
    assert found.shape == (len(queries), K)
    assert recall(found, oracle_top_k(items, queries, K)) >= 0.999  # float32 BLAS vs float64 sort: ties at most
