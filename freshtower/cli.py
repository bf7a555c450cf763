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
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from freshtower.config import Settings, load_settings

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
) -> None:
    """Train the daily full model: the day's batches shuffled, one epoch, warm start."""
    from trainer.full import NoBatchesError, train_full
    from trainer.losses import NonFiniteLossError

    settings = _settings(ctx)
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
    metrics = result.metrics
    console.print(f"wrote full model [bold]{result.ref.version}[/bold] at {result.ref.path}")
    console.print(f"  {result.samples:,} samples in {result.train_seconds:.1f} s ({result.samples_per_second:,.0f} samples/s)")
    for search in ("exact", "faiss"):
        if search in metrics:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics[search].items())
            console.print(f"  holdout ({metrics['users']} users, {search}): {shown}")
    print(json.dumps({"version": result.ref.version, "path": str(result.ref.path), "metrics": metrics}, default=str))


@train_app.command("online")
def train_online_command(
    ctx: typer.Context,
    follow: bool = typer.Option(False, "--follow", help="Keep polling for new batches and full models until interrupted."),
    max_batches: Optional[int] = typer.Option(None, "--max-batches", help="Stop after this many batches."),
    poll_seconds: float = typer.Option(1.0, "--poll-seconds", help="How often to look for new batches with --follow."),
) -> None:
    """Follow the batches in event-time order, updating only user ID embeddings."""
    from trainer.online import MissingModelError, OnlineTrainer

    settings = _settings(ctx)
    try:
        trainer = OnlineTrainer.start(settings)
    except MissingModelError as error:
        console.print(f"[red]online trainer cannot start:[/red] {error}")
        raise typer.Exit(1)
    stopping = {"now": False}

    def stop(*_):
        stopping["now"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def on_batch(report) -> None:
        logging.getLogger("freshtower.online").info(
            "batch window_start_ms=%d samples=%d seconds=%.3f loss=%s", report.window_start_ms, report.samples, report.seconds, report.mean_loss
        )

    stats = trainer.run(follow=follow, poll_seconds=poll_seconds, max_batches=max_batches, should_stop=lambda: stopping["now"], on_batch=on_batch)
    rate = stats.samples / stats.train_seconds if stats.train_seconds else 0.0
    console.print(
        f"online trainer on {trainer.base.version}: {stats.batches} batches, {stats.samples:,} samples "
        f"({rate:,.0f} samples/s), position {trainer.next_window_ms}, step {trainer.step}"
    )


@app.command("broker")
def broker_command(ctx: typer.Context) -> None:
    """Run the embedded Kafka-protocol broker (Tansu) on 127.0.0.1 until Ctrl-C.

    In-memory storage: stopping it loses every topic (batches, checkpoints
    and releases live on disk and are not affected)."""
    import time

    from streams.broker import LocalBroker

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
    from streams.app import run_worker

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
) -> None:
    """Produce an event log into the Kafka topics in event-time order, keyed by user_id."""
    from streams.replay import ReplayError, replay

    settings = _settings(ctx)
    with _progress() as progress:
        task = progress.add_task("replaying events", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            counts = replay(settings, events, speedup=speedup or None, progress=on_progress)
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
    from freshtower.simulator import Simulator, SimulatorConfig

    if events is None and not batches:
        console.print("[red]nothing to do:[/red] pass --events FILE and/or --batches")
        raise typer.Exit(2)
    settings = _settings(ctx)
    simulator = Simulator(SimulatorConfig(users=users, items=items, requests_per_day=requests_per_day, seed=seed))
    if events is not None:
        counts = simulator.write_events(events, range(days))
        console.print(f"wrote {sum(counts.values()):,} events to {events}: {counts}")
    if batches:
        for day in range(days):
            refs = simulator.write_batches(settings.batches_dir, day, settings.streams.window_seconds)
            console.print(f"wrote {len(refs)} batches for {simulator.day_name(day)} under {settings.batches_dir}")


@app.command("run")
def run_command(
    ctx: typer.Context,
    days: int = typer.Option(3, "--days", min=2, help="Simulated days: full models on all but the last, online on the last."),
    users: int = typer.Option(2000, "--users"),
    items: int = typer.Option(1000, "--items"),
    requests_per_day: int = typer.Option(20000, "--requests-per-day"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Run the learning loop end to end on simulated traffic and summarise it.

    Today: batches come straight from the simulator (no Kafka yet), then
    daily full training and hour-by-hour online learning, each hour scored
    on the next hour's clicks."""
    from freshtower.run import run_offline
    from freshtower.simulator import Simulator, SimulatorConfig

    settings = _settings(ctx)
    simulator = Simulator(SimulatorConfig(users=users, items=items, requests_per_day=requests_per_day, seed=seed))
    console.print(f"data directory: {settings.data_dir.resolve()}")
    try:
        run_offline(settings, simulator, days, report=console.print)
    except FileExistsError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1)


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
