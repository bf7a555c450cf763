"""What ``freshtower run`` knows about its parts, and what it says: the
observation it takes every half second, the completion rule, the status
line and the summary. Pure: ``freshtower/app/observation.py`` reads the disk, the
broker and the HTTP endpoints into these records.

Times: ``*_ms`` are event time, milliseconds since the epoch (UTC);
``*_seconds`` are wall seconds unless the name says event time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from freshtower.core.eventtime import DAY_SECONDS

# The parts, in pipeline order: the completion rule checks them in this
# order and names the first one that has not finished.
PARTS = ("broker", "streams", "train-daily", "train-online", "publish", "serve")


@dataclass(frozen=True)
class ActiveRelease:
    version: str
    kind: str  # full | embeddings
    model_version: str
    newest_click_ms: int  # newest click its embeddings learnt from (event time)
    checkpoint_event_time_ms: int


@dataclass(frozen=True)
class Settled:
    """Facts that only matter once the replay has ended (costlier to read:
    every batch manifest, the online checkpoint)."""

    streams_done_ms: int  # the watermark must reach this: the last label-0 windows are closed
    newest_batch_start_ms: int | None
    days_due: tuple[str, ...]  # days the daily trainer still owes
    servable_model: str | None  # newest full model the publisher has not refused
    servable_model_handled: bool  # released, or refused by the publisher
    checkpoint_base: str | None  # full model the online checkpoint follows
    checkpoint_newest_window_ms: int | None
    rows_pending: int  # changed user rows the active release does not hold
    rows_pending_due: bool  # ... and the publisher's own schedule says they are due
    serving: str | None  # what the recall service serves


@dataclass(frozen=True)
class Observation:
    elapsed_seconds: float
    events_sent: int
    events_total: int  # made so far
    events_total_known: bool  # False while the simulator is still making days
    replay_finished: bool
    newest_event_ms: int | None  # newest event replayed
    worker: dict | None  # the streams worker's /stats (None: not answering)
    full_models: tuple[str, ...]
    releases_full: int
    releases_embeddings: int
    active: ActiveRelease | None
    parts_alive: int
    parts_total: int
    settled: Settled | None = None
    streams_restarts: int = 0  # the worker was started again: its counters count from its restart


def progress(obs: Observation) -> tuple:
    """What changes while the run still moves: events read and written,
    batches, models, releases and the completion facts (not the clock)."""
    worker = obs.worker or {}
    figures = tuple(worker.get(k) for k in ("events_in", "records_out", "batches", "watermark_ms", "open_requests"))
    return (obs.events_sent, figures, obs.full_models, obs.releases_full, obs.releases_embeddings, repr(obs.settled))


def event_time(ms: int | None) -> str:
    """Event time as minutes, UTC.

    >>> event_time(1795132860000)
    '2026-11-20 00:01'
    """
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


def duration(seconds: float) -> str:
    """Wall seconds for people.

    >>> duration(75.4), duration(3725)
    ('1m 15s', '1h 02m 05s')
    """
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def freshness_seconds(obs: Observation) -> float | None:
    """Event-time seconds from the newest click the served embeddings learnt
    from to the newest event replayed (None before the first release)."""
    if obs.active is None or obs.newest_event_ms is None:
        return None
    return max(0.0, (obs.newest_event_ms - obs.active.newest_click_ms) / 1000)


def unfinished(obs: Observation) -> tuple[str, str] | None:
    """The first part (in pipeline order) that has not finished its share of
    the replay, and what it is waiting for; None when the run is complete.

    Complete means: every event was sent and read, the watermark has closed
    the last windows, every completed day has a full model, the online
    checkpoint follows the newest servable full model and holds the newest
    batch, the publisher has released that model and every changed row its
    own schedule says is due, and the service serves the active release.
    """
    if not obs.replay_finished:
        return "replay", f"{obs.events_sent:,} of {obs.events_total:,} events sent"
    s = obs.settled
    if s is None:
        return "streams", "not observed yet"
    worker = obs.worker
    if worker is None or not worker.get("ready"):
        return "streams", "the worker's /stats does not answer yet"
    # A restarted worker counts only what it read since (from the committed
    # offsets on): then the watermark below, which moves past the last
    # windows only once every partition is read to its end, is the test.
    if not obs.streams_restarts and worker["events_in"] < obs.events_total:
        return "streams", f"read {worker['events_in']:,} of {obs.events_total:,} events"
    watermark = worker.get("watermark_ms")
    if watermark is None or watermark < s.streams_done_ms:
        return "streams", f"watermark at {event_time(watermark)}, the last windows close at {event_time(s.streams_done_ms)}"
    if worker.get("open_requests", 0) > 0:
        return "streams", f"{worker['open_requests']:,} requests still open"
    if s.days_due:
        return "train-daily", f"day(s) {', '.join(s.days_due)} not trained yet"
    if s.servable_model is None:
        return "train-daily", "no full model"
    if s.checkpoint_base != s.servable_model:
        return "train-online", f"checkpoint follows {s.checkpoint_base}, the newest full model is {s.servable_model}"
    if s.newest_batch_start_ms is not None and (s.checkpoint_newest_window_ms or 0) < s.newest_batch_start_ms:
        return "train-online", (
            f"checkpoint holds batches up to {event_time(s.checkpoint_newest_window_ms)}, the newest starts {event_time(s.newest_batch_start_ms)}"
        )
    if not s.servable_model_handled or obs.active is None or obs.active.model_version != s.servable_model:
        return "publish", f"full model {s.servable_model} not released yet"
    if s.rows_pending and s.rows_pending_due:
        return "publish", f"{s.rows_pending:,} changed user rows are due and not released yet"
    if s.serving != obs.active.version:
        return "serve", f"serves {s.serving}, the active release is {obs.active.version}"
    return None


def status_line(obs: Observation) -> str:
    """One line: replay progress, batches, models, releases, freshness, parts."""
    worker = obs.worker or {}
    fresh = freshness_seconds(obs)
    parts = [
        f"[{duration(obs.elapsed_seconds)}]",
        f"events {obs.events_sent:,}/{obs.events_total:,}{'' if obs.events_total_known else '+'} ({event_time(obs.newest_event_ms)})",
        f"batches {worker.get('batches', 0):,}",
        f"full models {len(obs.full_models)}",
        f"releases {obs.releases_full} full + {obs.releases_embeddings} embeddings",
        f"freshness {'-' if fresh is None else f'{fresh:,.0f} s'}",
        f"parts {obs.parts_alive}/{obs.parts_total} up",
    ]
    return " | ".join(parts)


# --- the summary ----------------------------------------------------------------------


@dataclass(frozen=True)
class FullModelLine:
    version: str
    train_samples: int
    recall_at_50: float | None
    released_as: str | None  # release version, or None
    refused: str | None = None  # the publisher's reason


@dataclass(frozen=True)
class RecallSample:
    user_id: str
    items: list[tuple[str, float]]
    cold_start: bool
    releases: dict
    freshness: dict


@dataclass
class RunSummary:
    source: str
    wall_seconds: float
    replay_seconds: float
    speedup: float
    events_by_topic: dict[str, int]
    last_event_ms: int
    worker: dict
    batches: int
    batch_days: dict[str, int]
    records: int
    positives: int
    window_seconds: float
    full_models: list[FullModelLine]
    online: dict  # the online checkpoint's figures: batches, samples, rebases, base, step
    releases_full: int
    releases_embeddings: int
    active: ActiveRelease | None
    rows_not_due: int
    recall: RecallSample | None
    quality: list[str] = field(default_factory=list)  # optional lines (next-hour Recall@50)
    prerank: list[str] = field(default_factory=list)  # the served pre-ranker and one /v1/recommend answer
    logs_dir: str = ""
    restarts: dict[str, int] = field(default_factory=dict)  # parts that died and were started again, how often (broker included)


def render_summary(s: RunSummary) -> list[str]:
    """The summary as text lines (no markup)."""
    lines = []
    speed = "as fast as possible" if not s.speedup else f"speed-up {s.speedup:,.0f}: a day in {duration(DAY_SECONDS / s.speedup)}"
    total = sum(s.events_by_topic.values())
    lines.append(f"{s.source}: {total:,} events replayed in {duration(s.replay_seconds)} ({speed}); whole run {duration(s.wall_seconds)}")
    by_topic = ", ".join(f"{topic} {count:,}" for topic, count in sorted(s.events_by_topic.items()))
    w = s.worker
    dead = {k.split(".", 1)[1]: v for k, v in w.get("counters", {}).items() if k.startswith("dead_letters.") and v}
    dead_text = f"{w.get('dead_letters', 0):,}" + (f" ({', '.join(f'{k} {v:,}' for k, v in sorted(dead.items()))})" if dead else "")
    lines.append(f"  events     {by_topic}; dead letters {dead_text}; duplicates {w.get('duplicates', 0):,}")
    days = ", ".join(f"{day} {n:,}" for day, n in sorted(s.batch_days.items()))
    lines.append(
        f"  batches    {s.batches:,} of {s.window_seconds:g} s ({days}); {s.records:,} records, {s.positives:,} clicked; "
        f"join hit rate {w.get('join_hit_rate', 0):.4f}, late records {w.get('late_records', 0):,}"
    )
    for m in s.full_models:
        recall = "n/a" if m.recall_at_50 is None else f"{m.recall_at_50:.4f}"
        served = f"released as {m.released_as}" if m.released_as else (f"refused: {m.refused}" if m.refused else "not released")
        lines.append(f"  full model {m.version}: {m.train_samples:,} samples, holdout Recall@50 {recall}, {served}")
    o = s.online
    if o:
        lines.append(
            f"  online     {o.get('samples', 0):,} samples from {o.get('batches', 0):,} batches, {o.get('rebases', 0)} re-bases; "
            f"follows {o.get('base')}"
        )
    if s.active is not None:
        behind = (s.last_event_ms - s.active.newest_click_ms) / 1000
        lines.append(
            f"  releases   {s.releases_full} full + {s.releases_embeddings} embeddings; active {s.active.version} "
            f"(model {s.active.model_version}), newest click learnt {event_time(s.active.newest_click_ms)}, "
            f"{behind:,.0f} event-time s before the last event"
        )
    else:
        lines.append(f"  releases   {s.releases_full} full + {s.releases_embeddings} embeddings; none active")
    if s.rows_not_due:
        lines.append(
            f"             {s.rows_not_due:,} user rows learnt since are not due yet (publisher.publish_interval_seconds of event time)"
        )
    if s.recall is not None:
        r = s.recall
        top = ", ".join(f"{item} {score:.3f}" for item, score in r.items[:5])
        lines.append(
            f"  recall     user {r.user_id}{' (cold start)' if r.cold_start else ''}: {len(r.items)} items, top {top}; "
            f"releases {r.releases.get('full')} + {r.releases.get('embeddings')}; "
            + (
                f"user row learnt {event_time(t)}"
                if (t := r.freshness.get("user_embedding_event_time_ms"))
                else "user row as the full model left it"
            )
        )
    lines.extend(f"  {line}" for line in s.prerank)
    lines.extend(f"  {line}" for line in s.quality)
    if s.restarts:
        lines.append("  restarts   " + ", ".join(f"{name} {n}" for name, n in sorted(s.restarts.items())))
    if s.logs_dir:
        lines.append(f"  logs       {s.logs_dir}")
    return lines
