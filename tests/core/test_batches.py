from __future__ import annotations

import json

import numpy as np
import pytest
from tfrecord import example_pb2
from tfrecord.reader import tfrecord_loader

from freshtower.core.batches import (
    BatchFormatError,
    FeatureSpec,
    Sample,
    encode_sample,
    list_batches,
    load_manifest,
    read_batch,
    window_stem,
    write_batch,
)

SPEC = FeatureSpec(("age_bucket", "city"), ("activity_7d",), ("category",))
WINDOW = 1_795_132_800_000  # 2026-11-20 00:00 UTC


def sample(n: int, label: int = 1, **changes) -> Sample:
    fields = dict(
        user_id=f"u{n % 7}",
        item_id=f"i{n}",
        label=label,
        event_time_ms=WINDOW + 1000 * (50 - n),  # written out of order on purpose
        request_id=f"r{n // 3}",
        position=n % 3,
        user_categorical={"age_bucket": "25-34", "city": f"c{n % 2}"},
        user_numeric={"activity_7d": n / 10},
        item_categorical={"category": f"k{n % 4}"},
        hard_negative_ids=(f"h{n}", f"h{n + 1}"),
        teacher_score=0.5 if n % 2 else None,
    )
    fields.update(changes)
    return Sample(**fields)


def test_encoder_bytes_parse_to_the_protobuf_librarys_message():
    s = sample(3, event_time_ms=-5)  # a negative int64 needs the 10-byte varint
    expected = example_pb2.Example()
    f = expected.features.feature
    f["user_id"].bytes_list.value.append(b"u3")
    f["item_id"].bytes_list.value.append(b"i3")
    f["label"].int64_list.value.append(1)
    f["event_time_ms"].int64_list.value.append(-5)
    f["request_id"].bytes_list.value.append(b"r1")
    f["position"].int64_list.value.append(0)
    f["user_cat/age_bucket"].bytes_list.value.append(b"25-34")
    f["user_cat/city"].bytes_list.value.append(b"c1")
    f["user_num/activity_7d"].float_list.value.append(0.3)
    f["item_cat/category"].bytes_list.value.append(b"k3")
    f["hard_negative_ids"].bytes_list.value.extend([b"h3", b"h4"])
    f["teacher_score"].float_list.value.append(0.5)
    assert example_pb2.Example.FromString(encode_sample(s)) == expected


def test_round_trip_puts_clicks_first_in_event_time_order(tmp_path):
    samples = [sample(n, label=int(n % 3 == 0)) for n in range(12)]
    ref = write_batch(tmp_path, WINDOW, WINDOW + 60_000, samples)
    assert ref.path == tmp_path / "2026-11-20" / "000000.tfrecord"
    assert (ref.manifest.records, ref.manifest.positives, ref.manifest.shown) == (12, 4, 8)

    clicked = read_batch(ref, SPEC)
    assert clicked.item_ids == ["i9", "i6", "i3", "i0"]  # clicks at 41, 44, 47, 50 s
    assert np.all(clicked.labels == 1)
    assert clicked.user_categorical["city"] == ["c1", "c0", "c1", "c0"]
    np.testing.assert_allclose(clicked.user_numeric[:, 0], [0.9, 0.6, 0.3, 0.0], rtol=1e-6)
    assert clicked.hard_negative_ids[0] == ("h9", "h10")
    assert np.isnan(clicked.teacher_scores[1]) and clicked.teacher_scores[0] == 0.5

    everything = read_batch(ref, SPEC, positives_only=False, verify_checksum=True)
    assert len(everything) == 12
    assert list(everything.labels) == [1] * 4 + [0] * 8
    assert sorted(everything.item_ids) == sorted(s.item_id for s in samples)


def test_the_tfrecord_package_reads_our_files(tmp_path):
    ref = write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(n) for n in range(5)])
    records = list(tfrecord_loader(str(ref.path), None))
    assert sorted(r["item_id"].decode() for r in records) == [f"i{n}" for n in range(5)]


