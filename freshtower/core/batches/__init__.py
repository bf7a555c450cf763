"""The training-batch format: TFRecord files of ``tf.train.Example``, one
record per sample, written by ``streams/`` and read by ``trainer/``.

A batch covers one event-time window (a minute by default) and lives at
``<batches_dir>/<YYYY-MM-DD>/<HHMMSS>.tfrecord`` (UTC window start), with a
JSON manifest ``<HHMMSS>.json`` beside it. The manifest is written last, so a
batch without one is incomplete and ignored. A window may have several
batches, one per part (``<HHMMSS>-p3.tfrecord``: the streams worker writes
one per input partition, so that workers sharing the partitions never
replace each other's files); readers take them all. Inside the file,
clicked samples (label 1) come first in event-time order, then the
shown-but-not-clicked samples (label 0); the manifest records the byte
length of the clicked section, so the retrieval trainers read only that
prefix.

Record features (keys of the Example):

================== ========== ================================================
key                type       meaning
================== ========== ================================================
user_id            bytes      raw user ID
item_id            bytes      raw item ID
label              int64      1 clicked, 0 shown but not clicked
event_time_ms      int64      click time (label 1) or impression time (label 0),
                              milliseconds since the Unix epoch, UTC
request_id         bytes      the recommendation request that showed the item
position           int64      slot of the item in that request (0-based)
user_cat/<name>    bytes      user categorical feature (absent: unknown)
user_num/<name>    float      user continuous feature (absent: 0.0)
item_cat/<name>    bytes      item categorical feature (absent: unknown)
hard_negative_ids  bytes list items a ranking stage dropped for this request
teacher_score      float      optional ranking-model score in [0, 1]
================== ========== ================================================

The reader checks every record's masked CRC32C (the ``tfrecord`` package
does not), so a corrupt or truncated file raises ``BatchFormatError`` naming
the file and the byte offset.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import crc32c
import numpy as np
from tfrecord import example_pb2

from freshtower.core.batches import example_parser
from freshtower.core.batches.example_parser import Unsupported
from freshtower.core.fingerprints import PAD, fingerprint_ranges, fingerprint_strings

FORMAT_VERSION = 1
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_HEADER_BYTES = 12  # 8-byte length + 4-byte masked CRC of the length
_FOOTER_BYTES = 4  # masked CRC of the payload


class BatchFormatError(ValueError):
    """A batch file or manifest that cannot be trusted, with where it broke."""

    def __init__(self, path: Path | str, offset: int | None, reason: str):
        where = f"{path}" if offset is None else f"{path}, byte offset {offset}"
        super().__init__(f"{where}: {reason}")
        self.path = Path(path)
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Sample:
    """One training sample: a (user, item) pair that was shown, and maybe clicked."""

    user_id: str
    item_id: str
    label: int  # 1 clicked, 0 shown but not clicked
    event_time_ms: int
    request_id: str
    position: int
    user_categorical: Mapping[str, str] = field(default_factory=dict)
    user_numeric: Mapping[str, float] = field(default_factory=dict)
    item_categorical: Mapping[str, str] = field(default_factory=dict)
    hard_negative_ids: tuple[str, ...] = ()
    teacher_score: float | None = None


@dataclass(frozen=True)
class FeatureSpec:
    """Which side features the reader extracts, in column order."""

    user_categorical: tuple[str, ...] = ()
    user_numeric: tuple[str, ...] = ()
    item_categorical: tuple[str, ...] = ()

    @classmethod
    def from_model(cls, model_config) -> "FeatureSpec":
        return cls(
            tuple(model_config.user_categorical),
            tuple(model_config.user_numeric),
            tuple(model_config.item_categorical),
        )


@dataclass
class SampleColumns:
    """Decoded samples, column by column (N samples).

    Hard negatives are ragged: row i's are
    ``hard_negative_flat[hard_negative_offsets[i]:hard_negative_offsets[i + 1]]``.
    64-bit fingerprints of the IDs (``freshtower.core.fingerprints``), which the
    trainers' lookups use, are computed on first use and kept.
    """

    user_ids: list[str]
    item_ids: list[str]
    labels: np.ndarray  # (N,) int8
    event_time_ms: np.ndarray  # (N,) int64, ms since epoch
    request_ids: list[str]
    positions: np.ndarray  # (N,) int32
    user_categorical: dict[str, list[str]]  # name -> N values ("" unknown)
    user_numeric: np.ndarray  # (N, F) float32, FeatureSpec.user_numeric order
    item_categorical: dict[str, list[str]]
    hard_negative_flat: list[str]  # every row's hard negatives, row after row
    hard_negative_offsets: np.ndarray  # (N + 1,) int64
    teacher_scores: np.ndarray  # (N,) float32, NaN where absent
    user_fingerprints: np.ndarray | None = None  # (N,) uint64
    item_fingerprints: np.ndarray | None = None  # (N,) uint64
    hard_negative_fingerprints: np.ndarray | None = None  # (len(flat),) uint64
    user_categorical_fingerprints: dict[str, np.ndarray] | None = None  # name -> (N,) uint64

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def hard_negative_ids(self) -> list[tuple[str, ...]]:
        """Row by row, as tuples (convenient, not for hot paths)."""
        bounds = self.hard_negative_offsets.tolist()
        return [tuple(self.hard_negative_flat[bounds[i] : bounds[i + 1]]) for i in range(len(self))]

    def user_id_fingerprints(self) -> np.ndarray:
        if self.user_fingerprints is None:
            self.user_fingerprints = fingerprint_strings(self.user_ids)
        return self.user_fingerprints

    def item_id_fingerprints(self) -> np.ndarray:
        if self.item_fingerprints is None:
            self.item_fingerprints = fingerprint_strings(self.item_ids)
        return self.item_fingerprints

    def hard_negative_id_fingerprints(self) -> np.ndarray:
        if self.hard_negative_fingerprints is None:
            self.hard_negative_fingerprints = fingerprint_strings(self.hard_negative_flat)
        return self.hard_negative_fingerprints

    # Pickling (the online trainer's decode process hands batches over): a
    # column of N strings joined on NUL pickles ~10x faster than N objects.
    _STRING_COLUMNS = ("user_ids", "item_ids", "request_ids", "hard_negative_flat")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._STRING_COLUMNS:
            state[name] = _pack_strings(state[name])
        for name in ("user_categorical", "item_categorical"):
            state[name] = {k: _pack_strings(v) for k, v in state[name].items()}
        return state

    def __setstate__(self, state: dict) -> None:
        for name in self._STRING_COLUMNS:
            state[name] = _unpack_strings(state[name])
        for name in ("user_categorical", "item_categorical"):
            state[name] = {k: _unpack_strings(v) for k, v in state[name].items()}
        self.__dict__.update(state)

    def user_categorical_value_fingerprints(self) -> dict[str, np.ndarray]:
        """Fingerprints of the user categorical values, by feature name."""
        if self.user_categorical_fingerprints is None:
            self.user_categorical_fingerprints = {k: fingerprint_strings(v) for k, v in self.user_categorical.items()}
        return self.user_categorical_fingerprints

    def take(self, indices: Sequence[int] | np.ndarray) -> "SampleColumns":
        """The samples at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        pick = idx.tolist()
        starts = self.hard_negative_offsets[idx]
        counts = self.hard_negative_offsets[idx + 1] - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        flat = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])  # source position of each
        fingerprints = lambda column: None if column is None else column[idx]  # noqa: E731
        return SampleColumns(
            user_ids=[self.user_ids[i] for i in pick],
            item_ids=[self.item_ids[i] for i in pick],
            labels=self.labels[idx],
            event_time_ms=self.event_time_ms[idx],
            request_ids=[self.request_ids[i] for i in pick],
            positions=self.positions[idx],
            user_categorical={k: [v[i] for i in pick] for k, v in self.user_categorical.items()},
            user_numeric=self.user_numeric[idx],
            item_categorical={k: [v[i] for i in pick] for k, v in self.item_categorical.items()},
            hard_negative_flat=[self.hard_negative_flat[i] for i in flat.tolist()],
            hard_negative_offsets=offsets,
            teacher_scores=self.teacher_scores[idx],
            user_fingerprints=fingerprints(self.user_fingerprints),
            item_fingerprints=fingerprints(self.item_fingerprints),
            hard_negative_fingerprints=None if self.hard_negative_fingerprints is None else self.hard_negative_fingerprints[flat],
            user_categorical_fingerprints=_each(self.user_categorical_fingerprints, idx),
        )

    def span(self, start: int, stop: int) -> "SampleColumns":
        """Samples ``start:stop`` (what ``take(range(start, stop))`` gives, by
        slicing: the trainers cut every file into minibatches this way)."""
        stop = min(stop, len(self))
        first, last = int(self.hard_negative_offsets[start]), int(self.hard_negative_offsets[stop])
        window = slice(start, stop)
        fingerprints = lambda column: None if column is None else column[window]  # noqa: E731
        return SampleColumns(
            user_ids=self.user_ids[window],
            item_ids=self.item_ids[window],
            labels=self.labels[window],
            event_time_ms=self.event_time_ms[window],
            request_ids=self.request_ids[window],
            positions=self.positions[window],
            user_categorical={k: v[window] for k, v in self.user_categorical.items()},
            user_numeric=self.user_numeric[window],
            item_categorical={k: v[window] for k, v in self.item_categorical.items()},
            hard_negative_flat=self.hard_negative_flat[first:last],
            hard_negative_offsets=self.hard_negative_offsets[start : stop + 1] - first,
            teacher_scores=self.teacher_scores[window],
            user_fingerprints=fingerprints(self.user_fingerprints),
            item_fingerprints=fingerprints(self.item_fingerprints),
            hard_negative_fingerprints=None if self.hard_negative_fingerprints is None else self.hard_negative_fingerprints[first:last],
            user_categorical_fingerprints=_each(self.user_categorical_fingerprints, window),
        )

    @staticmethod
    def concat(parts: Sequence["SampleColumns"], spec: FeatureSpec) -> "SampleColumns":
        if not parts:
            return empty_columns(spec)
        if len(parts) == 1:
            return parts[0]
        offsets = [np.zeros(1, np.int64)]
        shift = 0
        for p in parts:
            offsets.append(p.hard_negative_offsets[1:] + shift)
            shift += int(p.hard_negative_offsets[-1])

        def joined(name: str):
            columns = [getattr(p, name) for p in parts]
            return None if any(c is None for c in columns) else np.concatenate(columns)

        return SampleColumns(
            user_ids=[u for p in parts for u in p.user_ids],
            item_ids=[u for p in parts for u in p.item_ids],
            labels=np.concatenate([p.labels for p in parts]),
            event_time_ms=np.concatenate([p.event_time_ms for p in parts]),
            request_ids=[u for p in parts for u in p.request_ids],
            positions=np.concatenate([p.positions for p in parts]),
            user_categorical={k: [v for p in parts for v in p.user_categorical[k]] for k in spec.user_categorical},
            user_numeric=np.concatenate([p.user_numeric for p in parts]),
            item_categorical={k: [v for p in parts for v in p.item_categorical[k]] for k in spec.item_categorical},
            hard_negative_flat=[h for p in parts for h in p.hard_negative_flat],
            hard_negative_offsets=np.concatenate(offsets),
            teacher_scores=np.concatenate([p.teacher_scores for p in parts]),
            user_fingerprints=joined("user_fingerprints"),
            item_fingerprints=joined("item_fingerprints"),
            hard_negative_fingerprints=joined("hard_negative_fingerprints"),
            user_categorical_fingerprints=None
            if any(p.user_categorical_fingerprints is None for p in parts)
            else {k: np.concatenate([p.user_categorical_fingerprints[k] for p in parts]) for k in spec.user_categorical},
        )


