"""``freshtower serve``: the recall service (FastAPI; API docs at ``/docs``
and ``/redoc``, served without internet).

Endpoints (``freshtower.publisher.routes``; bodies in ``api_models``):

- ``POST /v1/recall`` {user_id, user_features, k} -> top-k item IDs with
  cosine scores, the releases used, and freshness (event time of the
  newest click the served embeddings learnt from, and its age);
- ``GET /v1/users/{user_id}/embedding`` -> the user's published ID row;
- ``GET /v1/releases`` -> every release in the store, the active pointer
  and what is being served;
- ``POST /v1/releases/{version}/activate`` -> roll back (or forward) to a
  release; needs ``Authorization: Bearer <service.admin_token>`` and is
  refused outright when no token is configured;
- ``GET /healthz``, ``GET /metrics`` (Prometheus, incl. freshness).

``create_app`` only builds the app; the lifespan loads the active release
(nothing happens at import or construction) from the release store
(``publisher.release_store``: a directory or an S3 bucket) into one
``LiveRelease`` on ``app.state``, beside the metrics and the settings, and
starts the watcher that hot-swaps it when the pointer moves
(``live_release``); with ``service.follow_topic`` it also follows the
user-embeddings topic between releases (``topic_follower``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

# fastapi-offline serves Swagger UI and ReDoc from files inside the package
# instead of FastAPI's default CDN links, which leave /docs blank on a machine
# without internet. Chosen over fastapi-swagger (Swagger UI only, no ReDoc)
# and swagger-ui-bundle (stuck at Swagger UI 4.15.5): maintained since 2021
# with tests in CI, it re-vendors Swagger UI 5 and ReDoc in its releases and
# depends on nothing but FastAPI.
from fastapi_offline import FastAPIOffline
from freshtower.publisher.api_models import RecallRequest
from freshtower.publisher.live_release import LiveRelease
from freshtower.publisher.release_store import open_release_store
from freshtower.publisher.request_edge import RequestEdge
from freshtower.publisher.prerank_routes import prerank_router
from freshtower.publisher.routes import Rejected, malformed_request, rejected_request, router
from freshtower.publisher.service_metrics import ServiceMetrics

from freshtower.core.announcements import Wakeup
from freshtower.core.settings import Settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the active release before the first request, follow the pointer until shutdown."""
    settings: Settings = app.state.settings
    store = open_release_store(settings)
    metrics = ServiceMetrics(serving=lambda: live.state)  # read at scrape time, after `live` exists
    live = LiveRelease(store, metrics, ef_search=settings.service.hnsw_ef_search, prerank_config=settings.prerank)  # on the serving loop
    app.state.live_release, app.state.metrics = live, metrics
    try:
        await live.refresh()
    except Exception:  # start anyway (503 until a release loads); the watcher retries
        log.exception("no release loaded at start from %s", store.root)
    a = settings.announcements
    wakeup = Wakeup(
        settings.bootstrap_servers, settings.topics.releases, enabled=a.enabled, fetch_wait_ms=a.fetch_wait_ms, retry_seconds=a.retry_seconds
    ).start()
    watcher = asyncio.create_task(live.watch(settings.service.poll_seconds, wakeup if a.enabled else None))
    if settings.service.follow_topic:  # rows of newer releases between swaps (topic_follower)
        live.follow(settings.bootstrap_servers, settings.topics.user_embeddings)
    try:
        yield
    finally:
        wakeup.close()
        if live.follower is not None:
            await asyncio.to_thread(live.follower.stop)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def create_app(settings: Settings) -> FastAPI:
    """The service for ``settings.releases_dir``; loads nothing until started."""
    app = FastAPIOffline(
        title="freshtower recall service",
        version="1",
        description="Two-tower retrieval with fresh user ID embeddings: recall, embeddings, releases (hot swap and rollback).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(router)
    app.include_router(prerank_router)
    app.add_exception_handler(RequestValidationError, malformed_request)
    app.add_exception_handler(Rejected, rejected_request)
    large = settings.service.max_prerank_request_bytes
    app.add_middleware(
        RequestEdge, max_request_bytes=settings.service.max_request_bytes, large_paths={"/v1/prerank": large, "/v1/recommend": large}
    )
    _declare_recall_body(app)
    return app


def _declare_recall_body(app: FastAPI) -> None:
    """The recall handler reads its body itself (the hot path, see
    ``api_models``), so FastAPI does not see ``RecallRequest``: add its
    schema to the OpenAPI components, where the route's requestBody points."""
    fastapi_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = fastapi_openapi()["components"]["schemas"]  # fills app.openapi_schema
            schemas["RecallRequest"] = RecallRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        return app.openapi_schema

    app.openapi = openapi


def uvicorn_config(app: FastAPI, host: str, port: int) -> uvicorn.Config:
    """How the service is served: uvloop and the httptools parser (the
    fastest pair uvicorn has: with h11, its pure-Python parser, recall over
    one connection ran ~0.1 ms slower at p50 and ~25% fewer requests a
    second), no access log (a line per request, at thousands a second)."""
    return uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools", access_log=False, log_level="warning", lifespan="on")


class ServiceThread:
    """Run an app with uvicorn in a background thread on loopback (tests and
    benchmarks); ``with ServiceThread(app) as service: service.url``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0):
        from freshtower.core.ports import free_port

        self.host, self.port, self.timeout = host, port or free_port(host), timeout
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port))
        self.thread = threading.Thread(target=self.server.run, name="recall-service", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServiceThread:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError(f"recall service on {self.url} did not start within {self.timeout:.0f} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)