def test_missing_side_features_read_as_unknown(tmp_path):
    bare = sample(1, user_categorical={}, user_numeric={}, item_categorical={}, hard_negative_ids=())
    columns = read_batch(write_batch(tmp_path, WINDOW, WINDOW + 60_000, [bare]), SPEC)
    assert columns.user_categorical == {"age_bucket": [""], "city": [""]}
    assert columns.user_numeric.tolist() == [[0.0]]
    assert columns.hard_negative_ids == [()]


def test_rewriting_a_window_replaces_the_batch(tmp_path):
    write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(n) for n in range(5)])
    assert list_batches(tmp_path)[0].manifest.records == 5  # parsed and cached
    write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(n) for n in range(3)])
    refs = list_batches(tmp_path)
    assert len(refs) == 1 and refs[0].manifest.records == 3
    assert sorted(p.name for p in (tmp_path / "2026-11-20").iterdir()) == ["000000.json", "000000.tfrecord"]


def test_a_window_may_have_several_parts_and_rewriting_one_replaces_only_it(tmp_path):
    write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(n) for n in range(5)], part="p1")
    write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(n) for n in range(2)], part="p0")
    write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(n) for n in range(3)], part="p1")
    refs = list_batches(tmp_path)
    assert [(r.manifest.file, r.manifest.records) for r in refs] == [("000000-p0.tfrecord", 2), ("000000-p1.tfrecord", 3)]
    with pytest.raises(ValueError):
        write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(0)], part="../p1")  # a name, never a path


def test_list_batches_orders_windows_and_ignores_files_without_manifest(tmp_path):
    for minute in (3, 1, 2):
        write_batch(tmp_path, WINDOW + minute * 60_000, WINDOW + (minute + 1) * 60_000, [sample(minute)])
    (tmp_path / "2026-11-20" / "000400.tfrecord").write_bytes(b"half written")
    assert [r.window_start_ms for r in list_batches(tmp_path)] == [WINDOW + m * 60_000 for m in (1, 2, 3)]
    assert [r.window_start_ms for r in list_batches(tmp_path, "2026-11-20")] == [WINDOW + m * 60_000 for m in (1, 2, 3)]
    with pytest.raises(ValueError):
        list_batches(tmp_path, "../../etc")  # a day, never a path


def test_a_flipped_byte_names_the_file_and_offset(tmp_path):
    ref = write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(n) for n in range(4)])
    data = bytearray(ref.path.read_bytes())
    first_record = 12 + int.from_bytes(data[:8], "little") + 4  # header + payload + footer
    data[first_record + 20] ^= 0x01  # inside the second record's payload
    ref.path.write_bytes(bytes(data))
    with pytest.raises(BatchFormatError) as caught:
        read_batch(ref, SPEC)
    assert caught.value.offset == first_record
    assert str(ref.path) in str(caught.value) and f"byte offset {first_record}" in str(caught.value)


def test_a_truncated_file_is_reported(tmp_path):
    ref = write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(n) for n in range(4)])
    ref.path.write_bytes(ref.path.read_bytes()[:-7])
    with pytest.raises(BatchFormatError, match="truncated"):
        read_batch(ref, SPEC, positives_only=False)


def test_checksum_verification_catches_a_swapped_file(tmp_path):
    ref = write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(n) for n in range(4)])
    other = write_batch(tmp_path / "other", WINDOW, WINDOW + 60_000, [sample(n + 1) for n in range(4)])
    ref.path.write_bytes(other.path.read_bytes())
    with pytest.raises(BatchFormatError, match="SHA-256"):
        read_batch(ref, SPEC, verify_checksum=True)


def test_a_manifest_cannot_point_outside_its_directory(tmp_path):
    ref = write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(1)])
    manifest = json.loads(ref.manifest_path.read_text())
    manifest["file"] = "../../secret.tfrecord"
    ref.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BatchFormatError, match="outside its directory"):
        load_manifest(ref.manifest_path)


