"""Pre-ranking latency on one core: the three-tower pre-ranker scoring 2,000
and 10,000 candidates of one user, with the item cache warm (every
candidate held) and cold (emptied before each request: the item tower runs
on every candidate), the time per stage, beside the two-tower dot product
over the same candidates (the cheap limit). Both keep the best ``--keep``
in order.

    python benchmarks/bench_prerank.py --items 200000 --requests 200

Every figure goes through the production code: ``PrerankScorer`` (feature
gathering: candidate fingerprints, the cache lookup and the statistics
gather and encoding; the user tower; the item tower on misses; the cross
tower; the upper layers; the sort), ``ItemTowerCache`` and the statistics
snapshots of ``ItemStatistics``/``UserStatistics`` over a seeded synthetic
day of interactions. The dot product is the two-tower model's user tower,
the candidates' fingerprint lookup, a gather of their item vectors, one
matrix-vector product and the same sort. The candidate lists are built
before timing (a service gets them parsed from the request).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from freshtower.publisher.item_cache import CatalogueItems, ItemTowerCache
from freshtower.publisher.prerank_scorer import STAGES, PrerankScorer, top_order
from freshtower.trainer.fingerprint_table import FingerprintTable
from freshtower.trainer.model import TwoTowerModel
from freshtower.trainer.prerank_model import ThreeTowerPreranker

from freshtower.core.fingerprints import fingerprint_strings
from freshtower.core.settings import ModelConfig, PrerankConfig, VocabularyConfig
from freshtower.core.statistics import FEATURE_NAMES, Interactions, ItemStatistics, UserStatistics, item_count_deltas

T = 1_795_132_800_000 + 12 * 3_600_000  # the requests' time: noon on a UTC day
USER_CATEGORICAL = ("age_bucket", "city", "device")


def world(args, model_config: ModelConfig, prerank: PrerankConfig):
    """The pre-ranker and the two-tower model over the same users and items, and a day of statistics."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    users = [f"u{k}" for k in range(args.users)]
    items = [f"i{k}" for k in range(args.items)]
    categories = [f"c{k}" for k in rng.integers(0, args.categories, args.items).tolist()]
    user_features = {"age_bucket": [f"a{k % 6}" for k in range(args.users)], "city": [f"city{k % 50}" for k in range(args.users)],
                     "device": [("ios", "android", "web")[k % 3] for k in range(args.users)]}
    models = []
    vocabulary = VocabularyConfig(user_min_count=1)
    for model in (ThreeTowerPreranker(model_config, prerank, vocabulary), TwoTowerModel(model_config, vocabulary)):
        model.observe_users(users, user_features, day=0)
        model.observe_items(items, {"category": categories}, day=0)
        model.catalogue.update(items, {"category": categories}, day=0)
        model.sync_tables()
        with torch.no_grad():
            for table, _ in model.table_vocabularies():
                table.normal_(0, 0.1)
        models.append(model.eval())
    # a day of interactions before T: popular items get most of them
    n = args.interactions
    popularity = rng.zipf(1.3, n) % args.items
    user_index = rng.integers(0, args.users, n)
    rows = Interactions([users[k] for k in user_index.tolist()], [items[k] for k in popularity.tolist()],
                        [categories[k] for k in popularity.tolist()], T - rng.integers(1, 24 * 3_600_000, n), rng.random(n) < 0.05)
    item_stats, user_stats = ItemStatistics(), UserStatistics()
    item_stats.apply(item_count_deltas(rows))
    user_stats.add(rows)
    return models[0], models[1], users, items, user_features, item_stats.snapshot(T), user_stats.snapshots(T)


