"""Vectorised parsing of ``tf.train.Example`` records, all records of a file
at once, with numpy.

Reading one Example at a time through protobuf costs ~20 us per record in
Python (each field access builds wrapper objects), which would cap the
online trainer at the decode rate. Here the protobuf wire format is walked
in lockstep over every record: step j reads the j-th map entry of all
records with a few array operations, so the per-record cost is a few
hundred nanoseconds.

Scope: the encodings protobuf writers produce for Example (features as
field 1, map entries as key-then-value, packed numeric lists). Anything
else (unpacked lists, unknown fields, a record that is not an Example)
raises ``Unsupported``, and the caller falls back to the protobuf library,
which stays the reference: ``tests/streams/test_example_parser.py`` checks
both agree on randomly generated records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MAX_VARINT = 10


class Unsupported(ValueError):
    """The records use an encoding this parser does not handle."""


def _varints(buf: np.ndarray, positions: np.ndarray, limits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode one varint at each position: (values uint64, byte lengths)."""
    if len(positions) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    first = buf[np.minimum(positions, len(buf) - 1)]
    single = first < 0x80
    if single.all():  # lengths below 128: the common case, one byte each
        if np.any(positions >= limits):
            raise Unsupported("varint runs past its message")
        return first.astype(np.uint64), np.ones(len(positions), np.int64)
    values = first.astype(np.uint64)
    lengths = np.ones(len(positions), np.int64)
    multi = np.flatnonzero(~single)
    values[multi], lengths[multi] = _long_varints(buf, positions[multi], limits[multi])
    if np.any(positions + lengths > limits):
        raise Unsupported("varint runs past its message")
    return values, lengths