def _pack_strings(values: list[str]):
    """``(count, values joined on NUL)``, or the list itself if a value holds a NUL."""
    joined = "\x00".join(values)
    if values and joined.count("\x00") != len(values) - 1:
        return list(values)
    return (len(values), joined)


def _unpack_strings(packed) -> list[str]:
    if isinstance(packed, list):
        return packed
    count, joined = packed
    return joined.split("\x00") if count else []


def _each(columns: dict[str, np.ndarray] | None, index) -> dict[str, np.ndarray] | None:
    return None if columns is None else {k: v[index] for k, v in columns.items()}


def empty_columns(spec: FeatureSpec) -> SampleColumns:
    return SampleColumns(
        user_ids=[],
        item_ids=[],
        labels=np.zeros(0, np.int8),
        event_time_ms=np.zeros(0, np.int64),
        request_ids=[],
        positions=np.zeros(0, np.int32),
        user_categorical={k: [] for k in spec.user_categorical},
        user_numeric=np.zeros((0, len(spec.user_numeric)), np.float32),
        item_categorical={k: [] for k in spec.item_categorical},
        hard_negative_flat=[],
        hard_negative_offsets=np.zeros(1, np.int64),
        teacher_scores=np.zeros(0, np.float32),
    )


# --- encoding -----------------------------------------------------------------


