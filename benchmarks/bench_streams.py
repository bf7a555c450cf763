"""Streams worker throughput: events/s through validation, join and
batching for one worker (a real ``freshtower streams`` process reading a
backlog from the broker), beside the raw aiokafka consume rate of the same
messages (the nearest limit) and the join + batching rate without Kafka.

    python benchmarks/bench_streams.py --events 300000 --compress 24

Traffic is the simulator's, with event time compressed ``--compress``
times (a day in an hour at 24: ~7,000 events per one-minute window for
100,000 requests a day) so that windows are as full as in a busy
production stream; the settings are the defaults unless given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec
from freshtower.streams.broker import LocalBroker
from freshtower.streams.replay import _topic_names, replay

from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.core.ports import free_port
from freshtower.core.settings import load_settings


def machine_report() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def busy_processes() -> str:
    """What else is using the CPU right now (shared, noisy machine)."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    top = [line.split(None, 1) for line in out.splitlines()[:6]]
    return ", ".join(f"{name.strip()} {pcpu}%" for pcpu, name in top if float(pcpu) >= 1.0) or "nothing above 1%"


def write_events(path: Path, world: SimulatorConfig, count: int, compress: int) -> int:
    simulator = Simulator(world)
    start = simulator.day_start_ms(0)
    n = 0
    with open(path, "wb") as handle:
        for topic, event in itertools.islice(simulator.events(0), count):
            event["ts"] = start + (event["ts"] - start) // compress
            handle.write(msgspec.json.encode({"topic": topic, "event": event}) + b"\n")
            n += 1
    return n


def raw_consume_rate(bootstrap: str, topics: list[str], total: int) -> float:
    """aiokafka, no group, every partition from the start: messages/s."""
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> float:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            seen = 0
            start = None
            while seen < total:
                batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
                if start is None and batches:
                    start = time.perf_counter()
                seen += sum(len(b) for b in batches.values())
            return seen / (time.perf_counter() - start)
        finally:
            await consumer.stop()

    return asyncio.run(run())


def core_rate(path: Path, settings) -> tuple[float, float, int, dict]:
    """Validation + join + batch files, no Kafka, doing what the worker
    does with the same events: each event on the input partition murmur2 of
    its key puts it on (as the producer does), one join core and one batch
    sink per partition (``PartitionedJoin``, ``BatchSink``, one shared
    encoder, ranking samples as configured), with the worker's
    garbage-collector settings. Returns events/s, events per CPU-second,
    batch files and the counts to compare with the worker's (records
    written, dead letters)."""
    from freshtower.streams.app import tune_gc
    from freshtower.streams.join import JoinSettings, RawEvent
    from freshtower.streams.partitions import PartitionedJoin
    from freshtower.streams.placement import Placement
    from freshtower.streams.ranking_samples import RankingSampleEmitter
    from freshtower.streams.sink import BatchSink, write_windows
    from freshtower.streams.topics import input_topics

    from freshtower.core.batches import RequestSharingEncoder
    from freshtower.core.frequency import FrequencyEstimator

    tune_gc()
    s = settings.streams
    kinds = input_topics(settings)
    join_settings = JoinSettings.from_config(s)
    placement = Placement(s.partitions)
    topic_of = _topic_names(settings)  # names in the log -> topic names, as the replay maps them
    events = []
    for n, line in enumerate(path.read_bytes().splitlines()):
        record = msgspec.json.decode(line)
        key = record["event"]["user_id"].encode()
        events.append(RawEvent(topic_of[record["topic"]], placement.partition(key), n, key, msgspec.json.encode(record["event"])))
    out = Path(tempfile.mkdtemp(prefix="bench-streams-core-"))
    f, p = settings.frequency, settings.prerank
    partitions = range(s.partitions)
    join = PartitionedJoin(join_settings, {}, {k: None for k in partitions}, kinds)
    encoder = RequestSharingEncoder()
    sinks = {
        k: BatchSink(
            out,
            "bench",
            FrequencyEstimator(f.buckets, f.hashes, f.alpha),
            partition=k,
            encoder=encoder,
            emitter=RankingSampleEmitter(p.category_feature, p.teacher_stage, join_settings.join_window_ms) if s.ranking_samples else None,
        )
        for k in partitions
    }
    assigned = {(topic, k) for topic in kinds for k in partitions}
    size = s.micro_batch_size
    windows = records = dead = 0
    now = int(time.time() * 1000)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(events), size):
        results = join.process(events[i : i + size], now, assigned, set())
        closed = [(sinks[k], window) for k, result in results for window in result.closed]
        write_windows(closed)  # as the worker does: a step's windows of every partition together
        dead += sum(len(result.dead_letters) for _, result in results)
        windows += len(closed)
        records += sum(len(window.samples) for _, window in closed)
        for core in join.cores.values():
            core.finalize()
            core.dirty.clear()  # the worker writes these to the changelog (not join + batching)
            core.deleted.clear()
    rate = len(events) / (time.perf_counter() - start)
    per_cpu = len(events) / (time.process_time() - cpu)
    shutil.rmtree(out, ignore_errors=True)
    return rate, per_cpu, windows, {"records": records, "dead_letters": dead}


