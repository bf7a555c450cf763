"""``freshtower serve``: the recall service (FastAPI; OpenAPI docs at ``/docs``).

Endpoints:

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

The app loads the active release in its lifespan (nothing happens at
import) and keeps it in one ``ServingState``. A background task reads the
pointer every ``service.poll_seconds``; a new release is loaded and
verified off the event loop, then the reference is swapped. A request
reads the reference once, so requests in flight finish on the state they
started with and none fails during a swap. A release that fails its
checksums is refused and the current state stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import threading
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from freshtower.publisher.releases import ReleaseError, ReleaseNotFound, ReleaseStore, parse_version
from freshtower.publisher.serving import ServingState, load_state, recall
from freshtower.publisher.user_tower import FeatureError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from freshtower.core.settings import Settings

log = logging.getLogger(__name__)

USER_ID_MAX = 256


# --- request and response bodies (they make the OpenAPI schema) -------------------------


class RecallRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(..., min_length=1, max_length=USER_ID_MAX, description="raw user ID; unknown users get the cold-start embedding")
    user_features: dict[str, StrictStr | StrictFloat | StrictInt] = Field(
        default_factory=dict,
        description="categorical features as strings, numeric ones as numbers; absent ones read as unknown / 0",
        examples=[{"age_bucket": "25-34", "city": "c3", "device": "ios", "activity_7d": 0.4, "hour_sin": 0.5, "hour_cos": 0.87}],
    )
    k: int = Field(100, ge=1, description="how many items (at most service.max_k)")


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="cosine between the user and item vectors")


class ReleasesUsed(BaseModel):
    active: str = Field(description="the release served (the newest of its chain)")
    full: str = Field(description="full release: user tower, item vectors, index")
    embeddings: str | None = Field(description="newest embeddings release applied on top, if any")
    model_version: str = Field(description="full-model artifact behind the towers")


class Freshness(BaseModel):
    newest_click_event_time_ms: int = Field(description="event time of the newest click the served embeddings learnt from (ms since epoch)")
    newest_click_age_seconds: float = Field(description="wall time now minus that event time")
    is_upper_bound: bool = Field(description="true while only a full model stands behind it (its data end bounds the click time)")
    user_embedding_event_time_ms: int | None = Field(description="newest click this user's own row learnt from; null if not learnt online")


class RecallResponse(BaseModel):
    user_id: str
    cold_start: bool = Field(description="the user has no published embedding: the default row (cold start) was used")
    items: list[ScoredItem]
    releases: ReleasesUsed
    freshness: Freshness


class EmbeddingResponse(BaseModel):
    user_id: str
    cold_start: bool
    dim: int
    id_embedding: list[float] = Field(description="the published user ID embedding row (input of the user tower)")
    event_time_ms: int | None = Field(description="newest click this row learnt from; null if not learnt online")
    releases: ReleasesUsed


class ReleaseSummary(BaseModel):
    version: str
    kind: str
    parent: str | None
    model_version: str
    created_at: float
    newest_click_event_time_ms: int
    rows: dict[str, int]
    active: bool
    serving: bool


class ReleasesResponse(BaseModel):
    active: str | None = Field(description="what the store's pointer names")
    serving: str | None = Field(description="what this process serves (differs from active while loading, or if active was refused)")
    releases: list[ReleaseSummary]
    refused: dict[str, str] = Field(description="releases this process refused to serve, and why")


class ActivateResponse(BaseModel):
    active: str
    previous: str | None


# --- state and metrics ------------------------------------------------------------


class ServingHolder:
    """The one reference that a hot swap replaces."""

    def __init__(self) -> None:
        self.state: ServingState | None = None
        self.refused: dict[str, str] = {}
        self.swap_lock: asyncio.Lock | None = None  # made in the lifespan, on the serving loop


class ServiceMetrics:
    def __init__(self, holder: ServingHolder):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("freshtower_recall_requests", "recall requests by outcome", ["outcome"], registry=r)
        self.latency = Histogram(
            "freshtower_recall_latency_seconds",
            "in-process recall time (user tower + index search)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.cold_start = Counter("freshtower_recall_cold_start", "recall requests served with the cold-start embedding", registry=r)
        self.swaps = Counter("freshtower_release_swaps", "serving state swaps", registry=r)
        self.refused = Counter("freshtower_release_refused", "releases refused (checksum, missing file, bad shape)", registry=r)
        self.release = Gauge(
            "freshtower_release_info", "the release being served (value 1)", ["version", "full_version", "model_version"], registry=r
        )

        def newest_click() -> float:
            return math.nan if holder.state is None else holder.state.newest_click_event_time_ms / 1000

        def age() -> float:
            return math.nan if holder.state is None else time.time() - holder.state.newest_click_event_time_ms / 1000

        Gauge(
            "freshtower_embeddings_newest_click_event_time_seconds",
            "event time of the newest click the served embeddings learnt from",
            registry=r,
        ).set_function(newest_click)
        Gauge(
            "freshtower_embeddings_freshness_age_seconds",
            "wall time now minus the event time of the newest click the served embeddings learnt from",
            registry=r,
        ).set_function(age)
        Gauge("freshtower_release_loaded_timestamp_seconds", "wall time the served state was loaded", registry=r).set_function(
            lambda: math.nan if holder.state is None else holder.state.loaded_at
        )

    def swapped(self, state: ServingState) -> None:
        self.swaps.inc()
        self.release.clear()
        self.release.labels(state.version, state.full_version, state.model_version).set(1)


def _releases_used(state: ServingState) -> ReleasesUsed:
    embeddings = state.version if state.version != state.full_version else None
    return ReleasesUsed(active=state.version, full=state.full_version, embeddings=embeddings, model_version=state.model_version)


# --- the app ----------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    """The service for ``settings.releases_dir``; loads nothing until started."""
    store = ReleaseStore(settings.releases_dir)
    config = settings.service
    holder = ServingHolder()
    metrics = ServiceMetrics(holder)

    async def swap_to(version: str) -> None:
        """Load ``version`` (off the event loop) and swap; raises ReleaseError."""
        state = await asyncio.to_thread(load_state, store, version, holder.state, config.hnsw_ef_search)
        holder.state = state  # the hot swap: one reference assignment
        metrics.swapped(state)
        log.info("serving release %s (chain %s)", state.version, " -> ".join(state.chain))

    async def refresh() -> None:
        version = await asyncio.to_thread(store.active_version)
        if version is None or version in holder.refused or (holder.state is not None and holder.state.version == version):
            return
        async with holder.swap_lock:
            if holder.state is not None and holder.state.version == version:
                return
            try:
                await swap_to(version)
            except (ReleaseError, OSError, ValueError) as error:
                holder.refused[version] = str(error)
                metrics.refused.inc()
                log.error("refused release %s, still serving %s: %s", version, holder.state and holder.state.version, error)

    async def watch() -> None:
        while True:
            try:
                await refresh()
            except Exception:  # a broken store must not kill the watcher
                log.exception("reading the active release from %s failed", store.root)
            await asyncio.sleep(config.poll_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.swap_lock = asyncio.Lock()  # bound to the loop that serves
        try:
            await refresh()  # load the active release before accepting requests
        except Exception:  # start anyway (503 until a release loads); the watcher retries
            log.exception("no release loaded at start from %s", store.root)
        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    app = FastAPI(
        title="freshtower recall service",
        version="1",
        description="Two-tower retrieval with fresh user ID embeddings: recall, embeddings, releases (hot swap and rollback).",
        lifespan=lifespan,
    )
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.store = store

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        if request.url.path == "/v1/recall":
            metrics.requests.labels("bad_request").inc()
        return JSONResponse(
            status_code=422, content={"detail": f"malformed request: {problems}", "errors": jsonable_encoder(error.errors())}
        )

    bearer = HTTPBearer(auto_error=False, description="the configured service.admin_token")

    def require_admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        token = config.admin_token
        if not token:
            raise HTTPException(403, "release activation is disabled: no admin token is configured (service.admin_token)")
        if credentials is None:
            raise HTTPException(
                401, "this call needs the admin token: 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "wrong admin token", headers={"WWW-Authenticate": "Bearer"})

    def pointer() -> str | None:
        """What ACTIVE names, or why it cannot be read (for messages)."""
        try:
            return store.active_version()
        except ReleaseError as error:
            return f"unreadable: {error}"

    def current() -> ServingState:
        state = holder.state
        if state is None:
            raise HTTPException(503, f"no release loaded yet (store {store.root}, pointer {pointer()})")
        return state

    @app.post(
        "/v1/recall",
        response_model=RecallResponse,
        responses={422: {"description": "malformed request"}, 503: {"description": "no release"}},
    )
    def recall_endpoint(body: RecallRequest) -> RecallResponse:
        """Top-k items for a user, computed now from the latest published ID embedding and the request's features."""
        started = time.perf_counter()
        if body.k > config.max_k:
            metrics.requests.labels("bad_request").inc()
            raise HTTPException(422, f"k = {body.k} is above the limit service.max_k = {config.max_k}")
        try:
            state = current()  # read once: a swap during this request does not affect it
        except HTTPException:
            metrics.requests.labels("unavailable").inc()
            raise
        try:
            result = recall(state, body.user_id, body.user_features, body.k)
        except FeatureError as error:
            metrics.requests.labels("bad_request").inc()
            raise HTTPException(422, str(error)) from error
        metrics.latency.observe(time.perf_counter() - started)
        metrics.requests.labels("ok").inc()
        if result.cold_start:
            metrics.cold_start.inc()
        return RecallResponse(
            user_id=body.user_id,
            cold_start=result.cold_start,
            items=[ScoredItem(item_id=i, score=s) for i, s in zip(result.item_ids, result.scores)],
            releases=_releases_used(state),
            freshness=Freshness(
                newest_click_event_time_ms=state.newest_click_event_time_ms,
                newest_click_age_seconds=time.time() - state.newest_click_event_time_ms / 1000,
                is_upper_bound=state.newest_click_is_bound,
                user_embedding_event_time_ms=result.user_event_time_ms,
            ),
        )

    @app.get("/v1/users/{user_id}/embedding", response_model=EmbeddingResponse)
    def embedding_endpoint(user_id: str) -> EmbeddingResponse:
        """The user's latest published ID embedding (the cold-start row if they have none)."""
        if not 1 <= len(user_id) <= USER_ID_MAX:
            raise HTTPException(422, f"user_id must be 1 to {USER_ID_MAX} characters")
        state = current()
        row = state.user_rows.get(user_id)
        event_time = 0 if row is None else int(state.row_event_time_ms[row])
        return EmbeddingResponse(
            user_id=user_id,
            cold_start=row is None,
            dim=state.tower.id_dim,
            id_embedding=state.id_table[0 if row is None else row].tolist(),
            event_time_ms=event_time or None,
            releases=_releases_used(state),
        )

    @app.get("/v1/releases", response_model=ReleasesResponse)
    def releases_endpoint() -> ReleasesResponse:
        """Every release in the store, newest last."""
        active = pointer()
        serving = holder.state.version if holder.state is not None else None
        summaries = []
        for release in store.list():
            m = release.manifest
            summaries.append(
                ReleaseSummary(
                    version=release.version,
                    kind=release.kind,
                    parent=release.parent,
                    model_version=release.model_version,
                    created_at=m["created_at"],
                    newest_click_event_time_ms=m["newest_click_event_time_ms"],
                    rows=m["rows"],
                    active=release.version == active,
                    serving=release.version == serving,
                )
            )
        return ReleasesResponse(active=active, serving=serving, releases=summaries, refused=dict(holder.refused))

    @app.post(
        "/v1/releases/{version}/activate",
        response_model=ActivateResponse,
        dependencies=[Depends(require_admin)],
        responses={
            401: {"description": "no or wrong admin token"},
            403: {"description": "no admin token configured"},
            404: {"description": "no such release"},
            409: {"description": "the release fails its checks"},
        },
    )
    async def activate_endpoint(version: str, request: Request) -> ActivateResponse:
        """Serve ``version`` from now on (rollback): verified and loaded first, then the pointer moves."""
        try:
            version = parse_version(version)
            await asyncio.to_thread(store.get, version)
        except ValueError as error:
            raise HTTPException(422, str(error)) from error
        except ReleaseNotFound as error:
            raise HTTPException(404, str(error)) from error
        async with holder.swap_lock:
            try:
                state = await asyncio.to_thread(load_state, store, version, holder.state, config.hnsw_ef_search)
                previous = await asyncio.to_thread(store.activate, version, by=f"admin@{request.client.host if request.client else '?'}")
            except ReleaseError as error:
                metrics.refused.inc()
                raise HTTPException(409, f"release {version} cannot be served: {error}") from error
            holder.refused.pop(version, None)
            holder.state = state
            metrics.swapped(state)
        log.warning("release %s activated by an admin (was %s)", version, previous)
        return ActivateResponse(active=version, previous=previous)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """200 while a release is served, 503 before."""
        state = holder.state
        body = {"status": "ok" if state else "no release", "serving": state and state.version, "active": pointer()}
        if state is not None and body["active"] in holder.refused:
            body["status"] = "degraded"
            body["refused"] = holder.refused[body["active"]]
        return JSONResponse(body, status_code=200 if state else 503)

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        """Prometheus metrics, including freshness."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class ServiceThread:
    """Run an app with uvicorn in a background thread on loopback (tests and
    benchmarks); ``with ServiceThread(app) as service: service.url``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0):
        import uvicorn

        from freshtower.core.ports import free_port

        self.host, self.port, self.timeout = host, port or free_port(host), timeout
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on"))
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