# The protobuf library takes ~40 us to build and serialise one Example in
# Python, which would cap the streams worker below its target. The Example
# wire format is small and stable, so samples are encoded directly here;
# ``tests/streams/test_batches.py`` checks the bytes parse back through
# protobuf to exactly the library's message. Repeated (key, value) entries,
# such as a user's features on every item of an impression, are memoised.


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _SMALL_VARINTS[value]
    value &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement, as protobuf does
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = [bytes((i,)) for i in range(128)]


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag byte, length varint, payload."""
    n = len(payload)
    return tag + (_SMALL_VARINTS[n] if n < 128 else _varint(n)) + payload


_KEY_FIELDS: dict[str, bytes] = {}


def _entry(key: str, feature: bytes) -> bytes:
    """One ``Features.feature`` map entry (key = 1, value = 2), framed as field 1."""
    key_field = _KEY_FIELDS.get(key)
    if key_field is None:
        key_field = _KEY_FIELDS[key] = _field(b"\x0a", key.encode())
    return _field(b"\x0a", key_field + _field(b"\x12", feature))


def _bytes_feature(values) -> bytes:
    return _field(b"\x0a", b"".join([_field(b"\x0a", v) for v in values]))  # Feature.bytes_list


def _float_feature(values) -> bytes:
    return _field(b"\x12", _field(b"\x0a", struct.pack(f"<{len(values)}f", *values)))  # packed FloatList


def _int64_feature(value: int) -> bytes:
    return _field(b"\x1a", _field(b"\x0a", _varint(int(value))))  # packed Int64List, one value


_memo: dict[tuple, bytes] = {}
_hard_memo: dict[tuple, bytes] = {}


def _memo_entry(kind: str, key: str, value) -> bytes:
    cached = _memo.get((kind, key, value))
    if cached is None:
        if kind == "b":
            cached = _entry(key, _bytes_feature([str(value).encode()]))
        elif kind == "i":
            cached = _entry(key, _int64_feature(value))
        else:
            cached = _entry(key, _float_feature([float(value)]))
        if len(_memo) > 200_000:  # bounded: feature values are few, IDs are not memoised
            _memo.clear()
        _memo[(kind, key, value)] = cached
    return cached


def encode_sample(sample: Sample) -> bytes:
    """Serialise one sample as a ``tf.train.Example`` (wire-compatible)."""
    parts = [
        _entry("user_id", _bytes_feature([sample.user_id.encode()])),
        _entry("item_id", _bytes_feature([sample.item_id.encode()])),
        _memo_entry("i", "label", int(sample.label)),
        _entry("event_time_ms", _int64_feature(sample.event_time_ms)),
        _entry("request_id", _bytes_feature([sample.request_id.encode()])),
        _memo_entry("i", "position", int(sample.position)),
    ]
    for name, value in sample.user_categorical.items():
        parts.append(_memo_entry("b", "user_cat/" + name, value))
    for name, value in sample.user_numeric.items():
        parts.append(_memo_entry("f", "user_num/" + name, value))
    for name, value in sample.item_categorical.items():
        parts.append(_memo_entry("b", "item_cat/" + name, value))
    hard = sample.hard_negative_ids
    if hard:
        # The items of one request share their hard negatives.
        cached = _hard_memo.get(hard)
        if cached is None:
            if len(_hard_memo) > 50_000:
                _hard_memo.clear()
            cached = _hard_memo[hard] = _entry("hard_negative_ids", _bytes_feature([h.encode() for h in hard]))
        parts.append(cached)
    if sample.teacher_score is not None:
        parts.append(_entry("teacher_score", _float_feature([sample.teacher_score])))
    return _field(b"\x0a", b"".join(parts))  # Example.features


class RequestSharingEncoder:
    """``encode_sample`` for a writer whose samples come request by request
    (the streams worker), about 3x faster: the fields a request's samples
    share (user, request, user features, hard negatives) are encoded once
    per request, item-ID entries once per item, and the per-sample integer
    and float entries from precomputed prefixes. The bytes parse to the
    same Example as ``encode_sample`` (map entries in another order;
    tested). A cached request prefix is reused only for the very same
    feature objects and equal IDs, so any input stays correct.
    """

    def __init__(self, max_cached: int = 200_000):
        self.max_cached = max_cached
        self._prefix: dict[str, tuple] = {}
        self._item: dict[str, bytes] = {}
        # Entry bytes before the value, by varint length / for a float32.
        self._time_prefix = {n: _entry("event_time_ms", _int64_feature((1 << (7 * (n - 1))) if n > 1 else 1))[:-n] for n in range(1, 11)}
        self._teacher_prefix = _entry("teacher_score", _float_feature([0.0]))[:-4]
        self._f32 = struct.Struct("<f").pack
        self._times: dict[int, bytes] = {}  # a request's label-0 samples share one time
        self._lengths = [_varint(n) for n in range(1 << 14)]  # record lengths below 16 KB

    def _request_prefix(self, sample: Sample) -> bytes:
        cached = self._prefix.get(sample.request_id)
        if (
            cached is not None
            and cached[0] == sample.user_id
            and cached[1] is sample.user_categorical
            and cached[2] is sample.user_numeric
            and cached[3] == sample.hard_negative_ids
        ):
            return cached[4]
        parts = [
            _entry("user_id", _bytes_feature([sample.user_id.encode()])),
            _entry("request_id", _bytes_feature([sample.request_id.encode()])),
        ]
        for name, value in sample.user_categorical.items():
            parts.append(_memo_entry("b", "user_cat/" + name, value))
        for name, value in sample.user_numeric.items():
            parts.append(_memo_entry("f", "user_num/" + name, value))
        if sample.hard_negative_ids:
            parts.append(_entry("hard_negative_ids", _bytes_feature([h.encode() for h in sample.hard_negative_ids])))
        prefix = b"".join(parts)
        if len(self._prefix) >= self.max_cached:
            self._prefix.clear()
        self._prefix[sample.request_id] = (sample.user_id, sample.user_categorical, sample.user_numeric, sample.hard_negative_ids, prefix)
        return prefix

    def __call__(self, sample: Sample) -> bytes:
        item = self._item.get(sample.item_id)
        if item is None:
            if len(self._item) >= self.max_cached:
                self._item.clear()
            item = self._item[sample.item_id] = _entry("item_id", _bytes_feature([sample.item_id.encode()]))
        time_entry = self._times.get(sample.event_time_ms)
        if time_entry is None:
            if len(self._times) >= 10_000:  # only reused within a request's samples
                self._times.clear()
            ts = _varint(sample.event_time_ms)
            time_entry = self._times[sample.event_time_ms] = self._time_prefix[len(ts)] + ts
        parts = [
            self._request_prefix(sample),
            item,
            _memo_entry("i", "label", sample.label),
            time_entry,
            _memo_entry("i", "position", sample.position),
        ]
        for name, value in sample.item_categorical.items():
            parts.append(_memo_entry("b", "item_cat/" + name, value))
        if sample.teacher_score is not None:
            parts.append(self._teacher_prefix + self._f32(sample.teacher_score))
        body = b"".join(parts)
        n = len(body)
        return b"\x0a" + (self._lengths[n] if n < 16384 else _varint(n)) + body

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop the cached prefixes of requests that will not come again."""
        for request_id in request_ids:
            self._prefix.pop(request_id, None)


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data``."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One TFRecord frame: length, CRC of length, payload, CRC of payload."""
    length = _LENGTH.pack(len(payload))
    return length + _CRC.pack(masked_crc32c(length)) + payload + _CRC.pack(masked_crc32c(payload))


