"""Closed windows to disk: the item-frequency update, its snapshot, the
batch file and manifest (``freshtower.core.batches.write_batch``: fsync + atomic
rename), and the announcement that goes on ``training-batches``.

Idempotent by construction: every path is a pure function of the window
and the input partition (``<HHMMSS>-p<k>``, one sink per partition), so a
restarted worker, or the worker a partition moved to, that closes a window
again replaces its files. A window that closed empty after a restart may
still have a file from the run that crashed (its records went elsewhere on
replay); such stale batches, recognised by this writer's ID in the
manifest, are deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from freshtower.streams.frequency_snapshots import load_snapshot, save_snapshot, snapshot_name
from freshtower.streams.join import ClosedWindow
from freshtower.streams.ranking_samples import RankingSampleEmitter

from freshtower.core.batches.ranking import read_statistics_rows, write_ranking_samples, write_statistics_rows
from freshtower.core.eventtime import HOUR_MS

from freshtower.core.batches import (
    BatchRef,
    RequestSharingEncoder,
    batch_stem,
    list_batches,
    publish_batches,
    window_stem,
    write_batch,
    write_closed_through,
)
from freshtower.core.frequency import FrequencyEstimator

log = logging.getLogger(__name__)


@dataclass
class SinkProgress:
    """What the sink must remember across restarts (kept in the progress table)."""

    frequency_window_ms: int | None = None  # window whose snapshot is the estimator's state
    frequency_step: int = 0


class BatchSink:
    """Writes the closed windows of one input partition as
    ``<HHMMSS>-p<partition>`` batches (``partition`` None: one unnamed batch
    per window, for a join over every partition)."""

    def __init__(
        self,
        batches_dir: Path,
        writer_id: str,
        estimator: FrequencyEstimator,
        stale_windows: set[int] | None = None,
        partition: int | None = None,
        encoder: RequestSharingEncoder | None = None,
        emitter: RankingSampleEmitter | None = None,
    ):
        self.batches_dir = Path(batches_dir)
        self.emitter = emitter  # ranking samples and statistics rows beside each batch (None: neither)
        self.writer_id = writer_id
        self.estimator = estimator
        self.stale_windows = stale_windows or set()
        self.partition = partition
        self.part = None if partition is None else f"p{partition}"
        self.progress = SinkProgress()
        self.encoder = encoder or RequestSharingEncoder()
        self.closed_to_ms: int | None = None  # the end of the closed windows last recorded on disk

    @classmethod
    def open(
        cls,
        batches_dir: Path,
        writer_id: str,
        new_estimator,
        progress: dict,
        open_from_ms: int | None,
        partition: int | None = None,
        written: dict[str, set[int]] | None = None,
        encoder: RequestSharingEncoder | None = None,
        emitter: RankingSampleEmitter | None = None,
    ) -> "BatchSink":
        """Resume: the estimator from the snapshot of the last window this
        writer closed for good, and the batches it may have to replace.
        ``written``: ``written_windows`` of the batches directory, when the
        caller opens several sinks at once."""
        batches_dir = Path(batches_dir)
        part = None if partition is None else f"p{partition}"
        window = progress.get("frequency_window_ms")
        if window is None:
            estimator = new_estimator()
        else:
            day, stem = batch_stem(window, part)
            path = batches_dir / day / snapshot_name(f"{stem}.tfrecord")
            estimator = load_snapshot(path)
            if estimator.step != progress.get("frequency_step", estimator.step):
                raise RuntimeError(f"{path}: estimator step {estimator.step} differs from the recorded {progress['frequency_step']}")
        if written is None:
            written = written_windows(batches_dir, open_from_ms)
        stale = {w for w in written.get(writer_id, ()) if open_from_ms is None or w >= open_from_ms}
        if emitter is not None and open_from_ms is not None:
            emitter.restore(_statistics_rows_before(batches_dir, part, open_from_ms))
        sink = cls(batches_dir, writer_id, estimator, stale, partition, encoder, emitter)
        sink.progress = SinkProgress(window, estimator.step)
        if sink.stale_windows:
            log.info("%d batches at or after the open window may be rewritten or removed", len(sink.stale_windows))
        return sink

    def write(self, window: ClosedWindow) -> dict:
        """Write one closed window; return its announcement."""
        return write_windows([(self, window)])[0]

    def _stage(self, window: ClosedWindow) -> BatchRef:
        """Everything of one window's batch but its manifest: the frequency
        update and snapshot, ranking samples, statistics rows and the batch
        file (each fsynced and renamed; the directory fsync and the manifest
        are ``publish_batches``')."""
        day, stem = batch_stem(window.start_ms, self.part)
        directory = self.batches_dir / day
        directory.mkdir(parents=True, exist_ok=True)
        batch_file = f"{stem}.tfrecord"
        self.estimator.update(window.clicked_item_ids)
        frequency_file = snapshot_name(batch_file)
        save_snapshot(self.estimator, directory / frequency_file, sync_directory=False)  # publish_batches syncs the directory
        extras = {"writer": self.writer_id, "frequency_state": frequency_file, "frequency_step": self.estimator.step}
        if self.partition is not None:
            extras["partition"] = self.partition
        if self.emitter is not None:
            # beside the batch, before its manifest: complete whenever the batch is
            emitted = self.emitter.emit(window)
            for key, entry in (
                ("ranking_samples", write_ranking_samples(directory, stem, emitted.samples)),
                ("statistics_rows", write_statistics_rows(directory, stem, emitted.rows)),
            ):
                if entry is not None:
                    extras[key] = entry
        return write_batch(
            self.batches_dir,
            window.start_ms,
            window.end_ms,
            window.samples,
            late_records=window.late_records,
            extras=extras,
            encode=self.encoder,
            part=self.part,
            publish=False,
        )

    def _written(self, ref: BatchRef) -> dict:
        """After ``ref`` is published: remember it; return its announcement."""
        m = ref.manifest
        day = ref.manifest_path.parent.name
        self.stale_windows.discard(m.window_start_ms)
        self.progress = SinkProgress(m.window_start_ms, m.extras["frequency_step"])
        announcement = {
            "path": f"{day}/{m.file}",
            "manifest": f"{day}/{ref.manifest_path.name}",
            "frequency_state": f"{day}/{m.extras['frequency_state']}",
            "frequency_step": m.extras["frequency_step"],
            "window_start_ms": m.window_start_ms,
            "window_end_ms": m.window_end_ms,
            "window_start": datetime.fromtimestamp(m.window_start_ms / 1000, tz=timezone.utc).isoformat(),
            "records": m.records,
            "positives": m.positives,
            "shown": m.shown,
            "late_records": m.late_records,
            "total_bytes": m.total_bytes,
            "sha256": m.sha256,
            "writer": self.writer_id,
        }
        if self.partition is not None:
            announcement["partition"] = self.partition
        return announcement

    def closed_through(self, closed_to_ms: int) -> None:
        """Record on disk that this writer's windows before ``closed_to_ms``
        are closed (``write_closed_through``), once per new end. A restarted
        writer records what it resumed from, which may be behind the marker
        it left: the windows in between are written again."""
        if closed_to_ms != self.closed_to_ms:
            write_closed_through(self.batches_dir, self.part, closed_to_ms)
            self.closed_to_ms = closed_to_ms

    def remove_stale(self, closed_from_ms: int | None, closed_to_ms: int) -> list[int]:
        """Delete this writer's leftover batches of windows in
        ``[closed_from_ms, closed_to_ms)`` that closed without records now."""
        removed = []
        for start in sorted(self.stale_windows):
            if start < closed_to_ms and (closed_from_ms is None or start >= closed_from_ms):
                day, stem = batch_stem(start, self.part)
                directory = self.batches_dir / day
                # Manifest first: without it the batch no longer exists for readers.
                names = (f"{stem}.json", f"{stem}.tfrecord", snapshot_name(f"{stem}.tfrecord"), f"{stem}.ranking.tfrecord", f"{stem}.stats.npz")
                for name in names:
                    (directory / name).unlink(missing_ok=True)
                removed.append(start)
                log.warning("removed stale batch %s/%s: its window closed empty after a restart", day, stem)
        self.stale_windows.difference_update(removed)
        return removed


def write_windows(windows: list[tuple[BatchSink, ClosedWindow]]) -> list[dict]:
    """Write closed windows, each by its sink (several sinks: the worker's
    partitions), in order; return their announcements. Every file of every
    batch is fsynced and renamed first, then ``publish_batches`` writes the
    manifests between two fsyncs of each day directory: two directory
    fsyncs for a window's batches of all partitions, not two per batch, and
    still no manifest durable before the files it names. A sink's windows
    must come in their order (its frequency estimator sees them so)."""
    staged = [(sink, sink._stage(window)) for sink, window in windows]
    publish_batches([ref for _, ref in staged])
    return [sink._written(ref) for sink, ref in staged]


def written_windows(batches_dir: Path, from_ms: int | None) -> dict[str, set[int]]:
    """Writer ID -> starts of the windows it has batches of, from the day
    of ``from_ms`` on (None: every day)."""
    batches_dir = Path(batches_dir)
    if not batches_dir.is_dir():
        return {}
    first_day = None if from_ms is None else window_stem(from_ms)[0]
    windows: dict[str, set[int]] = {}
    for day_dir in sorted(p for p in batches_dir.iterdir() if p.is_dir()):
        if first_day is not None and day_dir.name < first_day:
            continue
        for ref in list_batches(batches_dir, day_dir.name):
            writer = ref.manifest.extras.get("writer")
            if writer is not None:
                windows.setdefault(writer, set()).add(ref.window_start_ms)
    return windows


def _statistics_rows_before(batches_dir: Path, part: str | None, before_ms: int):
    """The statistics rows of ``part``'s batches in the day (and hour) before
    ``before_ms``, oldest first: what a restarted emitter counts again."""
    start = before_ms - 25 * HOUR_MS
    days = sorted({window_stem(start - start % 1000)[0], window_stem(before_ms - before_ms % 1000)[0]})
    suffix = "" if part is None else f"-{part}"
    for day in days:
        if not (batches_dir / day).is_dir():
            continue
        for ref in list_batches(batches_dir, day):
            if start <= ref.window_start_ms < before_ms and ref.manifest_path.stem.endswith(suffix):
                if part is None and "-" in ref.manifest_path.stem:
                    continue
                rows = read_statistics_rows(ref)
                if rows is not None:
                    yield rows
