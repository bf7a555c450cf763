"""Malformed and oversized requests get a 4xx with a reason code, counted
in ``/metrics`` by endpoint and reason; the service goes on answering.
Through the real app in process (``TestClient``), and through a real
uvicorn where the socket matters (the body-size limit, by Content-Length
and chunked)."""

from __future__ import annotations

import json
import socket

import pytest
from freshtower.publisher.publish import Publisher
from freshtower.publisher.service import ServiceThread, create_app
from freshtower.trainer.online import OnlineTrainer
from starlette.testclient import TestClient

from tests.publisher.conftest import publisher_settings

LIMIT = 4096  # service.max_request_bytes in these tests
OVER_LIMIT = "over the limit service.max_request_bytes = 4,096 bytes"

# body, status, reason code, words the message must hold
REJECTED = [
    ({"user_id": "u1", "k": 0}, 422, "invalid_k", "body.k: Input should be greater than or equal to 1"),
    ({"user_id": "u1", "k": -5}, 422, "invalid_k", "body.k: Input should be greater than or equal to 1"),
    ({"user_id": "u1", "k": 1001}, 422, "k_above_max", "k = 1001 is above the limit service.max_k = 1000"),
    ({"user_id": "u1", "k": 2**70}, 422, "k_above_max", "is above the limit service.max_k"),
    ({"user_id": "u1", "k": "ten"}, 422, "invalid_k", "body.k: Input should be a valid integer"),
    ({"user_id": "u1", "user_features": {f"f{i}": 1 for i in range(65)}}, 422, "invalid_user_features", "at most 64 items"),
    ({"user_id": "u1", "user_features": {"activity_7d": 1e39}}, 422, "feature_mismatch", "within float32 range"),
    ({"user_id": "u1", "user_features": {"activity_7d": 10**400}}, 422, "feature_mismatch", "within float32 range"),
    ({"user_id": "u1", "user_features": {"shoe_size": 44}}, 422, "feature_mismatch", "unknown user feature(s) ['shoe_size']"),
    ({"user_id": "u1", "user_features": {"city": ["c3"]}}, 422, "invalid_user_features", "body.user_features.city"),
    ({"user_id": "x" * 257}, 422, "invalid_user_id", "body.user_id: String should have at most 256 characters"),
    ({"user_id": ""}, 422, "invalid_user_id", "body.user_id: String should have at least 1 character"),
    ({"user_id": "u1\x00"}, 422, "invalid_user_id", "body.user_id: must not contain control characters"),
    ({"user_id": "line\nbreak"}, 422, "invalid_user_id", "must not contain control characters"),
    ({"user_id": "u1", "extra": 1}, 422, "unknown_field", "body.extra: Extra inputs are not permitted"),
    ({}, 422, "missing_field", "body.user_id: Field required"),
    (b"not json", 422, "invalid_json", "JSON decode error"),
    (b'{"user_id": "u1",', 422, "invalid_json", "JSON decode error"),
    (b"[1, 2]", 422, "body_not_object", "malformed request: body"),
    (b"", 422, "missing_field", "body: Field required"),
    (json.dumps({"user_id": "u1", "user_features": {"city": "c" * LIMIT}}).encode(), 413, "body_too_large", OVER_LIMIT),
]


@pytest.fixture(scope="module")
def settings(tmp_path_factory, day0_model_dir):
    import shutil

    data_dir = tmp_path_factory.mktemp("limits") / "data"
    shutil.copytree(day0_model_dir, data_dir)
    settings = publisher_settings(data_dir, service={"max_request_bytes": LIMIT})
    OnlineTrainer.start(settings).run(max_batches=1, prefetch=False)
    with Publisher(settings) as publisher:
        publisher.tick(now_s=0.0)
    return settings


def post(http: TestClient, body):
    if isinstance(body, bytes):
        return http.post("/v1/recall", content=body, headers={"content-type": "application/json"})
    return http.post("/v1/recall", content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def rejected_counts(metrics: str) -> dict[tuple[str, str], float]:
    counts = {}
    for line in metrics.splitlines():
        if line.startswith("freshtower_rejected_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            parsed = dict(part.split("=") for part in labels[len("freshtower_rejected_requests_total{") : -1].split(","))
            counts[(parsed["endpoint"].strip('"'), parsed["reason"].strip('"'))] = float(value)
    return counts


def test_malformed_and_oversized_requests_get_a_4xx_with_a_reason_counted_in_metrics(settings):
    with TestClient(create_app(settings)) as http:
        assert post(http, {"user_id": "u1"}).status_code == 200
        for body, status, reason, words in REJECTED:
            response = post(http, body)
            assert response.status_code == status, (body, response.text[:300])
            answer = response.json()
            assert answer["reason"] == reason and words in answer["detail"], (body, answer)
            assert len(response.content) < 2000  # the input is not echoed back
        for content_type in ("text/plain", None):  # as FastAPI's strict content-type check: JSON bodies say so
            headers = {"content-type": content_type} if content_type else {}
            response = http.post("/v1/recall", content=b'{"user_id": "u1"}', headers=headers)
            assert response.status_code == 422 and response.json()["reason"] == "not_json", response.text
        with_charset = {"content-type": "application/json; charset=utf-8"}
        assert http.post("/v1/recall", content=b'{"user_id": "u1"}', headers=with_charset).status_code == 200
        assert http.get("/v1/users/" + "x" * 300 + "/embedding").json()["reason"] == "invalid_user_id"
        assert http.get("/v1/users/bad%07id/embedding").status_code == 422
        assert post(http, {"user_id": "u1"}).status_code == 200  # and it goes on answering
        metrics = http.get("/metrics").text

    expected: dict = {}
    for _, _, reason, _ in REJECTED:
        expected[("recall", reason)] = expected.get(("recall", reason), 0) + 1
    expected[("recall", "not_json")] = 2
    expected[("embedding", "invalid_user_id")] = 2
    assert rejected_counts(metrics) == expected
    assert f'freshtower_recall_requests_total{{outcome="bad_request"}} {float(len(REJECTED) + 2)}' in metrics
    assert 'freshtower_recall_requests_total{outcome="ok"} 3.0' in metrics


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer:
                head, _, body = answer.partition(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                if len(body) >= length:
                    return answer
    return answer


def test_the_body_limit_holds_on_a_real_socket_by_length_and_chunked(settings):
    big = json.dumps({"user_id": "u1", "user_features": {"city": "c" * 10_000}}).encode()
    small = json.dumps({"user_id": "u1"}).encode()
    with ServiceThread(create_app(settings)) as service:
        head = f"POST /v1/recall HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(big)}\r\n\r\n"
        answer = raw_exchange(service.port, head.encode() + big)
        assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer, answer[:300]

        def chunked(body: bytes) -> bytes:
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000]) for i in range(0, len(body), 1000))
            head = "POST /v1/recall HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            return head.encode() + chunks + b"0\r\n\r\n"

        answer = raw_exchange(service.port, chunked(big))
        assert answer.startswith(b"HTTP/1.1 413") and b"a chunked body, " + OVER_LIMIT.encode() in answer, answer[:300]
        answer = raw_exchange(service.port, chunked(small))
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        import httpx

        metrics = httpx.get(f"{service.url}/metrics").text
    assert rejected_counts(metrics) == {("recall", "body_too_large"): 2}