# --- batch files ----------------------------------------------------------------


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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, fsync and rename into place, so readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
) -> BatchRef:
    """Write one window's samples as a batch file plus manifest, atomically.

    The path is a pure function of the window (and ``part``, see
    ``batch_stem``), so writing the same window again (a restarted worker)
    replaces the batch instead of adding a copy.
    Clicked samples go first, in event-time order, then the shown ones.
    ``encode`` turns a sample into Example bytes (``encode_sample``, or a
    ``RequestSharingEncoder`` in the streams worker).
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
        sha256=hashlib.sha256(data).hexdigest(),
        positive_sha256=hashlib.sha256(positive_frames).hexdigest(),
        min_event_time_ms=min(times) if times else None,
        max_event_time_ms=max(times) if times else None,
        late_records=late_records,
        extras=dict(extras or {}),
    )
    atomic_write_bytes(directory / manifest.file, data)
    manifest_path = directory / f"{stem}.json"
    atomic_write_bytes(manifest_path, json.dumps(manifest.to_json(), sort_keys=True).encode())
    return BatchRef(manifest_path, manifest)


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


# --- decoding ------------------------------------------------------------------


def record_frames(
    path: Path | str, data: bytes, end: int | None = None, check_crcs: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame offset, payload start, payload length) of each record up to
    ``end`` bytes, checking both masked CRC32Cs of every record unless
    ``check_crcs`` is False (the bytes matched a SHA-256 already)."""
    limit = len(data) if end is None else end
    if limit > len(data):
        raise BatchFormatError(path, len(data), f"file is truncated: expected at least {limit} bytes")
    offsets: list[int] = []
    lengths: list[int] = []
    view = memoryview(data)
    offset = 0
    unpack_length, unpack_crc, crc = _LENGTH.unpack_from, _CRC.unpack_from, masked_crc32c
    while offset < limit:
        if offset + _HEADER_BYTES > limit:
            raise BatchFormatError(path, offset, "truncated record header")
        (length,) = unpack_length(data, offset)
        if check_crcs and crc(view[offset : offset + 8]) != unpack_crc(data, offset + 8)[0]:
            raise BatchFormatError(path, offset, "record length fails its CRC (corrupt file)")
        stop = offset + _HEADER_BYTES + length
        if stop + _FOOTER_BYTES > limit:
            raise BatchFormatError(path, offset, f"truncated record: {length} bytes announced")
        if check_crcs and crc(view[offset + _HEADER_BYTES : stop]) != unpack_crc(data, stop)[0]:
            raise BatchFormatError(path, offset, "record payload fails its CRC (corrupt file)")
        offsets.append(offset)
        lengths.append(length)
        offset = stop + _FOOTER_BYTES
    frame_offsets = np.asarray(offsets, dtype=np.int64)
    return frame_offsets, frame_offsets + _HEADER_BYTES, np.asarray(lengths, dtype=np.int64)


