"""The ``freshtower`` command: one entry point, a subcommand per component.

Each subcommand is a thin shell: it resolves the settings once (``--config``
TOML file + ``FRESHTOWER_*`` environment), calls the component, and prints
what happened. ``--help`` works on every level.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from freshtower.core.settings import Settings, load_settings

app = typer.Typer(help="Stream-processing online learning for two-tower retrieval.", no_args_is_help=True, add_completion=False)
train_app = typer.Typer(help="Train the model: the daily full refresh or the online follower.", no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console(stderr=True)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


@app.callback()
def _main(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML settings file (FRESHTOWER_* variables override it)."),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning or error."),
) -> None:
    _configure_logging(log_level)
    ctx.obj = load_settings(config)


def _settings(ctx: typer.Context) -> Settings:
    return ctx.find_root().obj


@train_app.command("full")
def train_full_command(
    ctx: typer.Context,
    day: str = typer.Option(..., "--day", help="The day to train on, YYYY-MM-DD (UTC), usually yesterday."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Random init instead of warm-starting from the previous full model."),
    workers: int = typer.Option(1, "--workers", min=1, help="Data-parallel processes (torch.distributed, gloo on 127.0.0.1)."),
) -> None:
    """Train the daily full model: the day's batches shuffled, one epoch, warm start."""
    from freshtower.trainer.full import NoBatchesError, train_full, train_full_parallel
    from freshtower.trainer.losses import NonFiniteLossError

    settings = _settings(ctx)
    if workers > 1:
        ref = train_full_parallel(settings, day, workers, from_scratch=from_scratch)
        metrics = ref.manifest.metrics
        console.print(f"wrote full model [bold]{ref.version}[/bold] with {workers} workers; holdout {metrics.get('exact')}")
        print(json.dumps({"version": ref.version, "path": str(ref.path), "metrics": metrics}, default=str))
        return
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = "reading batches (time order)" if phase == "read" else "training (shuffled, 1 epoch)"
                tasks[phase] = progress.add_task(label, total=total)
            progress.update(tasks[phase], completed=done, total=total)

        try:
            result = train_full(settings, day, from_scratch=from_scratch, progress=on_progress)
        except (NoBatchesError, NonFiniteLossError) as error:
            console.print(f"[red]full training stopped:[/red] {error}")
            raise typer.Exit(1)
    _print_full_model(result)


def _print_full_model(result) -> None:
    """A trained full model: what it learnt from and its holdout metrics (stderr), then one JSON line (stdout)."""
    metrics = result.metrics
    console.print(f"wrote full model [bold]{result.ref.version}[/bold] at {result.ref.path}")
    console.print(f"  {result.samples:,} samples in {result.train_seconds:.1f} s ({result.samples_per_second:,.0f} samples/s)")
    for search in ("exact", "faiss"):
        if search in metrics:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics[search].items())
            console.print(f"  holdout ({metrics['users']} users, {search}): {shown}")
    print(json.dumps({"version": result.ref.version, "path": str(result.ref.path), "metrics": metrics}, default=str))


