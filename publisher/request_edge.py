"""The service's edge: a pure ASGI middleware around the app that times
every ``POST /v1/recall`` from the moment the app receives it to the last
byte of its answer (``freshtower_recall_handler_seconds``: routing, body
read and parsing, recall, response encoding; not the HTTP server's parsing
nor the socket).
"""

from __future__ import annotations

import time

RECALL_PATH = "/v1/recall"


class RequestEdge:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != RECALL_PATH:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        metrics = scope["app"].state.metrics

        async def timed_send(message):
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                metrics.handler.observe(time.perf_counter() - started)

        await self.app(scope, receive, timed_send)
