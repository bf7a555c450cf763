"""Batch files to ``SampleColumns``: a vectorised walk of the Example wire
format (``example_parser``), with the protobuf library as the reference
for encodings it does not cover; the bytes read are checked against the
manifest's SHA-256 first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tfrecord import example_pb2

from freshtower.core.batches import example_parser
from freshtower.core.batches.example_parser import Unsupported
from freshtower.core.batches.framing import record_frames
from freshtower.core.batches.layout import BatchRef
from freshtower.core.batches.schema import BatchFormatError, FeatureSpec, SampleColumns, empty_columns
from freshtower.core.fingerprints import PAD, fingerprint_ranges
from freshtower.core.storage import sha256_bytes


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
    numpy (``example_parser.py``); records in an encoding that
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

    def value_fingerprints(key: bytes) -> np.ndarray:
        """Fingerprints of a column's values, "" where absent."""
        records, value_start, value_end = ranges(key, False)
        starts, ends = np.zeros(n, np.int64), np.zeros(n, np.int64)
        starts[records], ends[records] = value_start, value_end
        return fingerprint_ranges(buf, starts, ends)

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
        user_categorical_fingerprints={name: value_fingerprints(key) for name, key in zip(spec.user_categorical, user_cat)},
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
        digest = sha256_bytes(data)
        if digest != manifest.sha256:
            raise BatchFormatError(path, None, f"SHA-256 {digest} does not match manifest {manifest.sha256}")
    end = manifest.positive_bytes if positives_only else None
    if end is not None and len(data) < end:
        raise BatchFormatError(path, len(data), f"file is truncated: clicked section needs {end} bytes")
    expected_digest = manifest.positive_sha256 if positives_only else manifest.sha256
    digest_matches = False
    if expected_digest is not None:
        section = memoryview(data)[:end] if end is not None else data
        digest = sha256_bytes(section)
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
