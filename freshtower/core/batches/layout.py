"""Batches on disk: ``<batches_dir>/<YYYY-MM-DD>/<HHMMSS>[-p<k>].tfrecord``
with its JSON manifest beside it, written last (a batch without one is
incomplete and ignored); the listing readers poll.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from freshtower.core.batches.encode import encode_sample
from freshtower.core.batches.framing import frame_record
from freshtower.core.batches.schema import FORMAT_VERSION, BatchFormatError, Sample
from freshtower.core.storage import atomic_write_bytes, fsync_dir, sha256_bytes, writing


@dataclass(frozen=True)
class BatchManifest:
    """What a batch holds; written beside the file and announced on Kafka."""

    file: str  # file name, relative to the manifest's directory
    window_start_ms: int
    window_end_ms: int
    records: int
    positives: int
    shown: int
    positive_bytes: int  # byte length of the clicked section at the file start
    total_bytes: int
    sha256: str
    min_event_time_ms: int | None
    max_event_time_ms: int | None
    late_records: int = 0
    extras: dict = field(default_factory=dict)  # e.g. frequency-estimator state file
    format: int = FORMAT_VERSION
    positive_sha256: str | None = None  # of the clicked section alone (absent in older manifests)

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "file": self.file,
            "window_start_ms": self.window_start_ms,
            "window_end_ms": self.window_end_ms,
            "records": self.records,
            "positives": self.positives,
            "shown": self.shown,
            "positive_bytes": self.positive_bytes,
            "total_bytes": self.total_bytes,
            "sha256": self.sha256,
            "positive_sha256": self.positive_sha256,
            "min_event_time_ms": self.min_event_time_ms,
            "max_event_time_ms": self.max_event_time_ms,
            "late_records": self.late_records,
            "extras": self.extras,
        }

    @classmethod
    def from_json(cls, data: Mapping, where: Path | str = "<manifest>") -> "BatchManifest":
        try:
            if data["format"] != FORMAT_VERSION:
                raise BatchFormatError(where, None, f"unsupported batch format {data['format']!r}")
            file = str(data["file"])
            if "/" in file or "\\" in file or file.startswith("."):
                raise BatchFormatError(where, None, f"manifest names a file outside its directory: {file!r}")
            return cls(
                file=file,
                window_start_ms=int(data["window_start_ms"]),
                window_end_ms=int(data["window_end_ms"]),
                records=int(data["records"]),
                positives=int(data["positives"]),
                shown=int(data["shown"]),
                positive_bytes=int(data["positive_bytes"]),
                total_bytes=int(data["total_bytes"]),
                sha256=str(data["sha256"]),
                positive_sha256=None if data.get("positive_sha256") is None else str(data["positive_sha256"]),
                min_event_time_ms=None if data["min_event_time_ms"] is None else int(data["min_event_time_ms"]),
                max_event_time_ms=None if data["max_event_time_ms"] is None else int(data["max_event_time_ms"]),
                late_records=int(data.get("late_records", 0)),
                extras=dict(data.get("extras", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, BatchFormatError):
                raise
            raise BatchFormatError(where, None, f"malformed manifest: {error!r}") from error


@dataclass(frozen=True)
class BatchRef:
    """A complete batch on disk: its manifest and where it lives."""

    manifest_path: Path
    manifest: BatchManifest

    @property
    def path(self) -> Path:
        return self.manifest_path.parent / self.manifest.file

    @property
    def window_start_ms(self) -> int:
        return self.manifest.window_start_ms


def batch_stem(window_start_ms: int, part: str | None = None) -> tuple[str, str]:
    """(day directory, file stem) of the batch of ``part`` (None: the
    window's only batch) for a window starting at ``window_start_ms``.

    >>> batch_stem(1_700_000_040_000, "p3")
    ('2023-11-14', '221400-p3')
    """
    day, stem = window_stem(window_start_ms)
    if part is None:
        return day, stem
    if not part.isalnum():
        raise ValueError(f"batch part {part!r} must be letters and digits")
    return day, f"{stem}-{part}"


def window_stem(window_start_ms: int) -> tuple[str, str]:
    """(day directory, file stem) for a window starting at ``window_start_ms`` UTC.

    >>> window_stem(1_700_000_040_000)
    ('2023-11-14', '221400')
    """
    if window_start_ms % 1000:
        raise ValueError(f"window start {window_start_ms} ms is not on a whole second")
    start = datetime.fromtimestamp(window_start_ms / 1000, tz=timezone.utc)
    return start.strftime("%Y-%m-%d"), start.strftime("%H%M%S")


def write_batch(
    batches_dir: Path,
    window_start_ms: int,
    window_end_ms: int,
    samples: Iterable[Sample],
    *,
    late_records: int = 0,
    extras: Mapping | None = None,
    encode=encode_sample,
    part: str | None = None,
    publish: bool = True,
) -> BatchRef:
    """Write one window's samples as a batch file plus manifest, atomically.

    The path is a pure function of the window (and ``part``, see
    ``batch_stem``), so writing the same window again (a restarted worker)
    replaces the batch instead of adding a copy.
    Clicked samples go first, in event-time order, then the shown ones.
    ``encode`` turns a sample into Example bytes (``encode_sample``, or a
    ``RequestSharingEncoder`` in the streams worker).

    ``publish`` False writes the data file only (durable once its directory
    is synced) and leaves the manifest to ``publish_batches``, which does
    it for several batches with one pair of directory fsyncs; until then
    the batch is incomplete, as after a crash.
    """
    samples = list(samples)
    positives = sorted((s for s in samples if s.label == 1), key=lambda s: (s.event_time_ms, s.request_id, s.item_id))
    shown = sorted((s for s in samples if s.label != 1), key=lambda s: (s.event_time_ms, s.request_id, s.item_id))
    positive_frames = b"".join(frame_record(encode(s)) for s in positives)
    shown_frames = b"".join(frame_record(encode(s)) for s in shown)
    data = positive_frames + shown_frames

    day, stem = batch_stem(window_start_ms, part)
    directory = Path(batches_dir) / day
    directory.mkdir(parents=True, exist_ok=True)
    times = [s.event_time_ms for s in samples]
    manifest = BatchManifest(
        file=f"{stem}.tfrecord",
        window_start_ms=int(window_start_ms),
        window_end_ms=int(window_end_ms),
        records=len(samples),
        positives=len(positives),
        shown=len(shown),
        positive_bytes=len(positive_frames),
        total_bytes=len(data),
        sha256=sha256_bytes(data),
        positive_sha256=sha256_bytes(positive_frames),
        min_event_time_ms=min(times) if times else None,
        max_event_time_ms=max(times) if times else None,
        late_records=late_records,
        extras=dict(extras or {}),
    )
    atomic_write_bytes(directory / manifest.file, data, sync_directory=False)  # publish_batches syncs the directory
    ref = BatchRef(directory / f"{stem}.json", manifest)
    if publish:
        publish_batches([ref])
    return ref


def publish_batches(refs: Iterable[BatchRef]) -> None:
    """Make batches whose data files are written (``write_batch(...,
    publish=False)``) complete: one fsync of each of their directories makes
    the data files' renames durable (and those of any file written beside
    them), then each manifest is written (fsync + rename), then a second
    fsync of each directory makes the manifests durable. A manifest is
    therefore never durable before its data file, and a window's batches of
    every partition cost two directory fsyncs, not two each."""
    refs = list(refs)
    directories = sorted({ref.manifest_path.parent for ref in refs})
    for directory in directories:
        with writing(directory):
            fsync_dir(directory)
    for ref in refs:
        atomic_write_bytes(ref.manifest_path, json.dumps(ref.manifest.to_json(), sort_keys=True).encode(), sync_directory=False)
    for directory in directories:
        with writing(directory):
            fsync_dir(directory)


def load_manifest(manifest_path: Path | str) -> BatchRef:
    manifest_path = Path(manifest_path)
    try:
        data = json.loads(manifest_path.read_bytes())
    except (OSError, json.JSONDecodeError) as error:
        raise BatchFormatError(manifest_path, None, f"unreadable manifest: {error}") from error
    return BatchRef(manifest_path, BatchManifest.from_json(data, manifest_path))


# Readers poll the listing (the online trainer every second, the daily
# scheduler, `freshtower run`), and parsing every manifest each time costs
# ~0.1 ms a manifest: 0.3 s a call after two days of one-minute batches. A
# manifest is written once and replaced only by an atomic rename (a new
# inode), so a parsed one is reused while its inode, size and mtime hold.
_MANIFEST_CACHE: dict[str, tuple[tuple[int, int, int], BatchRef]] = {}
_MANIFEST_CACHE_LIMIT = 500_000  # entries (~1 KB each); cleared when full


def _load_manifest_cached(name: str) -> BatchRef:
    try:
        st = os.stat(name)
    except OSError:
        return load_manifest(name)  # raises with the file named
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _MANIFEST_CACHE.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    ref = load_manifest(name)  # replaced since the stat: the next call misses and reads it again
    if len(_MANIFEST_CACHE) >= _MANIFEST_CACHE_LIMIT:
        _MANIFEST_CACHE.clear()
    _MANIFEST_CACHE[name] = (key, ref)
    return ref


def list_batches(batches_dir: Path | str, day: str | None = None) -> list[BatchRef]:
    """Complete batches (those with a manifest), in window order (a
    window's parts by name).

    ``day`` (``YYYY-MM-DD``) limits the listing to one day's directory.
    """
    root = Path(batches_dir)
    if day is not None:
        datetime.strptime(day, "%Y-%m-%d")  # a day, not a path
        directories = [root / day]
    else:
        directories = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    refs = []
    for directory in directories:
        if not directory.is_dir():
            continue
        prefix = os.path.join(directory, "")
        for name in sorted(n for n in os.listdir(directory) if n.endswith(".json") and n[:1].isdigit()):
            refs.append(_load_manifest_cached(prefix + name))
    refs.sort(key=lambda r: r.window_start_ms)
    return refs




# --- how far each writer has closed its windows ----------------------------------------
#
# A batch exists only for a window with records, so the newest batch on disk
# says how far the *busiest* partition got, not the others: under load one
# partition's windows close minutes of event time after another's, and a
# reader that takes the newest batch as "event time now" (the daily
# scheduler on a replay) trains a day before the lagging partitions' batches
# of its last minutes exist. Each writer therefore records, beside the day
# directories, the end of the windows it has closed (with or without
# records): ``<batches_dir>/closed-<part>.json`` (``closed.json`` for an
# unnamed writer). A window before that point will not get a batch from it.


def _closed_path(batches_dir: Path | str, part: str | None) -> Path:
    if part is not None and not (part[:1] == "p" and part[1:].isdigit()):
        raise ValueError(f"batch part must be p<k>, got {part!r}")  # it becomes a file name
    return Path(batches_dir) / ("closed.json" if part is None else f"closed-{part}.json")


def write_closed_through(batches_dir: Path | str, part: str | None, closed_to_ms: int) -> None:
    """Record that ``part``'s windows before ``closed_to_ms`` are closed.
    Not synced to the directory: a marker lost in a crash is behind, never ahead."""
    record = {"part": part, "closed_to_ms": int(closed_to_ms)}
    Path(batches_dir).mkdir(parents=True, exist_ok=True)  # windows may close before any batch is written
    atomic_write_bytes(_closed_path(batches_dir, part), json.dumps(record).encode(), sync_directory=False)


def read_closed_through(batches_dir: Path | str) -> dict[str | None, int]:
    """Part -> the end of its closed windows, for every writer that recorded one."""
    root = Path(batches_dir)
    if not root.is_dir():
        return {}
    found: dict[str | None, int] = {}
    for name in sorted(os.listdir(root)):
        if not (name == "closed.json" or (name.startswith("closed-p") and name.endswith(".json"))):
            continue
        path = root / name
        try:
            record = json.loads(path.read_bytes())
            found[record["part"]] = int(record["closed_to_ms"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BatchFormatError(path, None, f"unreadable closed-windows marker: {error}") from error
    return found
