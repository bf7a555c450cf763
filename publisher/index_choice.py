"""Which index a full release serves: measured, not assumed.

Below ``exact_index_below`` items the release serves exact search. Above
it, every kind in ``index_kinds`` (Faiss IVF-Flat, HNSW) is built from the
item vectors, and each is tuned on the check users' vectors (the queries
serving will see): the smallest search parameter on a doubling ladder
(IVF ``nprobe`` 1, 2, 4, ... up to ``ivf_max_nprobe``; HNSW ``efSearch``
from k up to ``hnsw_ef_search``) whose recall@k against exact search (the
oracle, computed once) reaches ``index_recall_target``. Each tuned
candidate's single-query search p99 is then timed, one query at a time as
the service searches, and the release keeps the candidate that meets the
target at the lowest p99 (none meets it: the one of highest recall, which
the publisher's ``min_index_recall`` check may still refuse). The manifest
records every candidate (``IndexSummary.candidates``).

HNSW is left out above ``hnsw_max_items`` unless it is the only kind
listed: its build grows with the catalogue (1M x 64 takes ~90 s on two
cores, IVF-Flat ~10 s), so a full release stays quick by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np
from freshtower.trainer.retrieval import FaissRetriever, build_hnsw, build_ivf, ivf_list_count, recall_against_exact

from freshtower.core.settings import PublisherConfig

TIMING_WARMUP = 10  # single-query searches run before the timed ones


@dataclass(frozen=True)
class Candidate:
    kind: str  # "ivf" or "hnsw"
    build_seconds: float
    parameter: str  # "nprobe" or "efSearch"
    value: int
    recall: float  # recall@k vs exact on the check queries
    p99_ms: float  # single-query search, one at a time
    meets_target: bool


@dataclass(frozen=True)
class IndexChoice:
    index: FaissRetriever
    recall: float  # of ``index`` at its stored parameter, vs exact on the check queries
    build_seconds: float  # of the chosen index alone
    choice_seconds: float  # exact search for the oracle, every candidate's build, tuning and timing
    p99_ms: float | None  # of the chosen one; None for exact search
    candidates: tuple[Candidate, ...]  # all built, the chosen one among them


def ladder(start: int, stop: int) -> list[int]:
    """Doubling values from ``start`` up to ``stop``, ``stop`` included.

    >>> ladder(1, 128), ladder(100, 256), ladder(300, 256)
    ([1, 2, 4, 8, 16, 32, 64, 128], [100, 200, 256], [256])
    """
    values, value = [], start
    while value < stop:
        values.append(value)
        value *= 2
    return values + [stop]


def search_p99_ms(index: FaissRetriever, queries: np.ndarray, k: int) -> float:
    """p99 of ``search_one`` over ``queries``, as the service calls it."""
    for query in queries[:TIMING_WARMUP]:
        index.search_one(query, k)
    times = []
    for query in queries:
        started = time.perf_counter()
        index.search_one(query, k)
        times.append(time.perf_counter() - started)
    return float(np.percentile(np.asarray(times) * 1000, 99))


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact top-k item ids of each query (the oracle): Faiss ``IndexFlatIP``,
    one BLAS pass over the items with a heap per query, in place of a numpy
    matmul and ``argpartition`` over every query x item score."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    _, found = flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return found


def candidate_kinds(config: PublisherConfig, items: int) -> list[str]:
    kinds = list(dict.fromkeys(config.index_kinds))
    if len(kinds) > 1 and items > config.hnsw_max_items:
        kinds = [kind for kind in kinds if kind != "hnsw"]
    return kinds


def _build(kind: str, vectors: np.ndarray, config: PublisherConfig, seed: int) -> FaissRetriever:
    if kind == "hnsw":
        return build_hnsw(vectors, config.hnsw_m, config.hnsw_ef_construction, config.hnsw_ef_search)
    lists = min(config.ivf_lists or ivf_list_count(len(vectors), config.ivf_train_per_list), len(vectors))
    return build_ivf(
        vectors, lists=lists, nprobe=config.ivf_max_nprobe, train_per_list=config.ivf_train_per_list,
        train_iterations=config.ivf_train_iterations, seed=seed,
    )


def _tune(kind: str, index: FaissRetriever, queries: np.ndarray, truth: np.ndarray, k: int, config: PublisherConfig) -> tuple[int, float]:
    """The smallest ladder value meeting the target (else the largest) and its recall; left set on ``index``."""
    if kind == "hnsw":
        values, apply = ladder(min(k, config.hnsw_ef_search), config.hnsw_ef_search), index.set_ef_search
    else:
        values, apply = ladder(1, min(config.ivf_max_nprobe, index.index.nlist)), index.set_nprobe
    for value in values:
        apply(value)
        _, found = index.search(queries, k)
        recall = recall_against_exact(found, truth)
        if recall >= config.index_recall_target:
            break
    return value, recall


def choose_index(item_vectors: np.ndarray, queries: np.ndarray, config: PublisherConfig, *, k: int = 100, seed: int = 0) -> IndexChoice:
    """Build, tune and time each candidate kind; keep the best (see the module's text)."""
    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    k = min(k, len(vectors))
    started = time.perf_counter()
    truth = exact_top_k(vectors, queries, k)
    if len(vectors) < config.exact_index_below:
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        index = FaissRetriever(flat)
        _, found = index.search(queries, k)
        seconds = time.perf_counter() - started
        return IndexChoice(index, recall_against_exact(found, truth), seconds, seconds, None, ())
    built: list[tuple[Candidate, FaissRetriever]] = []
    for kind in candidate_kinds(config, len(vectors)):
        build_started = time.perf_counter()
        index = _build(kind, vectors, config, seed)
        build_seconds = time.perf_counter() - build_started
        value, recall = _tune(kind, index, queries, truth, k, config)
        parameter, _ = index.search_parameter
        candidate = Candidate(
            kind, build_seconds, parameter, value, recall, search_p99_ms(index, queries, k), recall >= config.index_recall_target
        )
        built.append((candidate, index))
    meeting = [pair for pair in built if pair[0].meets_target]
    best, index = min(meeting, key=lambda pair: pair[0].p99_ms) if meeting else max(built, key=lambda pair: pair[0].recall)
    return IndexChoice(index, best.recall, best.build_seconds, time.perf_counter() - started, best.p99_ms, tuple(c for c, _ in built))