@train_app.command("prerank")
def train_prerank_command(
    ctx: typer.Context,
    day: str = typer.Option(..., "--day", help="The day whose ranking samples to train on, YYYY-MM-DD (UTC)."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Random init instead of warm-starting from the previous pre-ranker."),
) -> None:
    """Train the three-tower pre-ranker on a day's ranking samples: shuffled, one epoch, warm start."""
    from freshtower.trainer.prerank_full import train_prerank_full

    result = train_prerank_full(_settings(ctx), day, from_scratch=from_scratch)
    if result is None:
        console.print(f"no ranking samples for {day} (a stream without rank logs): no pre-ranker trained")
        return
    _print_preranker(result)


def _print_preranker(result) -> None:
    metrics = {k: v for k, v in result.metrics.items() if k not in ("distillation", "expired")}
    console.print(
        f"wrote pre-ranker [bold]{result.ref.version}[/bold]: {result.requests:,} requests, {result.candidates:,} candidates "
        f"in {result.train_seconds:.1f} s"
    )
    print(json.dumps({"version": result.ref.version, "path": str(result.ref.path), "metrics": metrics}, default=str))


@train_app.command("online")
def train_online_command(
    ctx: typer.Context,
    follow: bool = typer.Option(False, "--follow", help="Keep polling for new batches and full models until interrupted."),
    max_batches: Optional[int] = typer.Option(None, "--max-batches", help="Stop after this many batches."),
    poll_seconds: Optional[float] = typer.Option(
        None, "--poll-seconds", help="With --follow: fallback listing interval (default training.online_poll_seconds); announcements wake it at once."
    ),
    partition: str = typer.Option("0/1", "--partition", help="k/n: learn only the users whose ID fingerprint is k mod n (scale-out)."),
) -> None:
    """Follow the batches in event-time order, updating only user ID embeddings."""
    from freshtower.trainer.online import MissingModelError

    from freshtower.app.parts import StopFlag, follow_online

    def on_batch(report) -> None:
        logging.getLogger("freshtower.online").info(
            "batch window_start_ms=%d samples=%d seconds=%.3f loss=%s", report.window_start_ms, report.samples, report.seconds, report.mean_loss
        )

    stopping = StopFlag().install()
    try:
        followed = follow_online(
            _settings(ctx), partition, follow=follow, poll_seconds=poll_seconds, max_batches=max_batches,
            should_stop=stopping, say=console.print, on_batch=on_batch,
        )
    except MissingModelError as error:
        console.print(f"[red]online trainer cannot start:[/red] {error}")
        raise typer.Exit(1)
    if followed is None:
        return  # stopped while waiting for the first full model
    trainer, stats = followed
    rate = stats.samples / stats.train_seconds if stats.train_seconds else 0.0
    console.print(
        f"online trainer on {trainer.base.version}: {stats.batches} batches, {stats.samples:,} samples "
        f"({rate:,.0f} samples/s), position {trainer.next_window_ms}, step {trainer.step}"
    )


@train_app.command("daily")
def train_daily_command(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="Train the days that are due now, then exit."),
    poll_seconds: float = typer.Option(5.0, "--poll-seconds"),
) -> None:
    """Run the daily full training whenever a day is complete (wall clock in
    production, event time with FRESHTOWER_TRAINING__FULL_CLOCK=event)."""
    from freshtower.trainer.full import train_full
    from freshtower.trainer.losses import NonFiniteLossError
    from freshtower.trainer.prerank_full import train_prerank_full
    from freshtower.trainer.schedule import DailyScheduler

    settings = _settings(ctx)
    scheduler = DailyScheduler(settings)
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stopping.update(now=True))

    def train(day: str) -> None:
        try:
            # the pre-ranker first: the publisher releases both once the full model lands
            preranker = train_prerank_full(settings, day)
            if preranker is not None:
                console.print(f"pre-ranker {preranker.ref.version}: {preranker.requests:,} requests")
            result = train_full(settings, day)
        except NonFiniteLossError as error:
            console.print(f"[red]full training for {day} stopped:[/red] {error}")
            raise typer.Exit(1)
        recall = result.metrics.get("exact", {}).get("recall@50", float("nan"))
        console.print(f"full model {result.ref.version}: {result.samples:,} samples, holdout Recall@50 {recall:.4f}")

    if once:
        scheduler.run_once(train)
    else:
        scheduler.run(train, should_stop=lambda: stopping["now"], poll_seconds=poll_seconds)


@app.command("prerank-experiment")
def prerank_experiment_command(
    ctx: typer.Context,
    seeds: int = typer.Option(3, "--seeds", min=1, help="Simulated worlds (seeds 0..n-1)."),
    requests_per_day: int = typer.Option(1000, "--requests-per-day", min=10),
    candidates: int = typer.Option(200, "--candidates", min=2, help="Candidates the ranker scores per request."),
    users: int = typer.Option(300, "--users", min=2),
    items: int = typer.Option(2000, "--items", min=10),
    pair_affinity: float = typer.Option(
        0.15, "--pair-affinity", min=0.0, help="Per-(user, item) click affinity the ranker sees and the towers cannot express."
    ),
    out: Path | None = typer.Option(None, "--out", help="Also write every seed's figures here (JSON)."),
) -> None:
    """Pre-ranking quality vs the ranker and clicks: three-tower arms and the two-tower model, over seeds."""
    from freshtower.app.prerank_experiment import run_prerank_experiment
    from freshtower.app.simulator import SimulatorConfig

    world = SimulatorConfig(
        users=users, items=items, requests_per_day=requests_per_day, candidates_per_request=candidates, pair_affinity=pair_affinity
    )
    result = run_prerank_experiment(list(range(seeds)), world, say=console.print)
    for line in result.table():
        print(line)
    for line in result.retrieval_table():
        print(line)
    if out is not None:
        out.write_text(json.dumps({"seeds": result.seeds, "prerank": result.per_seed, "retrieval": result.retrieval}, indent=1))