def iter_record_payloads(path: Path | str, data: bytes | None = None, end: int | None = None) -> Iterator[tuple[int, memoryview]]:
    """Yield (byte offset, payload) of each record, CRCs checked."""
    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise BatchFormatError(path, None, f"cannot read batch file: {error}") from error
    view = memoryview(data)
    for offset, start, length in zip(*(a.tolist() for a in record_frames(path, data, end))):
        yield offset, view[start : start + length]


def _decode_strings(values: list[bytes], path, what: str) -> list[str]:
    """UTF-8 decode a column in one call (IDs never contain NUL: streams
    rejects them), falling back to one call per value if one does."""
    try:
        joined = b"\x00".join(values).decode()
    except UnicodeDecodeError as error:
        raise BatchFormatError(path, None, f"{what} is not UTF-8: {error}") from error
    decoded = joined.split("\x00") if values else []
    if len(decoded) != len(values):
        decoded = [v.decode() for v in values]
    return decoded


def decode_records(
    path: Path | str, data: bytes, spec: FeatureSpec, end: int | None = None, check_crcs: bool = True
) -> SampleColumns:
    """Decode the records of one file (up to ``end`` bytes) into columns.

    This is the trainers' hot read path. All records are parsed at once with
    numpy (``streams/example_parser.py``); records in an encoding that
    parser does not cover go through the protobuf library instead, which
    also produces the error (with its byte offset) for a malformed record.
    """
    frames = record_frames(path, data, end, check_crcs)
    try:
        return _decode_vectorised(data, frames, spec)
    except Unsupported:
        return _decode_with_protobuf(path, data, spec, frames)


