"""Evaluation time: Recall@K for many holdout users over a large item set,
exact search (the oracle) next to the Faiss index serving would build,
with the index's recall against exact.

    python benchmarks/bench_evaluation.py --users 20000 --items 200000 --dim 64
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np
from freshtower.trainer.metrics import ranking_metrics
from freshtower.trainer.retrieval import ExactRetriever, IndexSettings, build_index, recall_against_exact


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    print(f"settings: users={args.users} items={args.items} dim={args.dim} K up to {args.k}")
    rng = np.random.default_rng(0)
    # Clustered data, so that neighbours mean something.
    centres = unit(rng, 256, args.dim)
    items = centres[rng.integers(0, 256, args.items)] + 0.3 * unit(rng, args.items, args.dim)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    users = centres[rng.integers(0, 256, args.users)] + 0.3 * unit(rng, args.users, args.dim)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    relevant = [set(rng.integers(0, args.items, 3).tolist()) for _ in range(args.users)]

    started = time.perf_counter()
    _, exact = ExactRetriever(items).search(users, args.k)
    exact_seconds = time.perf_counter() - started
    metrics = ranking_metrics(exact, relevant, (50, 100, 200))
    print(f"exact search: {exact_seconds:.2f} s ({1e3 * exact_seconds / args.users:.3f} ms/user); metrics {metrics['recall@50']:.4f} ...")
    for ef in (64, 128, 256):
        settings = IndexSettings(exact_below=min(args.items, 100_000), hnsw_ef_search=ef)
        started = time.perf_counter()
        index = build_index(items, settings)
        build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        _, approximate = index.search(users, args.k)
        search_seconds = time.perf_counter() - started
        print(f"faiss {index.kind} efSearch={ef}: build {build_seconds:.1f} s, search {search_seconds:.2f} s "
              f"({1e3 * search_seconds / args.users:.3f} ms/user), recall@{args.k} vs exact {recall_against_exact(approximate, exact):.4f}")
        if index.kind != "hnsw":
            break
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
