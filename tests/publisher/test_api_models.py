"""The recall body's two readers agree: ``decode_recall_request`` (msgspec,
the hot path, falling back to pydantic) accepts exactly what
``RecallRequest`` (the schema) accepts, with the same values, and msgspec
alone never accepts what pydantic refuses; the encoded answer is a
``RecallResponse``."""

from __future__ import annotations

import json

import msgspec
import pytest
from freshtower.publisher.api_models import (
    USER_FEATURES_MAX,
    USER_ID_MAX,
    MalformedBody,
    RecallQuery,
    RecallRequest,
    RecallResponse,
    ReleasesUsed,
    decode_recall_request,
    recall_response_json,
)
from freshtower.publisher.serving import RecallResult

features_at_limit = {f"f{i}": i for i in range(USER_FEATURES_MAX)}
BODIES = [
    b'{"user_id": "u1"}',
    b'{"user_id": "u1", "k": 5, "user_features": {"city": "c3", "activity_7d": 0.4, "visits": 3}}',
    b'{"user_id": "u1", "k": "10"}',  # pydantic's lax int: accepted as 10
    b'{"user_id": "u1", "k": 10.0}',  # likewise
    b'{"user_id": "u1", "k": 10.5}',
    b'{"user_id": "u1", "k": true}',
    b'{"user_id": "u1", "k": 0}',
    b'{"user_id": "u1", "k": -3}',
    b'{"user_id": "u1", "k": 100000000000000000000000}',  # accepted here; the handler refuses it as above service.max_k
    b'{"user_id": "u1", "k": null}',
    b'{"user_id": ""}',
    json.dumps({"user_id": "x" * USER_ID_MAX}).encode(),
    json.dumps({"user_id": "x" * (USER_ID_MAX + 1)}).encode(),
    json.dumps({"user_id": "\U0001f600" * USER_ID_MAX}, ensure_ascii=False).encode(),  # characters, not bytes
    json.dumps({"user_id": "\U0001f600" * (USER_ID_MAX + 1)}, ensure_ascii=False).encode(),
    b'{"user_id": "u\\u0000"}',
    b'{"user_id": "a\\nb"}',
    b'{"user_id": "\\u007f"}',
    b'{"user_id": "\\u0085"}',  # C1 control
    b'{"user_id": "caf\\u00e9 \\u00a0 \\u4e2d"}',  # printable non-ASCII is fine
    b'{"user_id": 5}',
    b'{"user_id": null}',
    b'{"user_id": "a", "user_id": "b"}',  # duplicate keys: both read the last
    b"{}",
    b"[]",
    b'"u1"',
    b"null",
    b"",
    b"not json",
    b'{"user_id": "u1",',
    b'{"user_id": "u1", "extra": 1}',
    b'{"user_id": "u1", "user_features": null}',
    b'{"user_id": "u1", "user_features": {}}',
    b'{"user_id": "u1", "user_features": {"a": true}}',
    b'{"user_id": "u1", "user_features": {"a": null}}',
    b'{"user_id": "u1", "user_features": {"a": [1]}}',
    b'{"user_id": "u1", "user_features": {"a": {"b": 1}}}',
    b'{"user_id": "u1", "user_features": {"a": 1e400}}',  # inf: accepted here, refused by the tower as not finite
    b'{"user_id": "u1", "user_features": {"a": NaN}}',  # likewise (Python's JSON reads NaN)
    b'{"user_id": "u1", "user_features": {"a": 1.0, "b": 1}}',
    json.dumps({"user_id": "u1", "user_features": features_at_limit}).encode(),
    json.dumps({"user_id": "u1", "user_features": {**features_at_limit, "one_more": 1}}).encode(),
    b'{"user_id": "u1", "k": 5}\n\n',
]


def pydantic_reading(body: bytes):
    try:
        request = RecallRequest.model_validate(json.loads(body))
    except ValueError:  # JSON or validation error
        return None
    return request.user_id, request.user_features, request.k


def reading(request) -> tuple:
    return request.user_id, dict(request.user_features), request.k


@pytest.mark.parametrize("body", BODIES)
def test_the_fast_reader_accepts_what_the_schema_accepts_with_the_same_values(body):
    expected = pydantic_reading(body)
    try:
        got = reading(decode_recall_request(body))
    except MalformedBody as error:
        assert expected is None, (body, error.errors)
        assert error.errors and all(e["loc"][0] == "body" for e in error.errors)
        return
    assert expected is not None, (body, got)
    assert repr(got) == repr(expected)  # repr tells 1 from 1.0 and shows nan
    try:
        fast = msgspec.json.decode(body, type=RecallQuery)
    except msgspec.ValidationError:
        return
    except msgspec.DecodeError:
        return
    assert repr(reading(fast)) == repr(expected)  # what msgspec accepts alone, pydantic accepts the same


def test_malformed_bodies_name_the_field_as_fastapi_does():
    with pytest.raises(MalformedBody) as caught:
        decode_recall_request(b'{"k": 0}')
    assert [(e["loc"], e["type"]) for e in caught.value.errors] == [(("body", "user_id"), "missing"), (("body", "k"), "greater_than_equal")]
    with pytest.raises(MalformedBody) as caught:
        decode_recall_request(b'{"user_id": "u1",')
    assert caught.value.errors[0]["type"] == "json_invalid" and caught.value.errors[0]["loc"] == ("body", 17)


class Served:  # the fields of a ServingState that the answer reads
    version, full_version, model_version = "00000003-embeddings", "00000001-full", "2026-11-20.1"
    newest_click_event_time_ms, newest_click_is_bound = 1_795_000_000_000, False


def test_the_encoded_answer_is_a_recall_response_with_the_same_values():
    result = RecallResult(item_ids=["i7", "i2"], scores=[0.875, -0.25], cold_start=False, user_event_time_ms=1_794_999_000_000)
    body = recall_response_json("u1", result, Served, now_s=1_795_000_060.5)
    response = RecallResponse.model_validate_json(body)
    assert response.model_dump() == {
        "user_id": "u1",
        "cold_start": False,
        "items": [{"item_id": "i7", "score": 0.875}, {"item_id": "i2", "score": -0.25}],
        "releases": ReleasesUsed.of(Served).model_dump(),
        # 1_795_000_060.5 s - 1_795_000_000 s = 60.5 s
        "freshness": {
            "newest_click_event_time_ms": 1_795_000_000_000,
            "newest_click_age_seconds": 60.5,
            "is_upper_bound": False,
            "user_embedding_event_time_ms": 1_794_999_000_000,
        },
    }
    assert list(json.loads(body)) == list(RecallResponse.model_fields)  # same field order as pydantic writes