_REQUIRED_STRINGS = (b"user_id", b"item_id", b"request_id")
_REQUIRED_INTS = (b"label", b"event_time_ms", b"position")


def _decode_vectorised(data: bytes, frames, spec: FeatureSpec) -> SampleColumns:
    _, starts, lengths = frames
    n = len(starts)
    if n == 0:
        return empty_columns(spec)
    buf = np.frombuffer(data + b"\x00" * PAD, dtype=np.uint8)  # fingerprints read 8-byte words
    user_cat = [("user_cat/" + name).encode() for name in spec.user_categorical]
    user_num = [("user_num/" + name).encode() for name in spec.user_numeric]
    item_cat = [("item_cat/" + name).encode() for name in spec.item_categorical]
    keys = [*_REQUIRED_STRINGS, *_REQUIRED_INTS, *user_cat, *user_num, *item_cat, b"hard_negative_ids", b"teacher_score"]
    found = example_parser.locate_features(buf, starts, starts + lengths, keys)

    def ranges(key: bytes, required: bool):
        records, value_start, value_end = example_parser.bytes_values(buf, found[key], key, first_only=True)
        if required and len(records) != n:
            raise Unsupported(f"a record lacks {key!r}")  # the protobuf path reports which
        return records, value_start, value_end

    def strings(key: bytes, required: bool) -> list[str]:
        records, value_start, value_end = ranges(key, required)
        values = example_parser.gather_strings(buf, value_start, value_end)
        if len(records) == n:
            return values
        column = [""] * n
        for record, value in zip(records.tolist(), values):
            column[record] = value
        return column

    def identifiers(key: bytes) -> tuple[list[str], np.ndarray]:
        _, value_start, value_end = ranges(key, True)
        return example_parser.gather_strings(buf, value_start, value_end), fingerprint_ranges(buf, value_start, value_end)

    def integers(key: bytes) -> np.ndarray:
        values, present = example_parser.int64_first(buf, found[key], key)
        if not present.all():
            raise Unsupported(f"a record lacks {key!r}")
        return values

    numeric = np.zeros((n, len(user_num)), dtype=np.float32)
    for j, key in enumerate(user_num):
        numeric[:, j], _ = example_parser.float_first(buf, found[key], key)  # absent: 0.0
    teacher, has_teacher = example_parser.float_first(buf, found[b"teacher_score"], b"teacher_score")
    teacher[~has_teacher] = np.nan
    records, value_start, value_end = example_parser.bytes_values(buf, found[b"hard_negative_ids"], b"hard_negative_ids", first_only=False)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(records, minlength=n), out=offsets[1:])
    user_ids, user_fingerprints = identifiers(b"user_id")
    item_ids, item_fingerprints = identifiers(b"item_id")
    return SampleColumns(
        user_ids=user_ids,
        item_ids=item_ids,
        labels=integers(b"label").astype(np.int8),
        event_time_ms=integers(b"event_time_ms"),
        request_ids=strings(b"request_id", True),
        positions=integers(b"position").astype(np.int32),
        user_categorical={name: strings(key, False) for name, key in zip(spec.user_categorical, user_cat)},
        user_numeric=numeric,
        item_categorical={name: strings(key, False) for name, key in zip(spec.item_categorical, item_cat)},
        hard_negative_flat=example_parser.gather_strings(buf, value_start, value_end),
        hard_negative_offsets=offsets,
        teacher_scores=teacher,
        user_fingerprints=user_fingerprints,
        item_fingerprints=item_fingerprints,
        hard_negative_fingerprints=fingerprint_ranges(buf, value_start, value_end),
    )


