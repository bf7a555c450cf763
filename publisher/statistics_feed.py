"""The statistics features serving reads, kept current from the batch files.

A full release, and every embeddings release while its chain serves a
pre-ranker, carries ``statistics.npz``: per item, per (user, category) and
per user, the hour and day counts (``freshtower.core.statistics``) of every
key that has any, as of ``as_of_ms``, the newest minute every partition
has closed. Each file is a complete snapshot (the service replaces what it
had; it never adds one to another), so a release is complete on its own
and a key absent from it reads 0.

``StatisticsFeed`` keeps the counters between releases and reads only the
statistics rows of batches it has not read before (a batch does not change
once its manifest exists), so a snapshot costs a directory listing, the
new batches' rows and the snapshot, not a day of files each time. The
snapshot's time is a whole minute, so a release takes one only when that
minute moved past the one served (at most one per minute of event time;
about 0.2 s and 13 MB at 330,000 keys, ``benchmarks/bench_statistics_feed.py``).
``statistics_snapshots`` is the same from scratch. A worker that restarts
writes some windows again (or removes a batch whose window now closed
empty); when a batch the feed counted changed or vanished, it counts
everything again from scratch, so its answer is always that of a fresh read.

How far a partition has closed: the later of its newest batch's window end
and its closed-windows marker (``read_closed_through``), so a partition
whose recent windows held nothing does not hold the snapshot back. The
snapshot's time never moves backwards (a partition seen for the first time
later starts at the feed's time).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freshtower.core.batches import list_batches
from freshtower.core.batches.layout import read_closed_through
from freshtower.core.batches.ranking import read_statistics_rows
from freshtower.core.eventtime import HOUR_MS, MINUTE_MS
from freshtower.core.statistics import CountsSnapshot, ItemStatistics, UserStatistics, item_count_deltas

STATISTICS_FILE = "statistics.npz"
_PARTS = ("items", "by_category", "by_user")
_DAYS_READ = 2  # day directories: the day window (up to 24 h) reaches into the day before


@dataclass(frozen=True)
class StatisticsSnapshots:
    as_of_ms: int
    items: CountsSnapshot  # keys: fingerprints of item IDs; counts (k, 2, 2)
    by_category: CountsSnapshot  # keys: user_category_keys; counts (k, 2, 2)
    by_user: CountsSnapshot  # keys: fingerprints of user IDs; counts (k, 2, 1)

    @property
    def keys(self) -> int:
        return sum(len(getattr(self, name).keys) for name in _PARTS)


def _digest(ref) -> str:
    """What a batch's statistics rows are, as far as a recount goes."""
    rows = ref.manifest.extras.get("statistics_rows") or {}
    return f"{ref.manifest.sha256}/{rows.get('sha256', '')}"


def _part_of(ref) -> str:
    stem = ref.manifest_path.stem
    return stem.rsplit("-", 1)[-1] if "-" in stem else ""


class StatisticsFeed:
    """The statistics of one batches directory, read incrementally."""

    def __init__(self, batches_dir: Path | str):
        self.batches_dir = Path(batches_dir)
        self._read: dict[str, dict[str, str]] = {}  # day directory -> manifest counted -> _digest
        self._closed: dict[str, int] = {}  # partition -> end of its closed windows (ms)
        self._items, self._users = ItemStatistics(), UserStatistics()
        self._as_of: int | None = None
        self.batches_read = 0
        self.recounts = 0  # times a counted batch changed or vanished and everything was read again

    def _days(self) -> list[str]:
        if not self.batches_dir.is_dir():
            return []
        return sorted(p.name for p in self.batches_dir.iterdir() if p.is_dir() and p.name[:1].isdigit())[-_DAYS_READ:]

    def _changed(self, listed: dict) -> bool:
        """Whether a batch counted before is gone or holds other records now."""
        for day, counted in self._read.items():
            if day not in listed:
                continue  # aged out of the directories read
            now = {str(ref.manifest_path): _digest(ref) for ref in listed[day]}
            if any(now.get(path) != digest for path, digest in counted.items()):
                return True
        return False

    def snapshot(self, newer_than_ms: int | None = None) -> StatisticsSnapshots | None:
        """The statistics as of the newest minute every partition has closed
        (None: no batch yet, or that minute is not after ``newer_than_ms``:
        the new batches are counted, the snapshot is not taken). A batch that cannot be read raises
        ``BatchFormatError`` naming it, and the feed starts again from
        scratch next time (it never skips the file)."""
        try:
            return self._snapshot(newer_than_ms)
        except BaseException:
            recounts = self.recounts
            self.__init__(self.batches_dir)
            self.recounts = recounts
            raise

    def _snapshot(self, newer_than_ms: int | None) -> StatisticsSnapshots | None:
        days = self._days()
        listed = {day: list_batches(self.batches_dir, day) for day in days}
        if self._changed(listed):
            recounts = self.recounts + 1
            self.__init__(self.batches_dir)
            self.recounts = recounts
        self._read = {day: self._read.get(day, {}) for day in days}  # older days are out of every window
        new = [ref for day in days for ref in listed[day] if str(ref.manifest_path) not in self._read[day]]
        for ref in new:
            part = _part_of(ref)
            self._closed[part] = max(self._closed.get(part, 0), ref.manifest.window_end_ms)
        if not self._closed:
            return None
        for part, closed_to in read_closed_through(self.batches_dir).items():
            part = part or ""
            if part in self._closed:  # a marker alone (no batch yet) says nothing about rows
                self._closed[part] = max(self._closed[part], closed_to)
        as_of = min(self._closed.values()) // MINUTE_MS * MINUTE_MS
        if self._as_of is not None:
            as_of = max(as_of, self._as_of)
        for ref in new:
            self._read[ref.manifest_path.parent.name][str(ref.manifest_path)] = _digest(ref)
            if ref.manifest.window_end_ms < as_of - 25 * HOUR_MS:
                continue  # out of every window (its rows are at most a join window older than its own)
            rows = read_statistics_rows(ref)
            if rows is not None:
                self._items.apply(item_count_deltas(rows))
                self._users.add(rows)
            self.batches_read += 1
        if newer_than_ms is not None and as_of <= newer_than_ms:
            return None
        by_category, by_user = self._users.snapshots(as_of)
        snapshots = StatisticsSnapshots(as_of, self._items.snapshot(as_of), by_category, by_user)
        self._items.advance(as_of)  # no later snapshot is older: drop what none reads
        self._users.advance(as_of)
        self._as_of = as_of
        return snapshots


def statistics_snapshots(batches_dir: Path | str) -> StatisticsSnapshots | None:
    """The statistics of ``batches_dir`` from scratch (None: no batch)."""
    return StatisticsFeed(batches_dir).snapshot()


def statistics_bytes(snapshots: StatisticsSnapshots) -> bytes:
    buffer = io.BytesIO()
    arrays = {}
    for name in _PARTS:
        snapshot: CountsSnapshot = getattr(snapshots, name)
        arrays[f"{name}_keys"], arrays[f"{name}_counts"] = snapshot.keys, snapshot.counts
    np.savez(buffer, as_of_ms=np.int64(snapshots.as_of_ms), **arrays)
    return buffer.getvalue()


def load_statistics(path: Path) -> StatisticsSnapshots:
    with np.load(path, allow_pickle=False) as npz:
        as_of = int(npz["as_of_ms"])
        parts = {name: CountsSnapshot(as_of, npz[f"{name}_keys"], npz[f"{name}_counts"]) for name in _PARTS}
    return StatisticsSnapshots(as_of, **parts)
