"""The recall service's endpoints, one ``APIRouter``.

Each handler gets what it needs from ``app.state`` (set in the lifespan,
``freshtower.publisher.service``) through small dependencies: the
``LiveRelease`` (the served state and the store), the ``ServiceMetrics``
and the service settings.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from freshtower.core.settings import ServiceConfig
from freshtower.publisher.api_models import (
    USER_ID_MAX,
    ActivateResponse,
    EmbeddingResponse,
    Freshness,
    RecallRequest,
    RecallResponse,
    ReleasesResponse,
    ReleasesUsed,
    ReleaseSummary,
    ScoredItem,
)
from freshtower.publisher.live_release import LiveRelease
from freshtower.publisher.releases import ReleaseError, ReleaseNotFound, parse_version
from freshtower.publisher.service_metrics import ServiceMetrics
from freshtower.publisher.serving import ServingState, recall
from freshtower.publisher.user_tower import FeatureError

router = APIRouter()


# --- what the handlers read from app.state -----------------------------------------
# async, so that FastAPI runs them on the event loop rather than in a worker thread


async def live_release(request: Request) -> LiveRelease:
    return request.app.state.live_release


async def service_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def service_settings(request: Request) -> ServiceConfig:
    return request.app.state.settings.service


Live = Annotated[LiveRelease, Depends(live_release)]
Metrics = Annotated[ServiceMetrics, Depends(service_metrics)]
Config = Annotated[ServiceConfig, Depends(service_settings)]

bearer = HTTPBearer(auto_error=False, description="the configured service.admin_token")


def require_admin(config: Config, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    token = config.admin_token
    if not token:
        raise HTTPException(403, "release activation is disabled: no admin token is configured (service.admin_token)")
    if credentials is None:
        raise HTTPException(401, "this call needs the admin token: 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise HTTPException(401, "wrong admin token", headers={"WWW-Authenticate": "Bearer"})


def serving_state(live: LiveRelease) -> ServingState:
    """The state served now, read once (a later swap does not change it), or 503."""
    state = live.state
    if state is None:
        raise HTTPException(503, f"no release loaded yet (store {live.store.root}, pointer {live.pointer()})")
    return state


async def malformed_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming every field that failed, and the place in the body (the app's handler for RequestValidationError)."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
    if request.url.path == "/v1/recall":
        request.app.state.metrics.requests.labels("bad_request").inc()
    return JSONResponse(status_code=422, content={"detail": f"malformed request: {problems}", "errors": jsonable_encoder(error.errors())})


# --- endpoints ------------------------------------------------------------------------


@router.post(
    "/v1/recall",
    response_model=RecallResponse,
    responses={422: {"description": "malformed request"}, 503: {"description": "no release"}},
)
def recall_endpoint(body: RecallRequest, live: Live, metrics: Metrics, config: Config) -> RecallResponse:
    """Top-k items for a user, computed now from the latest published ID embedding and the request's features."""
    started = time.perf_counter()
    if body.k > config.max_k:
        metrics.requests.labels("bad_request").inc()
        raise HTTPException(422, f"k = {body.k} is above the limit service.max_k = {config.max_k}")
    try:
        state = serving_state(live)
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
        releases=ReleasesUsed.of(state),
        freshness=Freshness(
            newest_click_event_time_ms=state.newest_click_event_time_ms,
            newest_click_age_seconds=time.time() - state.newest_click_event_time_ms / 1000,
            is_upper_bound=state.newest_click_is_bound,
            user_embedding_event_time_ms=result.user_event_time_ms,
        ),
    )


@router.get("/v1/users/{user_id}/embedding", response_model=EmbeddingResponse)
def embedding_endpoint(user_id: str, live: Live) -> EmbeddingResponse:
    """The user's latest published ID embedding (the cold-start row if they have none)."""
    if not 1 <= len(user_id) <= USER_ID_MAX:
        raise HTTPException(422, f"user_id must be 1 to {USER_ID_MAX} characters")
    state = serving_state(live)
    row = state.user_rows.get(user_id)
    event_time = 0 if row is None else int(state.row_event_time_ms[row])
    return EmbeddingResponse(
        user_id=user_id,
        cold_start=row is None,
        dim=state.tower.id_dim,
        id_embedding=state.id_table[0 if row is None else row].tolist(),
        event_time_ms=event_time or None,
        releases=ReleasesUsed.of(state),
    )


@router.get("/v1/releases", response_model=ReleasesResponse)
def releases_endpoint(live: Live) -> ReleasesResponse:
    """Every release in the store, newest last."""
    active = live.pointer()
    serving = live.state.version if live.state is not None else None
    summaries = [
        ReleaseSummary(
            version=release.version,
            kind=release.kind,
            parent=release.parent,
            model_version=release.model_version,
            created_at=release.manifest["created_at"],
            newest_click_event_time_ms=release.manifest["newest_click_event_time_ms"],
            rows=release.manifest["rows"],
            active=release.version == active,
            serving=release.version == serving,
        )
        for release in live.store.list()
    ]
    return ReleasesResponse(active=active, serving=serving, releases=summaries, refused=dict(live.refused))


@router.post(
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
async def activate_endpoint(version: str, request: Request, live: Live) -> ActivateResponse:
    """Serve ``version`` from now on (rollback): verified and loaded first, then the pointer moves."""
    try:
        version = parse_version(version)
        await asyncio.to_thread(live.store.get, version)
    except ValueError as error:
        raise HTTPException(422, str(error)) from error
    except ReleaseNotFound as error:
        raise HTTPException(404, str(error)) from error
    try:
        previous = await live.activate(version, by=f"admin@{request.client.host if request.client else '?'}")
    except ReleaseError as error:
        raise HTTPException(409, f"release {version} cannot be served: {error}") from error
    return ActivateResponse(active=version, previous=previous)


@router.get("/healthz")
def healthz(live: Live) -> JSONResponse:
    """200 while a release is served, 503 before."""
    state = live.state
    body = {"status": "ok" if state else "no release", "serving": state and state.version, "active": live.pointer()}
    if state is not None and body["active"] in live.refused:
        body["status"] = "degraded"
        body["refused"] = live.refused[body["active"]]
    return JSONResponse(body, status_code=200 if state else 503)


@router.get("/metrics")
def metrics_endpoint(metrics: Metrics) -> Response:
    """Prometheus metrics, including freshness."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