def _decode_with_protobuf(path: Path | str, data: bytes, spec: FeatureSpec, frames) -> SampleColumns:
    """The reference decoder: one ``Example.FromString`` per record."""
    user_ids: list[bytes] = []
    item_ids: list[bytes] = []
    labels: list[int] = []
    times: list[int] = []
    request_ids: list[bytes] = []
    positions: list[int] = []
    user_cat = [("user_cat/" + n, []) for n in spec.user_categorical]
    user_num_keys = ["user_num/" + n for n in spec.user_numeric]
    item_cat = [("item_cat/" + n, []) for n in spec.item_categorical]
    numeric: list[float] = []
    hard_flat: list[bytes] = []
    hard_counts: list[int] = []
    teacher: list[float] = []
    parse = example_pb2.Example.FromString
    nan = float("nan")
    view = memoryview(data)
    for offset, start, length in zip(*(a.tolist() for a in frames)):
        payload = view[start : start + length]
        try:
            # A missing key reads as an empty Feature (protobuf map
            # semantics), so required fields fail on [0] below.
            feature = parse(payload).features.feature
            user_ids.append(feature["user_id"].bytes_list.value[0])
            item_ids.append(feature["item_id"].bytes_list.value[0])
            labels.append(feature["label"].int64_list.value[0])
            times.append(feature["event_time_ms"].int64_list.value[0])
            request_ids.append(feature["request_id"].bytes_list.value[0])
            positions.append(feature["position"].int64_list.value[0])
            for key, column in user_cat:
                value = feature[key].bytes_list.value
                column.append(value[0] if value else b"")
            for key in user_num_keys:
                value = feature[key].float_list.value
                numeric.append(value[0] if value else 0.0)
            for key, column in item_cat:
                value = feature[key].bytes_list.value
                column.append(value[0] if value else b"")
            value = feature["hard_negative_ids"].bytes_list.value
            hard_counts.append(len(value))
            hard_flat.extend(value)
            value = feature["teacher_score"].float_list.value
            teacher.append(value[0] if value else nan)
        except Exception as error:  # protobuf's DecodeError, IndexError
            raise BatchFormatError(path, offset, f"record is not a valid training sample: {error!r}") from error
    n = len(user_ids)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.asarray(hard_counts, dtype=np.int64), out=offsets[1:])
    return SampleColumns(
        user_ids=_decode_strings(user_ids, path, "user_id"),
        item_ids=_decode_strings(item_ids, path, "item_id"),
        labels=np.asarray(labels, dtype=np.int8),
        event_time_ms=np.asarray(times, dtype=np.int64),
        request_ids=_decode_strings(request_ids, path, "request_id"),
        positions=np.asarray(positions, dtype=np.int32),
        user_categorical={k[len("user_cat/") :]: _decode_strings(c, path, k) for k, c in user_cat},
        user_numeric=np.asarray(numeric, dtype=np.float32).reshape(n, len(user_num_keys)),
        item_categorical={k[len("item_cat/") :]: _decode_strings(c, path, k) for k, c in item_cat},
        hard_negative_flat=_decode_strings(hard_flat, path, "hard_negative_ids"),
        hard_negative_offsets=offsets,
        teacher_scores=np.asarray(teacher, dtype=np.float32),
    )


