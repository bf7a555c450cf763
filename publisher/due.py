"""What the publisher would release now, and why: a pure function of what
it reads (the full model it would release, the release store's
activations and active release, the online checkpoints, the wall clock and
the settings). ``Publisher`` (``publish.py``) acts on it; ``freshtower
run`` asks ``what_is_due`` whether anything is left to publish instead of
re-deriving the rule.

- A full release is due when the full model was never released (no
  activation of a full release of it) and not refused (``full_release_due``).
- An embeddings release is due on top of the active release when the
  schedule says so (``delta_due``: every ``publish_interval_seconds`` of
  wall time, or of event time with ``clock = "event"``; at once after a
  full release) and user rows changed since the step the active release
  holds for each checkpoint (``rows_to_publish``). Only checkpoints that
  follow the active release's full model count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from freshtower.core.contracts import ReleaseManifest
from freshtower.core.contracts.online_checkpoint import OnlineCheckpoint
from freshtower.core.settings import PublisherConfig


def delta_due(clock: str, interval_s: float, *, now_s: float, last_release_s: float, newest_event_ms: int, last_event_ms: int) -> bool:
    """Is an embeddings release due? Wall clock: ``interval_s`` seconds since
    the active release was created. Event clock (replays): the checkpoint's
    newest event time is ``interval_s`` past the one the active release saw.

    >>> delta_due("wall", 1800, now_s=2000.0, last_release_s=100.0, newest_event_ms=0, last_event_ms=0)
    True
    >>> delta_due("event", 60, now_s=0.0, last_release_s=0.0, newest_event_ms=119_000, last_event_ms=60_000)
    False
    """
    if clock == "wall":
        return now_s - last_release_s >= interval_s
    if clock == "event":
        return newest_event_ms - last_event_ms >= interval_s * 1000
    raise ValueError(f"publisher.clock must be 'wall' or 'event', got {clock!r}")


def rows_to_publish(row_updated_step: np.ndarray, row_ids: list[str], since_step: int, resync: bool = False) -> np.ndarray:
    """Rows to put in an embeddings release: changed after ``since_step``
    (every row on a resync), never the shared default row 0 nor a free row.

    >>> rows_to_publish(np.array([0, 5, 2, 7, 9]), ["", "u1", "u2", "", "u4"], since_step=2).tolist()
    [1, 4]
    """
    candidates = np.arange(len(row_ids)) if resync else np.flatnonzero(row_updated_step > since_step)
    return np.asarray([r for r in candidates.tolist() if r != 0 and row_ids[r]], dtype=np.int64)


@dataclass(frozen=True)
class FullReleaseDue:
    """Whether the full model named is still to be released, and why."""

    due: bool
    reason: str
    model_version: str | None


def full_release_due(model_version: str | None, *, activations: Sequence[Mapping], refused: str | None) -> FullReleaseDue:
    """Is a full release of ``model_version`` (the publisher: the one LATEST
    names) due? Not if there is none, if it was released before (an
    activation of a full release of it), or if it was refused (``refused``: why).

    >>> full_release_due("2026-11-21.1", activations=[], refused=None).due
    True
    >>> full_release_due("2026-11-21.1", activations=[{"kind": "full", "model_version": "2026-11-21.1",
    ...     "version": "00000003-full"}], refused=None).reason
    'full model 2026-11-21.1 was released as 00000003-full'
    """
    if model_version is None:
        return FullReleaseDue(False, "no full model yet", None)
    released = [e["version"] for e in activations if e.get("kind") == "full" and e.get("model_version") == model_version]
    if released:
        return FullReleaseDue(False, f"full model {model_version} was released as {released[0]}", model_version)
    if refused is not None:
        return FullReleaseDue(False, f"full model {model_version} was refused: {refused}", model_version)
    return FullReleaseDue(True, f"full model {model_version} was never released", model_version)


@dataclass(frozen=True)
class CheckpointRows:
    """What an embeddings release would take from one online checkpoint."""

    checkpoint: OnlineCheckpoint
    since: int  # the step the active release holds this checkpoint's rows at
    rows: np.ndarray  # (n,) int64 rows changed since then (``rows_to_publish``)

    @property
    def resync(self) -> bool:
        """The trainer restarted from its base: every row goes out."""
        return self.checkpoint.step < self.since


@dataclass(frozen=True)
class EmbeddingsReleaseDue:
    """Whether an embeddings release is due on top of the active release,
    what it would hold, and why."""

    scheduled: bool  # the schedule says one is due (``delta_due``; at once after a full release)
    reason: str
    taken: dict[str, CheckpointRows] = field(default_factory=dict)  # checkpoints following the active release's model
    elsewhere: tuple[str, ...] = ()  # "<name> follows full model <v>" for the others

    @property
    def rows(self) -> int:
        """Changed user rows the active release does not hold."""
        return sum(len(t.rows) for t in self.taken.values())

    @property
    def due(self) -> bool:
        """Scheduled, and there are rows to release."""
        return self.scheduled and self.rows > 0

    def summary(self) -> dict:
        """Per checkpoint taken: its step, the step released, rows, when written."""
        return {
            name: {"step": t.checkpoint.step, "since": t.since, "rows": len(t.rows), "written_at": t.checkpoint.written_at}
            for name, t in self.taken.items()
        }


def embeddings_release_due(
    active: ReleaseManifest | None, checkpoints: Mapping[str, OnlineCheckpoint], *, now_s: float, config: PublisherConfig
) -> EmbeddingsReleaseDue:
    """Is an embeddings release due on top of ``active``, from the online
    ``checkpoints`` (file name -> checkpoint), at wall time ``now_s``?
    Only checkpoints that follow the active release's full model count
    (rows trained on another full model live in another embedding space)."""
    if active is None:
        return EmbeddingsReleaseDue(False, "no active release: a full release comes first")
    if not checkpoints:
        return EmbeddingsReleaseDue(False, "no online checkpoint")
    taken, elsewhere = {}, []
    for name, checkpoint in sorted(checkpoints.items()):
        if checkpoint.base_version != active.model_version:
            elsewhere.append(f"{name} follows full model {checkpoint.base_version}")
            continue
        since = int(active.online_steps.get(name, 0))
        rows = rows_to_publish(checkpoint.row_updated_step.numpy(), checkpoint.user_ids.row_ids, since, checkpoint.step < since)
        taken[name] = CheckpointRows(checkpoint, since, rows)
    if not taken:
        return EmbeddingsReleaseDue(
            False,
            f"{'; '.join(elsewhere)}, the active release {active.version} serves {active.model_version}; "
            "no embeddings release until they match",
            elsewhere=tuple(elsewhere),
        )
    scheduled = active.kind == "full" or delta_due(
        config.clock,
        config.publish_interval_seconds,
        now_s=now_s,
        last_release_s=active.created_at,
        newest_event_ms=max(t.checkpoint.newest_event_time_ms for t in taken.values()),
        last_event_ms=active.checkpoint_event_time_ms,
    )
    due = EmbeddingsReleaseDue(scheduled, "", taken, tuple(elsewhere))
    if not scheduled:
        reason = f"not due ({config.clock} clock, every {config.publish_interval_seconds:g} s)"
    elif not due.rows:
        reason = f"no user rows changed since the active release ({due.summary()})"
    else:
        reason = f"{due.rows} user rows changed since the active release {active.version}"
    return EmbeddingsReleaseDue(scheduled, reason, taken, tuple(elsewhere))


@dataclass(frozen=True)
class Due:
    """What the publisher would do now, and why."""

    full: FullReleaseDue
    embeddings: EmbeddingsReleaseDue


def what_is_due(
    *,
    model_version: str | None,
    model_refused: str | None,
    activations: Sequence[Mapping],
    active: ReleaseManifest | None,
    checkpoints: Mapping[str, OnlineCheckpoint],
    now_s: float,
    config: PublisherConfig,
) -> Due:
    """The publisher's decision as a pure function of what it reads: the
    full model it would release (``model_refused``: why it was refused, if
    it was), the store's activations and active release, the online
    checkpoints, and the wall clock (seconds). The publisher acts on its
    parts; ``freshtower run`` asks it whether anything is left to publish."""
    return Due(
        full_release_due(model_version, activations=activations, refused=model_refused),
        embeddings_release_due(active, checkpoints, now_s=now_s, config=config),
    )
