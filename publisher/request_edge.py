"""The service's edge: a pure ASGI middleware around the app that

- refuses a request body over ``service.max_request_bytes`` with 413 before
  the app reads it (by its ``Content-Length``; a chunked body is counted as
  it arrives and refused once it passes the limit), with a JSON reason,
  counted as ``body_too_large`` in ``freshtower_rejected_requests_total``.
  (FastAPI's own ``max_body_size`` answers a declared oversize with a
  plain-text 413 that replaces whatever the app's handlers send, so it could
  be neither explained nor counted.)
- times every ``POST /v1/recall`` from the moment the app receives it until
  its answer is ready to send (``freshtower_recall_handler_seconds``:
  routing, body read and parsing, recall, freshness, response encoding; not
  the HTTP server's parsing, nor the socket writes).
"""

from __future__ import annotations

import json
import time

from freshtower.publisher.service_metrics import RECALL_PATH, ServiceMetrics, endpoint_label


class BodyTooLarge(Exception):
    pass


class RequestEdge:
    def __init__(self, app, max_request_bytes: int, large_paths: dict[str, int] | None = None):
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.large_paths = dict(large_paths or {})  # path -> its own limit (pre-ranking bodies carry thousands of IDs)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        metrics: ServiceMetrics = scope["app"].state.metrics
        limit = self.large_paths.get(scope["path"], self.max_request_bytes)
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = int(value) if value.isdigit() else None  # the HTTP server refuses a malformed one
                break
        if declared is not None and declared > limit:
            await self._too_large(scope, send, metrics, f"{declared:,} bytes")
            return
        answered = False

        async def sending(message):
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                if scope["path"] == RECALL_PATH:  # the answer is encoded: what is left is the socket's
                    metrics.handler.observe(time.perf_counter() - started)
            await send(message)

        if declared is not None:
            await self.app(scope, receive, sending)
            return
        received = 0

        async def counting():  # no Content-Length (chunked): count what arrives
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, counting, sending)
        except BodyTooLarge:
            if answered:
                raise
            await self._too_large(scope, send, metrics, "a chunked body")

    async def _too_large(self, scope, send, metrics: ServiceMetrics, what: str) -> None:
        endpoint = endpoint_label(scope["path"])
        limit = self.large_paths.get(scope["path"], self.max_request_bytes)
        setting = "service.max_prerank_request_bytes" if scope["path"] in self.large_paths else "service.max_request_bytes"
        metrics.rejected.labels(endpoint, "body_too_large").inc()
        if endpoint == "recall":
            metrics.bad_request.inc()
        body = json.dumps(
            {
                "detail": f"request body too large: {what}, over the limit {setting} = {limit:,} bytes",
                "reason": "body_too_large",
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