def read_batch(ref: BatchRef, spec: FeatureSpec, *, positives_only: bool = True, verify_checksum: bool = False) -> SampleColumns:
    """Decode one batch; by default only its clicked section.

    ``verify_checksum`` reads the whole file and checks its size and
    SHA-256 against the manifest. The bytes decoded are always checked:
    against the manifest's SHA-256 of them where it has one (one pass at
    C speed), else record by record with the TFRecord CRCs. A digest
    mismatch also runs the CRCs, so the error names the bad record's
    offset when one is at fault.
    """
    path = ref.path
    manifest = ref.manifest
    try:
        with open(path, "rb") as handle:
            data = handle.read() if (verify_checksum or not positives_only) else handle.read(manifest.positive_bytes)
    except OSError as error:
        raise BatchFormatError(path, None, f"cannot read batch file: {error}") from error
    if verify_checksum:
        if len(data) != manifest.total_bytes:
            raise BatchFormatError(path, len(data), f"file has {len(data)} bytes, manifest says {manifest.total_bytes}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.sha256:
            raise BatchFormatError(path, None, f"SHA-256 {digest} does not match manifest {manifest.sha256}")
    end = manifest.positive_bytes if positives_only else None
    if end is not None and len(data) < end:
        raise BatchFormatError(path, len(data), f"file is truncated: clicked section needs {end} bytes")
    expected_digest = manifest.positive_sha256 if positives_only else manifest.sha256
    digest_matches = False
    if expected_digest is not None:
        section = memoryview(data)[:end] if end is not None else data
        digest = hashlib.sha256(section).hexdigest()
        digest_matches = digest == expected_digest
        if not digest_matches:
            record_frames(path, data, end)  # raises at the first bad record, if there is one
            what = "clicked section" if positives_only else "file"
            raise BatchFormatError(path, None, f"SHA-256 of the {what} {digest} does not match manifest {expected_digest}")
    columns = decode_records(path, data, spec, end, check_crcs=not digest_matches)
    expected = manifest.positives if positives_only else manifest.records
    if len(columns) != expected:
        raise BatchFormatError(path, None, f"decoded {len(columns)} records, manifest says {expected}")
    if positives_only and len(columns) and not np.all(columns.labels == 1):
        raise BatchFormatError(path, None, "clicked section holds a record whose label is not 1")
    return columns


def iter_batches(refs: Iterable[BatchRef], spec: FeatureSpec, *, positives_only: bool = True) -> Iterator[tuple[BatchRef, SampleColumns]]:
    """Stream batches one file at a time (a day never has to fit in memory)."""
    for ref in refs:
        yield ref, read_batch(ref, spec, positives_only=positives_only)
