from __future__ import annotations

import itertools

import msgspec
import pytest
from freshtower.streams.events import (
    CLICK,
    IMPRESSION,
    RANK_LOG,
    Click,
    Impression,
    InvalidEvent,
    Limits,
    RankLog,
    event_to_json,
    parse_event,
)

from freshtower.app.simulator import Simulator, SimulatorConfig

CLICK_OK = {"event_id": "c1", "request_id": "r1", "user_id": "u1", "item_id": "i9", "ts": 1_795_132_800_000}
IMPRESSION_OK = {
    "event_id": "imp-r1",
    "request_id": "r1",
    "user_id": "u1",
    "ts": 1_795_132_800_000,
    "items": [{"item_id": "i9", "position": 0, "features": {"category": "c1"}}, {"item_id": "i4", "position": 1}],
    "user_features": {"categorical": {"city": "x"}, "numeric": {"activity_7d": 1}},
}
RANK_OK = {"request_id": "r1", "user_id": "u1", "ts": 5, "stage": "rank", "item_ids": ["a", "b"], "scores": [0.5, 1], "kept": [True, False]}


def parse(kind, event, key=b"u1", limits=Limits()):
    return parse_event(kind, key, event if isinstance(event, bytes) else msgspec.json.encode(event), limits)


def code(kind, event, key=b"u1", limits=Limits()) -> str:
    with pytest.raises(InvalidEvent) as error:
        parse(kind, event, key, limits)
    return error.value.code


def changed(event: dict, **changes) -> dict:
    out = dict(event)
    for name, value in changes.items():
        if value is ...:
            out.pop(name)
        else:
            out[name] = value
    return out


def test_every_simulated_event_is_valid_and_round_trips():
    simulator = Simulator(SimulatorConfig(users=50, items=40, requests_per_day=200, seed=2))
    kinds = {"impressions": IMPRESSION, "clicks": CLICK, "rank-logs": RANK_LOG}
    seen = set()
    for topic, event in simulator.events(0):
        parsed = parse(kinds[topic], event, event["user_id"].encode())
        assert msgspec.json.decode(event_to_json(parsed)) == msgspec.json.decode(msgspec.json.encode(event))
        seen.add(type(parsed))
    assert seen == {Impression, Click, RankLog}


@pytest.mark.parametrize("value, size", [(b"", "0 bytes"), (b"  \n", "3 bytes, whitespace only"), (None, "no value")])
def test_an_empty_message_is_called_an_empty_message(value, size):
    with pytest.raises(InvalidEvent) as error:
        parse_event(CLICK, b"u1", value)
    assert error.value.code == "empty_message"
    assert "empty message" in error.value.message and size in error.value.message


def test_optional_features_default_to_empty_and_unknown_fields_are_ignored():
    event = parse(IMPRESSION, changed(IMPRESSION_OK, user_features=..., added_later="fine"))
    assert event.user_features.categorical == {} and event.items[1].features == {}
    assert event.user_features.numeric == {}
    numeric = parse(IMPRESSION, IMPRESSION_OK).user_features.numeric
    assert numeric == {"activity_7d": 1.0} and type(numeric["activity_7d"]) is float


@pytest.mark.parametrize(
    "kind, payload, expected",
    [
        (CLICK, b"{not json", "invalid_json"),
        (CLICK, b"\xff\xfe{}", "invalid_json"),
        (CLICK, b"[1, 2]", "wrong_type"),
        (CLICK, changed(CLICK_OK, item_id=...), "missing_field"),
        (IMPRESSION, changed(IMPRESSION_OK, items=...), "missing_field"),
        (CLICK, changed(CLICK_OK, ts="1795132800000"), "wrong_type"),
        (CLICK, changed(CLICK_OK, ts=True), "wrong_type"),
        (CLICK, changed(CLICK_OK, ts=1.5), "wrong_type"),
        (CLICK, changed(CLICK_OK, item_id=9), "wrong_type"),
        (IMPRESSION, changed(IMPRESSION_OK, items=[{"item_id": "a", "position": "0"}]), "wrong_type"),
        (RANK_LOG, changed(RANK_OK, kept=[1, 0]), "wrong_type"),
        (CLICK, changed(CLICK_OK, ts=-1), "bad_timestamp"),
        (CLICK, changed(CLICK_OK, ts=10**20), "bad_timestamp"),
        (CLICK, changed(CLICK_OK, event_id=""), "bad_id"),
        (CLICK, changed(CLICK_OK, request_id="r" * 257), "bad_id"),
        (CLICK, changed(CLICK_OK, item_id="i\x00"), "bad_id"),
        (CLICK, changed(CLICK_OK, item_id="i\n2"), "bad_id"),
        (CLICK, changed(CLICK_OK, item_id="i\x85"), "bad_id"),
        (CLICK, changed(CLICK_OK, item_id="i\x7f"), "bad_id"),
        (IMPRESSION, changed(IMPRESSION_OK, items=[{"item_id": "a\x01", "position": 0}]), "bad_id"),
        (IMPRESSION, changed(IMPRESSION_OK, user_features={"categorical": {"city": "\x1b[31m"}}), "bad_id"),
        (IMPRESSION, changed(IMPRESSION_OK, items=[]), "bad_value"),
        (IMPRESSION, changed(IMPRESSION_OK, items=[{"item_id": "a", "position": 0}, {"item_id": "a", "position": 1}]), "bad_value"),
        (IMPRESSION, changed(IMPRESSION_OK, items=[{"item_id": "a", "position": -1}]), "bad_value"),
        (RANK_LOG, changed(RANK_OK, scores=[0.5]), "bad_value"),
        (RANK_LOG, changed(RANK_OK, scores=[0.5, 1.5]), "bad_value"),
        (RANK_LOG, changed(RANK_OK, item_ids=["a", "a"]), "bad_value"),
    ],
)
def test_invalid_events_are_rejected_with_a_reason_code(kind, payload, expected):
    assert code(kind, payload) == expected


def test_reasons_name_the_field():
    with pytest.raises(InvalidEvent, match=r"\$\.items\[0\]\.position"):
        parse(IMPRESSION, changed(IMPRESSION_OK, items=[{"item_id": "a", "position": "0"}]))
    with pytest.raises(InvalidEvent, match=r"item_id contains a control character"):
        parse(CLICK, changed(CLICK_OK, item_id="i\x00"))


def test_oversized_payloads_are_rejected_before_parsing():
    assert code(CLICK, b"{" + b" " * (256 * 1024) + b"}") == "oversized"
    assert code(CLICK, msgspec.json.encode(CLICK_OK), limits=Limits(max_event_bytes=50)) == "oversized"


def test_the_key_must_be_the_user_id():
    assert code(CLICK, CLICK_OK, key=b"u2") == "key_mismatch"
    assert code(CLICK, CLICK_OK, key=None) == "key_mismatch"


def test_limits_come_from_settings():
    assert code(CLICK, changed(CLICK_OK, item_id="x" * 11), limits=Limits(max_id_length=10)) == "bad_id"
    many = [{"item_id": f"i{n}", "position": n} for n in range(4)]
    assert code(IMPRESSION, changed(IMPRESSION_OK, items=many), limits=Limits(max_items=3)) == "bad_value"
    assert len(parse(IMPRESSION, changed(IMPRESSION_OK, items=many), limits=Limits(max_items=4)).items) == 4


def test_non_ascii_ids_without_control_characters_are_fine():
    for item_id, n in zip(("é", "商品-7", "\u00a9", "a\\\\b"), itertools.count()):
        assert parse(CLICK, changed(CLICK_OK, item_id=item_id)).item_id == item_id