@app.command("broker")
def broker_command(ctx: typer.Context) -> None:
    """Run the embedded Kafka-protocol broker (Tansu) on 127.0.0.1 until Ctrl-C.

    In-memory storage: stopping it loses every topic (batches, checkpoints
    and releases live on disk and are not affected)."""
    from freshtower.streams.broker import LocalBroker

    settings = _settings(ctx)
    if settings.kafka:
        console.print(f"[red]FRESHTOWER_KAFKA is set ({settings.kafka}): use that broker, not the embedded one[/red]")
        raise typer.Exit(2)
    broker = LocalBroker(port=settings.broker_port).start()
    console.print(f"broker listening on {broker.bootstrap} (Ctrl-C stops it)")
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
    try:
        while not stopping["now"] and broker.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()


@app.command("streams")
def streams_command(ctx: typer.Context) -> None:
    """Run the streams worker (Faust): impressions, clicks and rank logs in,
    minute batches and announcements out, until SIGTERM / Ctrl-C.

    Connects to FRESHTOWER_KAFKA, else the embedded broker on
    127.0.0.1:broker_port (start it with `freshtower broker`). Metrics on
    http://127.0.0.1:<streams.web_port>/metrics."""
    from freshtower.streams.app import run_worker

    settings = _settings(ctx)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    run_worker(settings, loglevel=level)


