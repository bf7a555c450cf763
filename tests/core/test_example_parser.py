"""The vectorised Example parser against the protobuf library (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from tfrecord import example_pb2

from freshtower.core import batches
from freshtower.core.batches import FeatureSpec, decode, frame_record
from freshtower.core.batches.example_parser import Unsupported
from freshtower.core.fingerprints import fingerprint_strings

SPEC = FeatureSpec(("age", "city"), ("score", "other"), ("category",))


def random_example(rng: np.random.Generator, n: int) -> bytes:
    """An Example as any protobuf writer might produce it: keys in random
    order, optional features missing, unwanted keys, long values, big ints."""
    example = example_pb2.Example()
    entries = [
        ("user_id", lambda f: f.bytes_list.value.append(f"u{n}-{'x' * int(rng.integers(0, 200))}".encode())),
        ("item_id", lambda f: f.bytes_list.value.append(f"i{rng.integers(0, 10**9)}é".encode())),
        ("label", lambda f: f.int64_list.value.append(int(rng.integers(0, 2)))),
        ("event_time_ms", lambda f: f.int64_list.value.append(int(rng.integers(-(2**40), 2**62)))),
        ("request_id", lambda f: f.bytes_list.value.append(f"r{n}".encode())),
        ("position", lambda f: f.int64_list.value.append(int(rng.integers(0, 300)))),
    ]
    if rng.random() < 0.7:
        entries.append(("user_cat/age", lambda f: f.bytes_list.value.append(b"25-34")))
    if rng.random() < 0.7:
        entries.append(("user_cat/city", lambda f: f.bytes_list.value.extend([b"c1", b"ignored-second-value"])))
    if rng.random() < 0.7:
        entries.append(("user_num/score", lambda f: f.float_list.value.extend(rng.random(int(rng.integers(1, 3))).tolist())))
    if rng.random() < 0.5:
        entries.append(("item_cat/category", lambda f: f.bytes_list.value.append(b"")))
    if rng.random() < 0.8:
        count = int(rng.integers(0, 40))
        entries.append(("hard_negative_ids", lambda f: f.bytes_list.value.extend(f"h{rng.integers(0, 99)}".encode() for _ in range(count))))
    if rng.random() < 0.5:
        entries.append(("teacher_score", lambda f: f.float_list.value.append(float(rng.random()))))
    if rng.random() < 0.5:
        entries.append(("some_other_key_that_is_quite_long_indeed", lambda f: f.int64_list.value.extend([1, 2, 3])))
    for index in rng.permutation(len(entries)):
        key, fill = entries[index]
        fill(example.features.feature[key])
    return example.SerializeToString()


def decode_both(data: bytes):
    frames = batches.record_frames("test", data)
    fast = decode._decode_vectorised(data, frames, SPEC)
    reference = decode._decode_with_protobuf("test", data, SPEC, frames)
    return fast, reference


def assert_same(fast, reference):
    for name in ("user_ids", "item_ids", "request_ids", "user_categorical", "item_categorical", "hard_negative_flat"):
        assert getattr(fast, name) == getattr(reference, name), name
    for name in ("labels", "event_time_ms", "positions", "user_numeric", "hard_negative_offsets"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(reference, name), err_msg=name)
    np.testing.assert_array_equal(fast.teacher_scores, reference.teacher_scores)  # NaN == NaN here
    np.testing.assert_array_equal(fast.user_fingerprints, fingerprint_strings(reference.user_ids))
    np.testing.assert_array_equal(fast.item_fingerprints, fingerprint_strings(reference.item_ids))
    np.testing.assert_array_equal(fast.hard_negative_fingerprints, fingerprint_strings(reference.hard_negative_flat))
    assert fast.user_categorical_fingerprints.keys() == reference.user_categorical.keys()
    for name, values in reference.user_categorical.items():
        np.testing.assert_array_equal(fast.user_categorical_fingerprints[name], fingerprint_strings(values), err_msg=name)


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_parser_agrees_with_protobuf_on_random_examples(seed):
    rng = np.random.default_rng(seed)
    data = b"".join(frame_record(random_example(rng, n)) for n in range(300))
    assert_same(*decode_both(data))


def fixed_order_example(n: int, city_key: str) -> bytes:
    """One writer's layout: the same keys in the same order in every record,
    except the key at one step (same length, other bytes)."""
    example = example_pb2.Example()
    feature = example.features.feature
    for key in ("user_id", "item_id", "label", "event_time_ms", "request_id", "position"):
        feature[key]  # insertion order is the wire order
    feature["user_id"].bytes_list.value.append(f"u{n}".encode())
    feature["item_id"].bytes_list.value.append(f"i{n % 7}".encode())
    feature["label"].int64_list.value.append(1)
    feature["event_time_ms"].int64_list.value.append(1_000 + n)
    feature["request_id"].bytes_list.value.append(f"r{n}".encode())
    feature["position"].int64_list.value.append(n % 5)
    feature[city_key].bytes_list.value.append(f"c{n}".encode())
    feature["hard_negative_ids"].bytes_list.value.extend([b"h1", f"h{n}".encode()])
    return example.SerializeToString()


@pytest.mark.parametrize("other_key", ["user_cat/city", "user_cat/ctiy", "user_cat/cit"])
def test_records_sharing_a_layout_agree_with_protobuf(other_key):
    # Every record has the same keys at every step (the fast path), except
    # every third one, whose key at one step is another (wanted or not).
    data = b"".join(frame_record(fixed_order_example(n, other_key if n % 3 == 0 else "user_cat/city")) for n in range(50))
    fast, reference = decode_both(data)
    assert_same(fast, reference)
    expected = [f"c{n}" if n % 3 or other_key == "user_cat/city" else "" for n in range(50)]
    assert fast.user_categorical["city"] == expected


def test_records_the_parser_does_not_cover_fall_back_to_protobuf():
    example = example_pb2.Example()
    example.features.feature["user_id"].bytes_list.value.append(b"u1")
    features = example.SerializeToString()[2:]  # strip Example's own tag + length
    # A map entry whose Int64List is unpacked (field 1 as a bare varint) is
    # legal protobuf that our writer never produces.
    entry = bytes([0x0A, 0x08]) + b"position" + bytes([0x12, 0x04, 0x1A, 0x02, 0x08, 0x05])
    features += bytes([0x0A, len(entry)]) + entry
    record = bytes([0x0A, len(features)]) + features
    parsed = example_pb2.Example.FromString(record)
    assert parsed.features.feature["position"].int64_list.value == [5]
    data = frame_record(record)
    frames = batches.record_frames("test", data)
    with pytest.raises(Unsupported):
        decode._decode_vectorised(data, frames, SPEC)
    with pytest.raises(batches.BatchFormatError, match="byte offset 0"):  # no item_id: the reference path names it
        batches.decode_records("test", data, SPEC)