def _long_varints(buf: np.ndarray, positions: np.ndarray, limits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    span = positions[:, None] + np.arange(_MAX_VARINT)  # (n, 10)
    raw = buf[np.minimum(span, len(buf) - 1)]
    last = (raw & 0x80) == 0  # the byte that ends the varint
    if not np.all(last.any(axis=1)):
        raise Unsupported("varint longer than 10 bytes")
    lengths = last.argmax(axis=1) + 1
    if np.any(positions + lengths > limits):
        raise Unsupported("varint runs past its message")
    keep = np.arange(_MAX_VARINT)[None, :] < lengths[:, None]
    parts = (raw & 0x7F).astype(np.uint64) << (np.arange(_MAX_VARINT, dtype=np.uint64) * np.uint64(7))
    return np.where(keep, parts, np.uint64(0)).sum(axis=1, dtype=np.uint64), lengths


def _byte(buf: np.ndarray, positions: np.ndarray, limits: np.ndarray, expected: int, what: str) -> None:
    if np.any(positions >= limits) or np.any(buf[np.minimum(positions, len(buf) - 1)] != expected):
        raise Unsupported(f"expected tag {expected:#x} at {what}")


def _length_delimited(buf, positions, limits, tag: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Tag byte + length varint at ``positions``: (content start, content end)."""
    _byte(buf, positions, limits, tag, what)
    length, size = _varints(buf, positions + 1, limits)
    start = positions + 1 + size
    end = start + length.astype(np.int64)
    if np.any(end > limits):
        raise Unsupported(f"{what} runs past its message")
    return start, end


@dataclass
class FeatureRanges:
    """Where each record's value of one feature key lies (-1: absent)."""

    kind: np.ndarray  # (N,) Feature tag: 0x0a bytes, 0x12 float, 0x1a int64; 0 absent
    start: np.ndarray  # (N,) start of the list's content (inside the Feature)
    end: np.ndarray  # (N,) end of the list's content


def locate_features(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, keys: list[bytes]) -> dict[bytes, FeatureRanges]:
    """Find, for every record [starts[i], ends[i]) of ``buf``, the list
    content of each wanted feature key. Unwanted keys are skipped; a key
    that appears twice keeps its last value (protobuf map semantics)."""
    n = len(starts)
    found = {k: FeatureRanges(np.zeros(n, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64)) for k in keys}
    if n == 0:
        return found
    # Example: field 1 (features) must span the whole record.
    feature_start, feature_end = _length_delimited(buf, starts, ends, 0x0A, "Example.features")
    if np.any(feature_end != ends):
        raise Unsupported("Example has fields besides one 'features'")
    max_key = max(len(k) for k in keys)
    key_matrix = np.zeros((len(keys), max_key), np.uint8)
    for i, k in enumerate(keys):
        key_matrix[i, : len(k)] = np.frombuffer(k, np.uint8)
    key_lengths = np.array([len(k) for k in keys])
    # Keys are told apart by a polynomial hash of their bytes, then checked
    # byte for byte against the key the hash points to.
    weights = (np.uint64(1099511628211) ** np.arange(max_key, dtype=np.uint64)).astype(np.uint64)
    key_hashes = (key_matrix.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64) + key_lengths.astype(np.uint64)
    hash_order = np.argsort(key_hashes)
    sorted_hashes = key_hashes[hash_order]
    key_index = {k: i for i, k in enumerate(keys)}
    cursor = feature_start.copy()
    rows = np.arange(n)
    while True:
        active = cursor < feature_end
        if not active.any():
            break
        r = rows[active]
        position, limit = cursor[r], feature_end[r]
        entry_start, entry_end = _length_delimited(buf, position, limit, 0x0A, "Features.feature entry")
        key_start, key_end = _length_delimited(buf, entry_start, entry_end, 0x0A, "map key")
        key_length = key_end - key_start
        value_start, value_end = _length_delimited(buf, key_end, entry_end, 0x12, "map value")
        if np.any(value_end != entry_end):
            raise Unsupported("map entry has fields after its value")
        kind = buf[np.minimum(value_start, len(buf) - 1)]  # the Feature's list type
        shared = _shared_key(buf, key_start, key_length)
        if shared is not None:  # every record has the same key here (one writer, one layout): no hashing
            index = key_index.get(shared)
            hits = [] if index is None else [(index, np.arange(len(r)))]
        else:
            hits = _identify_keys(buf, key_start, key_length, max_key, key_matrix, key_lengths, weights, sorted_hashes, hash_order)
        for index, hit in hits:
            key = keys[index]
            records = r[hit]
            vs, ve = value_start[hit], value_end[hit]
            empty = vs >= ve  # a Feature with no list set reads as absent
            tags = np.where(empty, 0, kind[hit]).astype(np.int64)
            if np.any(~np.isin(tags, (0, 0x0A, 0x12, 0x1A))):
                raise Unsupported(f"feature {key!r} has an unknown list type")
            nonempty = ~empty
            cs = np.full(len(hit), -1, np.int64)
            ce = np.full(len(hit), -1, np.int64)
            if nonempty.any():
                s, e = _list_content(buf, vs[nonempty], ve[nonempty], tags[nonempty], key)
                cs[nonempty], ce[nonempty] = s, e
            ranges = found[key]
            ranges.kind[records] = tags
            ranges.start[records] = cs
            ranges.end[records] = ce
        cursor[r] = entry_end
    return found


def _shared_key(buf: np.ndarray, key_start: np.ndarray, key_length: np.ndarray) -> bytes | None:
    """The key, if every entry at this step has the same one (else None)."""
    length = int(key_length[0])
    if np.any(key_length != length):
        return None
    first = int(key_start[0])
    key = bytes(buf[first : first + length])
    if length and len(key_start) > 1:
        key_bytes = buf[key_start[:, None] + np.arange(length)]
        if np.any(key_bytes != key_bytes[0]):
            return None
    return key


def _identify_keys(buf, key_start, key_length, max_key, key_matrix, key_lengths, weights, sorted_hashes, hash_order):
    """[(wanted key index, entry positions)] for entries with differing keys:
    a polynomial hash of each key's bytes, checked byte for byte."""
    width = max_key
    span = key_start[:, None] + np.arange(width)
    key_bytes = np.where(np.arange(width)[None, :] < key_length[:, None], buf[np.minimum(span, len(buf) - 1)], 0)
    entry_hash = (key_bytes.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64) + key_length.astype(np.uint64)
    slot = np.minimum(np.searchsorted(sorted_hashes, entry_hash), len(sorted_hashes) - 1)
    candidate = hash_order[slot]  # (m,) index of the wanted key this entry may be
    wanted = (sorted_hashes[slot] == entry_hash) & (key_length == key_lengths[candidate])
    wanted &= np.all(key_bytes == key_matrix[candidate], axis=1)
    return [(index, np.flatnonzero(wanted & (candidate == index))) for index in np.unique(candidate[wanted]).tolist()]


def _list_content(buf, value_start, value_end, tags, key) -> tuple[np.ndarray, np.ndarray]:
    """Inside a Feature: the one list field (tag = the Feature's kind)."""
    length, size = _varints(buf, value_start + 1, value_end)
    start = value_start + 1 + size
    end = start + length.astype(np.int64)
    if np.any(end != value_end):
        raise Unsupported(f"feature {key!r} holds more than one list")
    return start, end


def first_packed(buf: np.ndarray, ranges: FeatureRanges, kind: int, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(first element's start, present) of a packed numeric list: inside the
    list message, field 1 length-delimited (packed)."""
    present = ranges.kind == kind
    wrong = (ranges.kind != 0) & ~present
    if np.any(wrong):
        raise Unsupported(f"feature {key!r} has another type than expected")
    rows = np.flatnonzero(present)
    start = np.full(len(ranges.kind), -1, np.int64)
    if len(rows):
        s, e = _length_delimited(buf, ranges.start[rows], ranges.end[rows], 0x0A, f"packed list {key!r}")
        if np.any(e != ranges.end[rows]):
            raise Unsupported(f"packed list {key!r} is followed by other fields")
        has = e > s
        present[rows[~has]] = False
        start[rows[has]] = s[has]
    return start, present


def int64_first(buf: np.ndarray, ranges: FeatureRanges, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(first int64 value, present) per record."""
    start, present = first_packed(buf, ranges, 0x1A, key)
    values = np.zeros(len(start), np.int64)
    rows = np.flatnonzero(present)
    if len(rows):
        decoded, _ = _varints(buf, start[rows], ranges.end[rows])
        values[rows] = decoded.view(np.int64)
    return values, present


def float_first(buf: np.ndarray, ranges: FeatureRanges, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(first float value, present) per record."""
    start, present = first_packed(buf, ranges, 0x12, key)
    values = np.zeros(len(start), np.float32)
    rows = np.flatnonzero(present)
    if len(rows):
        if np.any(start[rows] + 4 > ranges.end[rows]):
            raise Unsupported(f"float list {key!r} is shorter than one float")
        raw = buf[start[rows][:, None] + np.arange(4)]
        values[rows] = np.ascontiguousarray(raw).view("<f4").ravel()
    return values, present


def bytes_values(buf: np.ndarray, ranges: FeatureRanges, key: bytes, first_only: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every value of a bytes list: (record index, value start, value end),
    in record order then list order; ``first_only`` keeps each record's first."""
    present = ranges.kind == 0x0A
    if np.any((ranges.kind != 0) & ~present):
        raise Unsupported(f"feature {key!r} is not a bytes list")
    records = np.flatnonzero(present)
    cursor = ranges.start[records].copy()
    limit = ranges.end[records]
    out_record, out_start, out_end = [], [], []
    alive = cursor < limit
    while alive.any():
        r = np.flatnonzero(alive)
        s, e = _length_delimited(buf, cursor[r], limit[r], 0x0A, f"bytes list {key!r}")
        out_record.append(records[r])
        out_start.append(s)
        out_end.append(e)
        cursor[r] = e
        if first_only:
            break
        alive = cursor < limit
    if not out_record:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    record = np.concatenate(out_record)
    start = np.concatenate(out_start)
    end = np.concatenate(out_end)
    order = np.lexsort((start, record))  # record order, then position in the list
    return record[order], start[order], end[order]


def gather_strings(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> list[str]:
    """UTF-8 strings at [start, end) of ``buf``, decoded in one call: the
    values' bytes are gathered into one buffer, NUL between them, decoded
    and split (IDs never hold NUL: streams rejects them)."""
    n = len(start)
    if n == 0:
        return []
    lengths = end - start
    spaced = lengths + 1  # each value and the NUL after it
    at = np.cumsum(spaced) - spaced  # where each value starts in the joined buffer
    total = int(at[-1] + lengths[-1])
    owner = np.repeat(np.arange(n), spaced)[:total]
    joined = buf[start[owner] + (np.arange(total) - at[owner])]  # a separator's slot reads the byte after its value
    separators = at[1:] - 1
    nul = joined == 0
    nul[separators] = False
    if nul.any():
        raise Unsupported("a string holds a NUL byte")
    joined[separators] = 0
    try:
        return joined.tobytes().decode().split("\x00")
    except UnicodeDecodeError as error:
        raise Unsupported(f"a string is not UTF-8: {error}") from error