@app.command("replay")
def replay_command(
    ctx: typer.Context,
    events: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL log, one {topic, event} a line (`simulate --events`)."),
    speedup: float = typer.Option(
        0.0, "--speedup", min=0.0, help="Event-time seconds per wall second (3600: an hour a second); 0: as fast as possible."
    ),
    file_order: bool = typer.Option(
        False, "--file-order", help="Send the lines in file order, out-of-order events as they are (default: sorted by event time)."
    ),
) -> None:
    """Produce an event log into the Kafka topics in event-time order (or file order), keyed by user_id."""
    from freshtower.streams.replay import ReplayError, replay

    settings = _settings(ctx)
    with _progress() as progress:
        task = progress.add_task("replaying events", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            counts = replay(settings, events, speedup=speedup or None, progress=on_progress, file_order=file_order)
        except ReplayError as error:
            console.print(f"[red]replay stopped:[/red] {error}")
            raise typer.Exit(1)
    for topic, count in sorted(counts.items()):
        console.print(f"  {topic:<20} {count:>10,}")
    print(json.dumps(counts))


@app.command("simulate")
def simulate_command(
    ctx: typer.Context,
    days: int = typer.Option(2, "--days", min=1, help="Days of traffic to generate."),
    events: Optional[Path] = typer.Option(None, "--events", help="Write the events as JSONL here (what `replay` sends to Kafka)."),
    batches: bool = typer.Option(False, "--batches", help="Write training batches directly (no Kafka) under the data directory."),
    users: int = typer.Option(2000, "--users"),
    items: int = typer.Option(1000, "--items"),
    requests_per_day: int = typer.Option(20000, "--requests-per-day"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate a seeded event stream with drifting user interests."""
    from freshtower.app.simulator import Simulator, SimulatorConfig

    if events is None and not batches:
        console.print("[red]nothing to do:[/red] pass --events FILE and/or --batches")
        raise typer.Exit(2)
    settings = _settings(ctx)
    simulator = Simulator(SimulatorConfig(users=users, items=items, requests_per_day=requests_per_day, seed=seed))
    if events is not None:
        counts = simulator.write_events(events, range(days))
        console.print(f"wrote {sum(counts.values()):,} events to {events}: {counts}")
    if batches:
        refs = simulator.write_batches(settings.batches_dir, range(days), settings.streams.window_seconds)
        console.print(f"wrote {len(refs)} batches for {days} day(s) from {simulator.day_name(0)} under {settings.batches_dir}")


@app.command("run")
def run_command(
    ctx: typer.Context,
    days: Optional[int] = typer.Option(
        None, "--days", min=1,
        help="Simulated days (default 3; MovieLens: the days its ratings are compressed into); "
        "with --events: the log's first days (default all).",
    ),
    users: int = typer.Option(2000, "--users", help="Simulated users."),
    items: int = typer.Option(1000, "--items", help="Simulated items."),
    requests_per_day: int = typer.Option(20000, "--requests-per-day", help="Simulated recommendation requests a day."),
    seed: int = typer.Option(0, "--seed", help="Simulator seed."),
    events: Optional[Path] = typer.Option(
        None, "--events", exists=True, dir_okay=False, help="Replay this JSONL log (`simulate --events` format) instead of the simulator."
    ),
    movielens: bool = typer.Option(False, "--movielens", help="Replay MovieLens-100k (needs `pip install --no-deps recbole==1.2.1`)."),
    speedup: float = typer.Option(
        1440.0, "--speedup", min=0.0, help="Event-time seconds per wall second (1440: a day a minute); 0: as fast as possible."
    ),
    settle_timeout: float = typer.Option(300.0, "--settle-timeout", min=1.0, help="Seconds the parts may take to finish after the replay."),
    durable_broker: bool = typer.Option(
        False, "--durable-broker", help="The embedded broker on an S3 server (moto) started beside it: a broker restart loses nothing."
    ),
    restart_parts: Optional[int] = typer.Option(
        None, "--restart-parts", min=0, help="Start a part that dies again, up to this many times a part (default: restart_parts, 0)."
    ),
) -> None:
    """Run the whole pipeline on this machine and summarise it: the embedded
    broker, the streams worker, the daily and online trainers, the publisher
    and the recall service, each its own process, fed an event log through
    Kafka. Ctrl-C stops every part."""
    from freshtower.app.pipeline import Pipeline, RunOptions

    if events is not None and movielens:
        console.print("[red]--events and --movielens exclude each other[/red]")
        raise typer.Exit(2)
    options = RunOptions(
        days=days,
        users=users,
        items=items,
        requests_per_day=requests_per_day,
        seed=seed,
        events=events,
        movielens=movielens,
        speedup=speedup,
        settle_timeout_seconds=settle_timeout,
    )
    settings = _settings(ctx)
    chosen = {"durable_broker": True} if durable_broker else {}
    if restart_parts is not None:
        chosen["restart_parts"] = restart_parts
    settings = settings.model_copy(update=chosen) if chosen else settings
    console.print(f"data directory: {settings.data_dir.resolve()}", soft_wrap=True, highlight=False)
    code = Pipeline(settings, options, console).run()
    if code:
        raise typer.Exit(code)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@app.command("experiment")
def experiment_command(
    ctx: typer.Context,
    out: Path = typer.Option(Path("freshtower-experiment"), "--out", help="Work directory: batches, models, results.json, recall.png."),
    data: str = typer.Option("simulator", "--data", help="simulator, movielens, both (simulator and MovieLens) or events (with --events)."),
    world: str = typer.Option(
        "large", "--world", help="The simulated world: large (20,000 items, K 50/200) or small (500 items, K 50/100)."
    ),
    seeds: int = typer.Option(5, "--seeds", min=1, help="Simulated worlds (seeds), each replayed by every arm."),
    first_seed: int = typer.Option(0, "--first-seed", min=0),
    events: Optional[Path] = typer.Option(
        None, "--events", exists=True, dir_okay=False,
        help="Your own log (`freshtower replay` JSONL), its features as configured in the model section.",
    ),
    days: Optional[int] = typer.Option(None, "--days", min=2, help="Simulated days (default: the world's); with --events: the first days."),
    movielens_days: int = typer.Option(60, "--movielens-days", min=2, help="MovieLens days replayed (from its first rating)."),
    users: Optional[int] = typer.Option(None, "--users", help="Simulated users at day 0 (default: the world's)."),
    items: Optional[int] = typer.Option(None, "--items", help="Simulated items at day 0 (default: the world's)."),
    requests_per_day: Optional[int] = typer.Option(None, "--requests-per-day"),
    through: str = typer.Option(
        "direct", "--through",
        help="direct: batches joined in process; kafka: events produced to the broker and joined by a real streams worker "
        "(the pipeline; always so for --events)",
    ),
    exclude_seen: bool = typer.Option(
        False, "--exclude-seen", help="Score recall without the items each user clicked in earlier hours (the usual MovieLens protocol)."
    ),
    new_item_vectors: Optional[bool] = typer.Option(
        None, "--new-item-vectors/--no-new-item-vectors",
        help="Online releases also serve the items first seen since their full model, as the publisher's embeddings releases do "
        "(default: the setting publisher.new_item_vectors, on unless configured off).",
    ),
    resamples: int = typer.Option(1000, "--resamples", min=100, help="Bootstrap resamples (MovieLens, --events)."),
    arms: str = typer.Option("main", "--arms", help="main: daily-full and full+inc/1min; all: also incremental and full+inc/30min."),
    jobs: int = typer.Option(
        2, "--jobs", min=1, help="Simulator seeds replayed at once, each in its own process (the cores shared out); 1: one after another."
    ),
) -> None:
    """The freshness experiment: daily-full only / incremental only / full +
    incremental published every 30 min / every 1 min, and the baselines
    (most popular over the last day and hour, random); next-hour Recall@K
    with 95% intervals, the cold-start split and click -> serving
    freshness, as tables and a PNG."""
    from freshtower.app.event_schema import SchemaMismatch
    from freshtower.app.experiment import ExperimentOptions, run_experiment
    from freshtower.app.supervisor import PartDied, Stalled

    try:
        options = ExperimentOptions(
            out=out, data=data, world=world, seeds=seeds, first_seed=first_seed, events=events, days=days, movielens_days=movielens_days,
            users=users, items=items, requests_per_day=requests_per_day, through=through, exclude_seen=exclude_seen,
            new_item_vectors=new_item_vectors, resamples=resamples, arms=arms, jobs=jobs,
        )
    except ValueError as error:
        console.print(str(error), style="red", markup=False, highlight=False)
        raise typer.Exit(2)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # a SIGTERM unwinds too: the broker and worker are stopped
    try:
        result = run_experiment(_settings(ctx), options, report=console.print)
    except (FileExistsError, SchemaMismatch) as error:
        console.print(str(error), style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except (PartDied, Stalled) as error:
        console.print(str(error), style="red", markup=False, highlight=False, soft_wrap=True)
        for line in _log_tail_lines(error):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    print(result.table)
    plotted = f", plot {result.plot_path}" if result.plot_path else " (no plot: pip install matplotlib)"
    console.print(f"results in {result.results_path}{plotted}; {result.seconds / 60:.1f} min in all")


def _log_tail_lines(error: Exception) -> list[str]:
    """A dead part's log tail, to print under its error."""
    if getattr(error, "log_path", None) is None:
        return []
    return [f"last lines of {error.log_path}:", *(f"  {line}" for line in error.tail)]


@app.command("publish")
def publish_command(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="One tick (full release if due, embeddings release if due), then exit."),
    force: bool = typer.Option(
        False, "--force", help="With --once: release the changed user rows even if not due (the end of a replayed log)."
    ),
    no_kafka: bool = typer.Option(False, "--no-kafka", help="Do not send rows to the user-embeddings topic."),
    max_releases: Optional[int] = typer.Option(None, "--max-releases", help="Stop after publishing this many releases."),
) -> None:
    """Publish releases: a full release after each full training, the changed
    user ID embeddings every publisher.publish_interval_seconds."""
    from freshtower.publisher.releases import ReleaseError

    from freshtower.app.parts import StopFlag, publish

    stopping = StopFlag() if once else StopFlag().install()
    outcomes = []

    def report(outcome) -> None:
        outcomes.append(outcome)
        colour = {"published": "green", "refused": "red", "skipped": "dim"}[outcome.status]
        what = f" {outcome.version} ({outcome.rows:,} user rows, {outcome.seconds:.2f} s)" if outcome.version else ""
        console.print(f"[{colour}]{outcome.kind} {outcome.status}[/{colour}]{what}: {outcome.reason}")

    try:
        publish(
            _settings(ctx), once=once, force=force, kafka=not no_kafka, max_releases=max_releases,
            should_stop=stopping, report=report, say=console.print,
        )
    except ReleaseError as error:
        console.print(f"[red]publisher stopped:[/red] {error}")
        raise typer.Exit(1)
    if once:
        print(json.dumps([o.__dict__ for o in outcomes]))
        if any(o.status == "refused" for o in outcomes):
            raise typer.Exit(1)


@app.command("serve")
def serve_command(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (default service.host, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default service.port)."),
) -> None:
    """Run the recall service (OpenAPI docs at /docs); it follows the active release without restarts."""
    import torch
    import uvicorn
    from freshtower.publisher.service import create_app, uvicorn_config

    settings = _settings(ctx)
    if settings.service.torch_threads:
        torch.set_num_threads(settings.service.torch_threads)
    host = host or settings.service.host
    port = port or settings.service.port
    store = settings.publisher.release_store or settings.releases_dir
    console.print(f"recall service on http://{host}:{port} (docs at /docs), releases from {store}")
    uvicorn.Server(uvicorn_config(create_app(settings), host, port)).run()


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
