"""Top-k retrieval over item vectors: an exact oracle and Faiss indexes.

All vectors are L2-normalised, so inner product is the cosine. As TFRS does
with ``BruteForce`` behind its ``TopK``, ``ExactRetriever`` is the oracle the
approximate index is tested against (``recall_against_exact``).

Index choice by catalogue size (``build_index``): exact inner-product search
(``IndexFlatIP``) below ``exact_below`` items, HNSW above (no training
pass, good recall at small ``efSearch``, incremental adds). ``build_hnsw``
and ``build_ivf`` (IVF-Flat: k-means lists, ``nprobe`` of them searched)
build one kind each; the publisher picks between them on measured recall
and latency (``publisher/index_choice.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np


class Retriever(Protocol):
    """Returns the k best items per query: (scores (Q, k), indices (Q, k))."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def __len__(self) -> int: ...


def _as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must have shape (Q, {dim}), got {queries.shape}")
    return queries


class ExactRetriever:
    """Brute-force inner product in numpy, chunked over queries (the oracle)."""

    def __init__(self, item_vectors: np.ndarray, chunk: int = 1024):
        self.vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self.chunk = chunk

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _as_queries(queries, self.vectors.shape[1])
        k_eff = min(k, len(self.vectors))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        indices = np.full((len(queries), k), -1, dtype=np.int64)
        for start in range(0, len(queries), self.chunk):
            block = queries[start : start + self.chunk] @ self.vectors.T  # (q, N)
            if k_eff < len(self.vectors):
                top = np.argpartition(-block, k_eff - 1, axis=1)[:, :k_eff]
            else:
                top = np.broadcast_to(np.arange(len(self.vectors)), block.shape).copy()
            top_scores = np.take_along_axis(block, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            indices[start : start + len(block), :k_eff] = np.take_along_axis(top, order, axis=1)
            scores[start : start + len(block), :k_eff] = np.take_along_axis(top_scores, order, axis=1)
        return scores, indices


@dataclass(frozen=True)
class IndexSettings:
    exact_below: int = 100_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128

    @classmethod
    def from_publisher(cls, publisher_config) -> "IndexSettings":
        return cls(
            publisher_config.exact_index_below,
            publisher_config.hnsw_m,
            publisher_config.hnsw_ef_construction,
            publisher_config.hnsw_ef_search,
        )


class FaissRetriever:
    """A Faiss inner-product index over the item vectors."""

    def __init__(self, index: faiss.Index):
        self.index = index
        self._params_by_k: dict[int, faiss.SearchParametersHNSW] = {}  # see _hnsw_params

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def kind(self) -> str:
        """"hnsw", "ivf", or the Faiss class name ("IndexFlatIP" for exact search)."""
        if isinstance(self.index, faiss.IndexHNSW):
            return "hnsw"
        if isinstance(self.index, faiss.IndexIVF):
            return "ivf"
        return type(self.index).__name__

    @property
    def search_parameter(self) -> tuple[str, int] | None:
        """("efSearch", value) for HNSW, ("nprobe", value) for IVF, None for exact search."""
        if isinstance(self.index, faiss.IndexHNSW):
            return "efSearch", int(self.index.hnsw.efSearch)
        if isinstance(self.index, faiss.IndexIVF):
            return "nprobe", int(self.index.nprobe)
        return None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _as_queries(queries, self.index.d)
        if isinstance(self.index, faiss.IndexHNSW) and self.index.hnsw.efSearch < k:
            # HNSW's candidate list must hold at least k items, or recall
            # collapses (0.68 at k=200 with efSearch=64 on our benchmark).
            scores, indices = self.index.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=k))
        else:
            scores, indices = self.index.search(queries, k)
        return scores, indices.astype(np.int64)

    def search_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One (d,) float32 query -> (k,) scores and (k,) int64 rows (-1 past
        the last item found): ``search`` for serving, where it runs once per
        request, without the checks and copies of a batch."""
        query = query.reshape(1, -1)
        if query.shape[1] != self.index.d:
            raise ValueError(f"query must have {self.index.d} values, got {query.shape[1]}")
        scores, rows = self.index.search(query, k, params=self._hnsw_params(k))  # (1, k) float32, (1, k) int64
        return scores[0], rows[0]

    def _hnsw_params(self, k: int):
        """HNSW's candidate list must hold at least k items (see ``search``);
        the search parameters for k are made once and kept."""
        if not isinstance(self.index, faiss.IndexHNSW) or self.index.hnsw.efSearch >= k:
            return None
        if k not in self._params_by_k:
            self._params_by_k[k] = faiss.SearchParametersHNSW(efSearch=k)
        return self._params_by_k[k]

    def set_ef_search(self, ef_search: int) -> None:
        if isinstance(self.index, faiss.IndexHNSW):
            self.index.hnsw.efSearch = ef_search
            self._params_by_k.clear()

    def set_nprobe(self, nprobe: int) -> None:
        """Lists an IVF index searches (the index keeps it, also when saved); other kinds ignore it."""
        if isinstance(self.index, faiss.IndexIVF):
            self.index.nprobe = min(nprobe, self.index.nlist)

    def save(self, path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path) -> "FaissRetriever":
        return cls(faiss.read_index(str(path)))


def build_index(item_vectors: np.ndarray, settings: IndexSettings = IndexSettings()) -> FaissRetriever:
    """Exact ``IndexFlatIP`` for small catalogues, HNSW above ``exact_below``."""
    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"item vectors must be 2-d, got shape {vectors.shape}")
    if len(vectors) < settings.exact_below:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return FaissRetriever(index)
    return build_hnsw(vectors, settings.hnsw_m, settings.hnsw_ef_construction, settings.hnsw_ef_search)


def _as_vectors(item_vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"item vectors must be 2-d and not empty, got shape {vectors.shape}")
    return vectors


def build_hnsw(item_vectors: np.ndarray, m: int, ef_construction: int, ef_search: int) -> FaissRetriever:
    """Faiss HNSW-Flat, inner product."""
    vectors = _as_vectors(item_vectors)
    index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = ef_search
    index.add(vectors)
    return FaissRetriever(index)


def ivf_list_count(items: int, train_per_list: int) -> int:
    """Lists for an IVF index over ``items`` vectors: the power of two nearest
    2 * sqrt(items) (the low end of Faiss's 1-16 * sqrt(N), for a quick build),
    with ``train_per_list`` training vectors for each.

    >>> ivf_list_count(1_000_000, 40), ivf_list_count(5_000, 40), ivf_list_count(10, 40)
    (2048, 64, 1)
    """
    target = 2 * np.sqrt(items)
    lists = 2 ** int(round(np.log2(max(target, 1.0))))
    while lists > 1 and lists * train_per_list > items:
        lists //= 2
    return lists


def build_ivf(
    item_vectors: np.ndarray, *, lists: int, nprobe: int, train_per_list: int, train_iterations: int, seed: int = 0
) -> FaissRetriever:
    """Faiss IVF-Flat, inner product: k-means (``train_iterations`` rounds) of a
    seeded sample of ``train_per_list`` vectors per list, then every vector added."""
    vectors = _as_vectors(item_vectors)
    dim = vectors.shape[1]
    if not 1 <= lists <= len(vectors):
        raise ValueError(f"an IVF index over {len(vectors)} vectors needs 1..{len(vectors)} lists, got {lists}")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = train_iterations
    index.cp.seed = seed
    train_items = lists * train_per_list
    index.cp.max_points_per_centroid = train_per_list + 1  # no second subsample inside Faiss
    if len(vectors) > train_items:
        sample = vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), train_items, replace=False))]
    else:
        sample = vectors
    index.train(sample)
    index.add(vectors)
    index.nprobe = min(nprobe, lists)
    return FaissRetriever(index)  # faiss's wrapper keeps the quantizer alive with the index


def recall_against_exact(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k that the approximate top-k also returned.

    >>> recall_against_exact(np.array([[1, 2, 9]]), np.array([[1, 2, 3]]))
    0.6666666666666666
    """
    k = exact.shape[1]
    hits = sum(len(set(a.tolist()) & set(e.tolist()) - {-1}) for a, e in zip(approximate, exact))
    return hits / (len(exact) * k)