def worker_env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHTOWER_")}
    env.update(
        FRESHTOWER_KAFKA=settings.kafka,
        FRESHTOWER_DATA_DIR=str(settings.data_dir),
        FRESHTOWER_STREAMS=settings.streams.model_dump_json(),
        FRESHTOWER_TOPICS=settings.topics.model_dump_json(),
        FRESHTOWER_FREQUENCY=settings.frequency.model_dump_json(),
    )
    return env


def stats(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
            return json.loads(response.read())
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profiled_pid(profiler_pid: int) -> int:
    """The worker py-spy started (its one child)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = open(f"/proc/{profiler_pid}/task/{profiler_pid}/children").read().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise SystemExit("py-spy did not start the worker")


def peak_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000, help="events to push through (a prefix of the simulated day)")
    parser.add_argument("--requests-per-day", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--compress", type=int, default=24, help="event time runs this many times faster than simulated (denser windows)")
    parser.add_argument("--micro-batch", type=int, default=None, help="streams.micro_batch_size (default: the setting's)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--profile", default=None, help="write a py-spy profile of the worker here (collapsed stacks; needs py-spy)")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    broker = None
    bootstrap = os.environ.get("FRESHTOWER_KAFKA")
    if not bootstrap:
        broker = LocalBroker(log_path=data_dir / "broker.log").start()
        bootstrap = broker.bootstrap
    run = f"bench-{int(time.time())}"
    streams = {"app_id": run, "web_port": free_port(), "idle_seconds": 3600.0}
    if args.micro_batch:
        streams["micro_batch_size"] = args.micro_batch
    topics = {"impressions": f"{run}-impressions", "clicks": f"{run}-clicks", "rank_logs": f"{run}-rank-logs"}
    topics |= {"dead_letters": f"{run}-dead-letters", "training_batches": f"{run}-training-batches"}
    settings = load_settings(kafka=bootstrap, data_dir=data_dir / "data", streams=streams, topics=topics)
    s = settings.streams
    world = SimulatorConfig(users=args.users, items=args.items, requests_per_day=args.requests_per_day, seed=0)
    print(f"machine: {machine_report()}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}; busy now: {busy_processes()}")
    print(f"broker: {'embedded Tansu (memory)' if broker else bootstrap}; worker: one process, event loop {s.event_loop}")
    print(
        f"settings: window {s.window_seconds:g} s, lateness {s.allowed_lateness_seconds:g} s, join window {s.join_window_seconds:g} s, "
        f"micro-batch up to {s.micro_batch_size}, {s.partitions} partitions per input topic, "
        f"commit every {s.commit_interval_seconds:g} s, frequency buckets {settings.frequency.buckets} x {settings.frequency.hashes}"
    )
    try:
        log = data_dir / "events.jsonl"
        start = time.perf_counter()
        total = write_events(log, world, args.events, args.compress)
        first_ts, last_ts = (
            msgspec.json.decode(line)["event"]["ts"] for line in (log.open("rb").readline(), log.read_bytes().splitlines()[-1])
        )
        minutes = (last_ts - first_ts) / 60_000
        print(
            f"traffic: simulator users={world.users} items={world.items} requests/day={world.requests_per_day}, time x{args.compress}: "
            f"{total:,} events over {minutes:.0f} min of event time, "
            f"~{total / max(minutes, 1) * s.window_seconds / 60:,.0f} events per window "
            f"(generated in {time.perf_counter() - start:.0f} s)"
        )
        start = time.perf_counter()
        replay(settings, log)
        print(f"produce (kafka-python, keyed, acks=all): {total / (time.perf_counter() - start):,.0f} events/s")
        t = settings.topics
        raw = raw_consume_rate(bootstrap, [t.impressions, t.clicks, t.rank_logs], total)
        print(f"raw aiokafka consume of the same messages: {raw:,.0f} messages/s")

        worker_log = open(data_dir / "worker.log", "wb")
        # py-spy samples the worker into collapsed stacks (one line per stack, then its sample count).
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        profiler = [spy, "record", "--rate", os.environ.get("BENCH_SPY_RATE", "50"), "--format", "raw", "-o", args.profile, "--"] if args.profile else []
        worker = subprocess.Popen(
            profiler + [sys.executable, "-m", "freshtower.app.cli", "--log-level", "info", "streams"],
            env=worker_env(settings),
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        pid = profiled_pid(worker.pid) if profiler else worker.pid
        try:
            deadline = time.monotonic() + args.timeout
            first = last = None
            while time.monotonic() < deadline and worker.poll() is None:
                now = stats(s.web_port)
                if now and now.get("ready") and now["events_in"] > 0:
                    if first is None:
                        first = (time.perf_counter(), now, cpu_seconds(pid))
                    last = (time.perf_counter(), now, cpu_seconds(pid))
                    if now["events_in"] >= total:
                        break
                time.sleep(0.2)
            if worker.poll() is not None or last is None or last[1]["events_in"] < total:
                raise SystemExit(f"worker did not finish: {last and last[1]} (log: {data_dir / 'worker.log'})")
            rss = peak_rss_mib(pid)
        finally:
            if profiler:  # the worker first: py-spy writes its profile once the worker has exited
                os.kill(pid, signal.SIGTERM)
                try:
                    worker.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
            worker_log.close()
        done = last[1]
        seconds = done["last_batch_at"] - done["first_batch_at"]  # the worker's own clock: first batch start to last batch end
        events, records = done["events_in"], done["records_out"]
        cpu_events = done["events_in"] - first[1]["events_in"]
        per_cpu = cpu_events / max(last[2] - first[2], 1e-9)
        print(
            f"worker: {events / seconds:,.0f} events/s through validation + join + batching ({events:,} events in {seconds:.1f} s; "
            f"{done['micro_batches']:,} micro-batches of {events / done['micro_batches']:,.0f} on average, "
            f"agent busy {done['busy_seconds'] / seconds:.0%}), "
            f"{records / seconds:,.0f} records/s written, {done['batches']} batch files, peak RSS {rss:,.0f} MiB, "
            f"open requests at the end {done['open_requests']:,}"
        )
        print(f"worker per CPU-second (all its threads; less sensitive to the machine's other load): {per_cpu:,.0f} events")
        rate, core_per_cpu, files, counts = core_rate(log, settings)
        per_second = f"{rate:,.0f} events/s, {core_per_cpu:,.0f} per CPU-second"
        print(
            f"join + batching without Kafka (same events and partitions, one process): {per_second}, {files} batch files, "
            f"{counts['records']:,} records, {counts['dead_letters']:,} dead letters (worker: {records:,} records, "
            f"{done['dead_letters']:,} dead letters)"
        )
        print(f"worker / join + batching without Kafka: {events / seconds / rate:.2f} (per CPU-second {per_cpu / core_per_cpu:.2f})")
        print(f"load average at end: {os.getloadavg()[0]:.2f}; busy now: {busy_processes()}")
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