def test_a_record_missing_a_required_field_is_reported(tmp_path):
    payload = example_pb2.Example()
    payload.features.feature["item_id"].bytes_list.value.append(b"i1")  # no user_id
    # A writer that wrote such a record: sizes and digests agree with the bytes.
    ref = write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(1)], encode=lambda _: payload.SerializeToString())
    for positives_only in (True, False):
        with pytest.raises(BatchFormatError, match="byte offset 0: record is not a valid training sample"):
            read_batch(ref, SPEC, positives_only=positives_only)


def test_bytes_that_do_not_match_the_manifest_digest_are_refused_even_with_valid_crcs(tmp_path):
    ref = write_batch(tmp_path, WINDOW, WINDOW + 60_000, [sample(1), sample(2)])
    other = write_batch(tmp_path / "other", WINDOW, WINDOW + 60_000, [sample(3), sample(4)])
    ref.path.write_bytes(other.path.read_bytes())  # well-framed, every CRC right, not this batch
    assert len(read_batch(other, SPEC)) == 2
    for positives_only in (True, False):
        with pytest.raises(BatchFormatError, match="SHA-256"):
            read_batch(ref, SPEC, positives_only=positives_only)


def test_window_stem_rejects_sub_second_windows():
    assert window_stem(WINDOW + 90_000) == ("2026-11-20", "000130")
    with pytest.raises(ValueError):
        window_stem(WINDOW + 1)


def test_span_is_take_of_a_range_with_ragged_hard_negatives(tmp_path):
    samples = [sample(n, hard_negative_ids=tuple(f"h{n}-{j}" for j in range(n % 4))) for n in range(10)]
    columns = read_batch(write_batch(tmp_path, WINDOW, WINDOW + 60_000, samples), SPEC)
    columns.user_id_fingerprints(), columns.hard_negative_id_fingerprints()  # cached columns are cut too
    for start, stop in [(0, 4), (3, 9), (7, 50), (10, 12)]:
        expected, got = columns.take(np.arange(start, min(stop, len(columns)))), columns.span(start, stop)
        assert got.item_ids == expected.item_ids and got.hard_negative_ids == expected.hard_negative_ids
        assert list(got.hard_negative_offsets) == list(expected.hard_negative_offsets)
        assert np.array_equal(got.user_fingerprints, expected.user_fingerprints)
        assert np.array_equal(got.hard_negative_id_fingerprints(), expected.hard_negative_id_fingerprints())
        assert got.user_categorical == expected.user_categorical and np.array_equal(got.user_numeric, expected.user_numeric)
        assert {k: v.tolist() for k, v in got.user_categorical_value_fingerprints().items()} == {
            k: v.tolist() for k, v in expected.user_categorical_value_fingerprints().items()
        }


def _columns_equal(a, b) -> bool:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            if not np.array_equal(value, other, equal_nan=value.dtype.kind == "f"):
                return False
        elif isinstance(value, dict) and value and isinstance(next(iter(value.values())), np.ndarray):
            if value.keys() != other.keys() or not all(np.array_equal(value[k], other[k]) for k in value):
                return False
        elif value != other:
            return False
    return True


def test_columns_survive_pickling_between_processes(tmp_path):
    import pickle

    samples = [sample(n, hard_negative_ids=tuple(f"h{n}-{j}" for j in range(n % 3))) for n in range(6)]
    columns = read_batch(write_batch(tmp_path, WINDOW, WINDOW + 60_000, samples), SPEC)
    columns.user_id_fingerprints(), columns.user_categorical_value_fingerprints()
    columns.user_categorical["city"][2] = ""  # an unknown value
    copy = pickle.loads(pickle.dumps(columns))
    assert _columns_equal(copy, columns) and sorted(copy.item_ids) == sorted(s.item_id for s in samples)
    # a NUL inside a value (never from streams) still round-trips: that column is pickled as a list
    columns.request_ids[1] = "r\x00x"
    assert pickle.loads(pickle.dumps(columns)).request_ids == columns.request_ids
    empty = columns.span(0, 0)
    assert _columns_equal(pickle.loads(pickle.dumps(empty)), empty) and pickle.loads(pickle.dumps(empty)).user_ids == []
