"""The full release's index at 1M items x 64: what the publisher chooses,
how long it takes to build, and its recall and latency beside exact search
measured in the same run.

    python benchmarks/bench_index.py                  # 1M items, the publisher's defaults (IVF-Flat at this size)
    python benchmarks/bench_index.py --with-hnsw      # also HNSW at the same size (~90 s or more to build)
    python benchmarks/bench_index.py --items 200000   # quicker, for iterating

Data (seeded) as in ``bench_recall.py``: unit vectors around 2,000 cluster
centres, the queries (user vectors) drawn the same way. The choice is
``publisher.index_choice.choose_index``, the code the publisher runs, with
the publisher's settings (``--recall-target`` overrides theirs). Exact
search is Faiss ``IndexFlatIP`` timed one query at a time, as serving
searches; recall is against the exact oracle the publisher checks with (Faiss ``IndexFlatIP``
over the check queries; the numpy matmul oracle is timed beside it).
The build limit is the 20 s a 1M-item full release may take here.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
from bench_recall import clustered_unit_vectors
from freshtower.publisher.index_choice import choose_index, exact_top_k, search_p99_ms
from freshtower.trainer.retrieval import ExactRetriever, FaissRetriever, ivf_list_count

from freshtower.core.settings import PublisherConfig

BUILD_LIMIT_S = 20.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--queries", type=int, default=200, help="check users (the publisher's index_check_queries)")
    parser.add_argument("--recall-target", type=float, default=None, help="default: the publisher's index_recall_target")
    parser.add_argument("--with-hnsw", action="store_true", help="also build HNSW at this size (the choice leaves it out above hnsw_max_items)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(args.clusters, args.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    items = clustered_unit_vectors(args.items, centres, args.spread, rng)
    queries = clustered_unit_vectors(args.queries, centres, args.spread, rng)
    config = PublisherConfig() if args.recall_target is None else PublisherConfig(index_recall_target=args.recall_target)
    print(f"{args.items:,} items x {args.dim}, {args.queries} check queries, k = 100, faiss threads {faiss.omp_get_max_threads()}")

    flat = faiss.IndexFlatIP(args.dim)
    flat.add(items)
    exact_p99 = search_p99_ms(FaissRetriever(flat), queries, 100)
    del flat

    started = time.perf_counter()
    numpy_truth = ExactRetriever(items, chunk=16).search(queries, 100)[1]
    numpy_s = time.perf_counter() - started
    started = time.perf_counter()
    faiss_truth = exact_top_k(items, queries, 100)
    faiss_s = time.perf_counter() - started
    agree = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(numpy_truth, faiss_truth)])
    print(f"exact oracle on the check queries: numpy matmul+argpartition {numpy_s:.2f} s, faiss IndexFlatIP {faiss_s:.2f} s "
          f"(the publisher's), top-100 agreement {agree:.4f}")

    lists = config.ivf_lists or ivf_list_count(args.items, config.ivf_train_per_list)
    started = time.perf_counter()
    bare = faiss.IndexIVFFlat(faiss.IndexFlatIP(args.dim), args.dim, lists, faiss.METRIC_INNER_PRODUCT)
    bare.cp.niter = config.ivf_train_iterations
    bare.train(items[: lists * config.ivf_train_per_list])
    train_s = time.perf_counter() - started
    bare.add(items)
    bare_s = time.perf_counter() - started
    del bare
    print(f"bare faiss IndexIVFFlat ({lists} lists, {config.ivf_train_iterations} k-means rounds on {lists * config.ivf_train_per_list:,} "
          f"vectors): train {train_s:.1f} s + add {bare_s - train_s:.1f} s = {bare_s:.1f} s (the nearest limit)")

    runs = [("publisher's choice", config)]
    if args.with_hnsw:
        runs.append(("HNSW alone", config.model_copy(update={"index_kinds": ("hnsw",)})))
    print(f"\n{'run':>20} {'kind':>5} {'build s':>8} {'limit s':>8} {'build/limit':>11} {'param':>13} {'recall@100':>10} "
          f"{'p99 ms':>7} {'exact p99':>9} {'choice s':>8}")
    for name, run_config in runs:
        started = time.perf_counter()
        choice = choose_index(items, queries, run_config, k=100, seed=args.seed)
        seconds = time.perf_counter() - started
        for candidate in choice.candidates:
            chosen = "*" if candidate.kind == choice.index.kind else " "
            print(
                f"{name:>20} {candidate.kind:>4}{chosen} {candidate.build_seconds:>8.1f} {BUILD_LIMIT_S:>8.0f} "
                f"{candidate.build_seconds / BUILD_LIMIT_S:>11.2f} {candidate.parameter + ' ' + str(candidate.value):>13} "
                f"{candidate.recall:>10.4f} {candidate.p99_ms:>7.3f} {exact_p99:>9.3f} {seconds:>8.1f}"
            )
        del choice
    print(f"\n* served; target recall@100 {config.index_recall_target} vs exact search; exact search p99 {exact_p99:.3f} ms one query at a time")


if __name__ == "__main__":
    main()
