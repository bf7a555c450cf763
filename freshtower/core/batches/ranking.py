"""Ranking samples: per request, the candidate list a ranking stage saw,
written beside a window's batch file as a second file of the window.

One ranking sample per request that had both an impression and a rank log
of the teacher stage (``prerank.teacher_stage``): every candidate the
ranker scored, its score, whether the ranker kept it, whether it was shown
and clicked, its category (where known), the request's user features, and
the per-user statistics counts of each (user, candidate) pair as they were
at the request's time (``freshtower.core.statistics``: the five user
columns of ``COUNT_COLUMNS``). The four item columns are filled by the
reader from every partition's statistics rows (``read_statistics_rows``),
because one partition sees only its users' share of an item's events.

Files, named in the batch manifest's ``extras`` with their SHA-256 (the
manifest is written last, so they are complete when it exists):

- ``<stem>.ranking.tfrecord``: TFRecord, one ``tf.train.Example`` per
  request (``extras["ranking_samples"]``);
- ``<stem>.stats.npz``: the interactions the window's requests added to the
  statistics (one row per shown item and per joined click, at effective
  time; ``extras["statistics_rows"]``).

A window with no ranking sample has no ranking file; a stream with no rank
logs (MovieLens) has none at all.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tfrecord import example_pb2

from freshtower.core.batches.framing import frame_record, record_frames
from freshtower.core.batches.layout import BatchRef
from freshtower.core.batches.schema import BatchFormatError, FeatureSpec
from freshtower.core.eventtime import MINUTE_MS
from freshtower.core.statistics import COUNT_COLUMNS, Interactions, ItemStatistics
from freshtower.core.storage import atomic_write_bytes, sha256_bytes

USER_COUNT_COLUMNS = COUNT_COLUMNS[4:]  # what the stream stores per candidate
ITEM_COUNT_COLUMNS = COUNT_COLUMNS[:4]  # what the reader fills from every partition
RANKING_SUFFIX = ".ranking.tfrecord"
STATISTICS_SUFFIX = ".stats.npz"


@dataclass(frozen=True)
class RankingSample:
    """One request as the ranking stage saw it."""

    request_id: str
    user_id: str
    event_time_ms: int  # the impression's time: the statistics are as of it
    stage: str
    candidate_ids: tuple[str, ...]
    scores: tuple[float, ...]  # the ranker's score of each candidate, in [0, 1]
    kept: tuple[bool, ...]
    shown: tuple[bool, ...]
    clicked: tuple[bool, ...]
    categories: tuple[str, ...]  # "" unknown
    user_counts: np.ndarray  # (n, 5) int64, USER_COUNT_COLUMNS
    user_categorical: Mapping[str, str] = field(default_factory=dict)
    user_numeric: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.candidate_ids)
        lengths = [len(self.scores), len(self.kept), len(self.shown), len(self.clicked), len(self.categories)]
        if any(length != n for length in lengths) or np.shape(self.user_counts) != (n, len(USER_COUNT_COLUMNS)):
            raise ValueError(f"ranking sample {self.request_id!r}: columns of {n} candidates differ in length: {lengths}, counts "
                             f"{np.shape(self.user_counts)}")


@dataclass(frozen=True)
class RankingColumns:
    """Ranking samples of one or more files, columnar and ragged: request
    ``r`` holds candidates ``offsets[r]:offsets[r + 1]``."""

    request_ids: list[str]
    user_ids: list[str]
    event_time_ms: np.ndarray  # (R,) int64
    user_categorical: dict[str, list[str]]  # name -> (R,) values ("" unknown)
    user_numeric: np.ndarray  # (R, k) float32, FeatureSpec order (0 absent)
    offsets: np.ndarray  # (R + 1,) int64
    candidate_ids: list[str]  # (N,)
    categories: list[str]  # (N,)
    scores: np.ndarray  # (N,) float32
    kept: np.ndarray  # (N,) bool
    shown: np.ndarray  # (N,) bool
    clicked: np.ndarray  # (N,) bool
    user_counts: np.ndarray  # (N, 5) int64

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def candidates(self) -> int:
        return len(self.candidate_ids)

    def request_of(self) -> np.ndarray:
        """(N,) the request of each candidate."""
        return np.repeat(np.arange(len(self)), np.diff(self.offsets))

    def take(self, requests: Sequence[int] | np.ndarray) -> "RankingColumns":
        """The given requests, in the given order."""
        requests = np.asarray(requests, dtype=np.int64)
        starts, stops = self.offsets[requests], self.offsets[requests + 1]
        lengths = stops - starts
        index = np.concatenate([np.arange(a, b) for a, b in zip(starts.tolist(), stops.tolist())] or [np.zeros(0, np.int64)])
        offsets = np.zeros(len(requests) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pick = requests.tolist()
        return RankingColumns(
            request_ids=[self.request_ids[r] for r in pick],
            user_ids=[self.user_ids[r] for r in pick],
            event_time_ms=self.event_time_ms[requests],
            user_categorical={k: [v[r] for r in pick] for k, v in self.user_categorical.items()},
            user_numeric=self.user_numeric[requests],
            offsets=offsets,
            candidate_ids=[self.candidate_ids[i] for i in index.tolist()],
            categories=[self.categories[i] for i in index.tolist()],
            scores=self.scores[index],
            kept=self.kept[index],
            shown=self.shown[index],
            clicked=self.clicked[index],
            user_counts=self.user_counts[index],
        )

    @staticmethod
    def concat(parts: Sequence["RankingColumns"], spec: FeatureSpec) -> "RankingColumns":
        parts = [p for p in parts if len(p)]
        if not parts:
            return empty_ranking_columns(spec)
        lengths = np.concatenate([np.diff(p.offsets) for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return RankingColumns(
            request_ids=[r for p in parts for r in p.request_ids],
            user_ids=[u for p in parts for u in p.user_ids],
            event_time_ms=np.concatenate([p.event_time_ms for p in parts]),
            user_categorical={k: [v for p in parts for v in p.user_categorical[k]] for k in spec.user_categorical},
            user_numeric=np.concatenate([p.user_numeric for p in parts]),
            offsets=offsets,
            candidate_ids=[c for p in parts for c in p.candidate_ids],
            categories=[c for p in parts for c in p.categories],
            scores=np.concatenate([p.scores for p in parts]),
            kept=np.concatenate([p.kept for p in parts]),
            shown=np.concatenate([p.shown for p in parts]),
            clicked=np.concatenate([p.clicked for p in parts]),
            user_counts=np.concatenate([p.user_counts for p in parts]),
        )


def empty_ranking_columns(spec: FeatureSpec) -> RankingColumns:
    return RankingColumns(
        [], [], np.zeros(0, np.int64), {k: [] for k in spec.user_categorical}, np.zeros((0, len(spec.user_numeric)), np.float32),
        np.zeros(1, np.int64), [], [], np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, bool), np.zeros(0, bool),
        np.zeros((0, len(USER_COUNT_COLUMNS)), np.int64),
    )


# --- encoding ------------------------------------------------------------------


def encode_ranking_sample(sample: RankingSample) -> bytes:
    """One ranking sample as ``tf.train.Example`` bytes (one record per
    request: the protobuf library's ~40 us per record is no bottleneck)."""
    example = example_pb2.Example()
    feature = example.features.feature
    feature["request_id"].bytes_list.value.append(sample.request_id.encode())
    feature["user_id"].bytes_list.value.append(sample.user_id.encode())
    feature["event_time_ms"].int64_list.value.append(int(sample.event_time_ms))
    feature["stage"].bytes_list.value.append(sample.stage.encode())
    for name, value in sample.user_categorical.items():
        feature["user_cat/" + name].bytes_list.value.append(str(value).encode())
    for name, value in sample.user_numeric.items():
        feature["user_num/" + name].float_list.value.append(float(value))
    feature["candidate_ids"].bytes_list.value.extend([c.encode() for c in sample.candidate_ids])
    feature["candidate_categories"].bytes_list.value.extend([c.encode() for c in sample.categories])
    feature["ranker_scores"].float_list.value.extend([float(s) for s in sample.scores])
    feature["kept"].int64_list.value.extend([int(k) for k in sample.kept])
    feature["shown"].int64_list.value.extend([int(k) for k in sample.shown])
    feature["clicked"].int64_list.value.extend([int(k) for k in sample.clicked])
    feature["user_counts"].int64_list.value.extend(np.asarray(sample.user_counts, dtype=np.int64).ravel().tolist())
    return example.SerializeToString()


def decode_ranking_records(path: Path | str, data: bytes, spec: FeatureSpec, check_crcs: bool = True) -> RankingColumns:
    """Ranking-sample records (TFRecord bytes) -> columns."""
    request_ids, user_ids, times, lengths = [], [], [], []
    user_cat = {name: [] for name in spec.user_categorical}
    numeric: list[list[float]] = []
    candidates, categories, scores, kept, shown, clicked, counts = [], [], [], [], [], [], []
    width = len(USER_COUNT_COLUMNS)
    offsets_, starts, frame_lengths = record_frames(path, data, None, check_crcs)
    view = memoryview(data)
    for offset, start, length in zip(offsets_.tolist(), starts.tolist(), frame_lengths.tolist()):
        try:
            feature = example_pb2.Example.FromString(view[start : start + length]).features.feature
            ids = [c.decode() for c in feature["candidate_ids"].bytes_list.value]
            n = len(ids)
            columns = (
                feature["candidate_categories"].bytes_list.value,
                feature["ranker_scores"].float_list.value,
                feature["kept"].int64_list.value,
                feature["shown"].int64_list.value,
                feature["clicked"].int64_list.value,
            )
            if any(len(c) != n for c in columns) or len(feature["user_counts"].int64_list.value) != n * width:
                raise ValueError(f"candidate columns differ in length from its {n} candidate IDs")
            request_ids.append(feature["request_id"].bytes_list.value[0].decode())
            user_ids.append(feature["user_id"].bytes_list.value[0].decode())
            times.append(feature["event_time_ms"].int64_list.value[0])
            for name, column in user_cat.items():
                value = feature["user_cat/" + name].bytes_list.value
                column.append(value[0].decode() if value else "")
            numeric.append([(lambda v: v[0] if v else 0.0)(feature["user_num/" + name].float_list.value) for name in spec.user_numeric])
            lengths.append(n)
            candidates.extend(ids)
            categories.extend(c.decode() for c in columns[0])
            scores.extend(columns[1])
            kept.extend(columns[2])
            shown.extend(columns[3])
            clicked.extend(columns[4])
            counts.extend(feature["user_counts"].int64_list.value)
        except Exception as error:  # protobuf's DecodeError, IndexError, UnicodeDecodeError, ValueError
            raise BatchFormatError(path, offset, f"record is not a valid ranking sample: {error!r}") from error
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    return RankingColumns(
        request_ids=request_ids,
        user_ids=user_ids,
        event_time_ms=np.asarray(times, dtype=np.int64),
        user_categorical=user_cat,
        user_numeric=np.asarray(numeric, dtype=np.float32).reshape(len(request_ids), len(spec.user_numeric)),
        offsets=offsets,
        candidate_ids=candidates,
        categories=categories,
        scores=np.asarray(scores, dtype=np.float32),
        kept=np.asarray(kept, dtype=bool),
        shown=np.asarray(shown, dtype=bool),
        clicked=np.asarray(clicked, dtype=bool),
        user_counts=np.asarray(counts, dtype=np.int64).reshape(len(candidates), width),
    )


# --- files beside a batch --------------------------------------------------------------


def write_ranking_samples(directory: Path, stem: str, samples: Sequence[RankingSample]) -> dict | None:
    """Write ``<stem>.ranking.tfrecord`` (requests in time order); return
    the manifest ``extras`` entry, or None (and no file) when there is none."""
    if not samples:
        return None
    ordered = sorted(samples, key=lambda s: (s.event_time_ms, s.request_id))
    data = b"".join(frame_record(encode_ranking_sample(s)) for s in ordered)
    name = stem + RANKING_SUFFIX
    atomic_write_bytes(Path(directory) / name, data, sync_directory=False)
    return {"file": name, "records": len(ordered), "candidates": sum(len(s.candidate_ids) for s in ordered),
            "bytes": len(data), "sha256": sha256_bytes(data)}


def write_statistics_rows(directory: Path, stem: str, rows: Interactions) -> dict | None:
    """Write ``<stem>.stats.npz``; return the ``extras`` entry (None: no rows, no file)."""
    if len(rows.user_ids) == 0:
        return None
    buffer = io.BytesIO()
    np.savez(
        buffer,
        user_ids=np.asarray(list(rows.user_ids), dtype=str),
        item_ids=np.asarray(list(rows.item_ids), dtype=str),
        categories=np.asarray(list(rows.categories), dtype=str),
        time_ms=np.asarray(rows.time_ms, dtype=np.int64),
        clicked=np.asarray(rows.clicked, dtype=bool),
    )
    data = buffer.getvalue()
    name = stem + STATISTICS_SUFFIX
    atomic_write_bytes(Path(directory) / name, data, sync_directory=False)
    return {"file": name, "rows": len(rows.user_ids), "bytes": len(data), "sha256": sha256_bytes(data)}


def _extra_file(ref: BatchRef, key: str) -> tuple[Path, bytes] | None:
    entry = ref.manifest.extras.get(key)
    if entry is None:
        return None
    name = str(entry["file"])
    if "/" in name or "\\" in name or name.startswith("."):
        raise BatchFormatError(ref.manifest_path, None, f"extras.{key} names a file outside its directory: {name!r}")
    path = ref.manifest_path.parent / name
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BatchFormatError(path, None, f"cannot read {key} file: {error}") from error
    digest = sha256_bytes(data)
    if digest != entry["sha256"]:
        record_frames(path, data) if key == "ranking_samples" else None  # names the bad record where it can
        raise BatchFormatError(path, None, f"SHA-256 {digest} does not match the manifest's {entry['sha256']}")
    return path, data


def read_ranking_samples(ref: BatchRef, spec: FeatureSpec) -> RankingColumns:
    """The ranking samples of a batch (none when it has no ranking file)."""
    found = _extra_file(ref, "ranking_samples")
    if found is None:
        return empty_ranking_columns(spec)
    path, data = found
    columns = decode_ranking_records(path, data, spec, check_crcs=False)
    expected = int(ref.manifest.extras["ranking_samples"]["records"])
    if len(columns) != expected:
        raise BatchFormatError(path, None, f"decoded {len(columns)} ranking samples, manifest says {expected}")
    return columns


def read_statistics_rows(ref: BatchRef) -> Interactions | None:
    """The statistics rows a batch's window added (None when it has none)."""
    found = _extra_file(ref, "statistics_rows")
    if found is None:
        return None
    path, data = found
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return Interactions(
                npz["user_ids"].tolist(), npz["item_ids"].tolist(), npz["categories"].tolist(),
                npz["time_ms"].astype(np.int64), npz["clicked"].astype(bool),
            )
    except (KeyError, ValueError, OSError) as error:
        raise BatchFormatError(path, None, f"malformed statistics rows: {error!r}") from error


def statistics_counts(columns: RankingColumns, items: ItemStatistics) -> np.ndarray:
    """(N, 9) counts in ``COUNT_COLUMNS`` order of every candidate: the item
    columns from ``items`` (every partition's rows applied) as of each
    request's time, one lookup per distinct request minute; the user
    columns as the stream stored them."""
    out = np.zeros((columns.candidates, len(COUNT_COLUMNS)), dtype=np.int64)
    out[:, 4:] = columns.user_counts
    if not columns.candidates:
        return out
    request_of = columns.request_of()
    minutes = columns.event_time_ms // MINUTE_MS * MINUTE_MS
    candidate_minutes = minutes[request_of]
    for minute in np.unique(minutes).tolist():
        at = np.flatnonzero(candidate_minutes == minute)
        out[at, :4] = items.counts([columns.candidate_ids[i] for i in at.tolist()], minute)
    return out