def percentiles(seconds: list[float]) -> str:
    """p50 and p99, and the fastest request: on a shared machine the minimum is
    the cost without other processes taking the core."""
    ms = 1e3 * np.asarray(seconds)
    return f"p50 {np.percentile(ms, 50):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms  min {ms.min():6.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000, help="catalogue size")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--categories", type=int, default=50)
    parser.add_argument("--interactions", type=int, default=300_000, help="a day of impressions and clicks behind the statistics")
    parser.add_argument("--candidates", type=int, nargs="+", default=[2_000, 10_000])
    parser.add_argument("--requests", type=int, default=200, help="timed requests per setting (after --warmup)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--keep", type=int, default=500, help="candidates kept for the ranker (sorted); the rest are only scored")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_config, prerank = ModelConfig(), PrerankConfig()
    h1 = prerank.upper_hidden_dims[0]
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores{load}; torch {torch.__version__}, 1 thread")
    print(f"settings: items={args.items:,} users={args.users:,} categories={args.categories} interactions={args.interactions:,} "
          f"requests={args.requests} (+{args.warmup} warm-up dropped), keep the best {args.keep}")
    print(f"pre-ranker: user tower {list(prerank.user_hidden_dims)} -> {prerank.tower_dim}, item tower {list(prerank.item_hidden_dims)} -> "
          f"{prerank.tower_dim}, cross tower {len(FEATURE_NAMES)} -> {list(prerank.cross_hidden_dims)} -> {prerank.cross_dim}, "
          f"upper {list(prerank.upper_hidden_dims)} -> 1; item cache rows of {h1} floats")
    print(f"two-tower: towers {list(model_config.hidden_dims)} -> {model_config.output_dim}, dot product")
    started = time.perf_counter()
    preranker, two_tower, users, items, user_features, item_snapshot, user_snapshots = world(args, model_config, prerank)
    print(f"world built in {time.perf_counter() - started:.1f} s; item statistics for {len(item_snapshot.keys):,} items")

    catalogue_items = CatalogueItems(preranker)
    cache = ItemTowerCache(args.items, preranker.cold_item_row(), catalogue_items)
    started = time.perf_counter()
    held = cache.fill(*catalogue_items.everything())
    print(f"cache filled with {held:,} precomputed item rows in {time.perf_counter() - started:.1f} s")
    scorer = PrerankScorer(preranker, cache, item_snapshot, user_snapshots, max(args.candidates))
    item_vectors = two_tower.catalogue_vectors()  # (N, D) what a full release holds
    item_rows = FingerprintTable(2 * len(items))
    item_rows.put(fingerprint_strings(items), np.arange(len(items)))

    rng = np.random.default_rng(1)
    for n in args.candidates:
        total = args.warmup + args.requests
        requests = []
        for _ in range(total):
            user = int(rng.integers(0, len(users)))
            candidates = [items[k] for k in rng.choice(len(items), n, replace=False).tolist()]
            categorical = {name: [user_features[name][user]] for name in USER_CATEGORICAL}
            numeric = rng.normal(size=(1, len(model_config.user_numeric)))
            requests.append((users[user], categorical, numeric, candidates))
        print(f"\n{n:,} candidates")
        for state in ("warm", "cold"):
            if state == "warm" and len(cache) < args.items:
                cache.fill(*catalogue_items.everything())
            wall, stages = [], {s: [] for s in STAGES}
            for k, (user_id, categorical, numeric, candidates) in enumerate(requests):
                if state == "cold":
                    cache.clear()
                inputs = preranker.user_inputs([user_id], categorical, numeric)
                started = time.perf_counter()
                result = scorer.score(user_id, inputs, candidates, keep=args.keep)
                elapsed = time.perf_counter() - started
                if k >= args.warmup:
                    wall.append(elapsed)
                    for stage in STAGES:
                        stages[stage].append(result.seconds[stage])
            split = "  ".join(f"{s} {1e3 * np.median(stages[s]):.2f}" for s in STAGES)
            print(f"  three-tower, cache {state}: {percentiles(wall)}   (p50 per stage, ms: {split})")
        # the cheap limit: two-tower dot product over the same candidates
        wall, matmul = [], []
        for k, (user_id, categorical, numeric, candidates) in enumerate(requests):
            inputs = two_tower.user_inputs([user_id], categorical, numeric)
            started = time.perf_counter()
            with torch.no_grad():
                user_vector = two_tower.user_tower(inputs)[0]
            rows = item_rows.get(fingerprint_strings(candidates))
            rows[rows < 0] = 0
            before = time.perf_counter()
            scores = torch.mv(item_vectors[torch.from_numpy(rows)], user_vector).numpy()
            after = time.perf_counter()
            top_order(scores, args.keep)
            elapsed = time.perf_counter() - started
            if k >= args.warmup:
                wall.append(elapsed)
                matmul.append(after - before)
        print(f"  two-tower dot product:  {percentiles(wall)}   (gather + dot product alone p50 {1e3 * np.median(matmul):.2f} ms)")
    stats = cache.stats()
    print(f"\ncache: {stats.size:,} of {stats.capacity:,} held; hits {stats.hits:,}, misses {stats.misses:,}, "
          f"evictions {stats.evictions:,}")


if __name__ == "__main__":
    main()
