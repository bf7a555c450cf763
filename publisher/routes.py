"""The recall service's endpoints, one ``APIRouter``.

Each handler gets what it needs from ``app.state`` (set in the lifespan,
``freshtower.publisher.service``) through small dependencies: the
``LiveRelease`` (the served state and the store), the ``ServiceMetrics``
and the service settings.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from freshtower.publisher.api_models import (
    ID_PATTERN,
    USER_ID_MAX,
    ActivateResponse,
    EmbeddingResponse,
    MalformedBody,
    RecallResponse,
    Rejection,
    ReleasesResponse,
    ReleaseSummary,
    ReleasesUsed,
    decode_recall_request,
    recall_response_json,
)
from freshtower.publisher.live_release import LiveRelease
from freshtower.publisher.releases import ReleaseError, ReleaseNotFound, parse_version
from freshtower.publisher.service_metrics import ServiceMetrics, endpoint_label
from freshtower.publisher.serving import ServingState, recall, user_row
from freshtower.publisher.user_tower import FeatureError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from freshtower.core.settings import ServiceConfig

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


class Rejected(Exception):
    """A request answered 4xx for what it sent, with a reason code (counted
    in ``freshtower_rejected_requests_total{endpoint, reason}``) and a message."""

    def __init__(self, status: int, endpoint: str, reason: str, detail: str, errors: list[dict] | None = None):
        super().__init__(detail)
        self.status, self.endpoint, self.reason, self.detail, self.errors = status, endpoint, reason, detail, errors


def reason_code(errors: list[dict]) -> str:
    """The reason code of a validation failure, from its first error: ``invalid_json``,
    ``body_not_object``, ``unknown_field``, ``missing_field`` or ``invalid_<field>``."""
    first = errors[0]
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        return "invalid_json"
    if kind == "extra_forbidden":
        return "unknown_field"
    if kind == "missing":
        return "missing_field"
    if len(loc) < 2 or kind in ("model_attributes_type", "dict_type", "model_type"):
        return "body_not_object"
    return f"invalid_{loc[1]}"


def _message(error: dict) -> str:
    if error["type"] == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == ID_PATTERN:
        return "must not contain control characters (U+0000-U+001F, U+007F-U+009F)"
    return error["msg"]


def problems(errors: list[dict]) -> str:
    """Every error as ``<where>: <what>``, e.g. ``body.k: Input should be greater than or equal to 1``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {_message(e)}" for e in errors)


async def rejected_request(request: Request, error: Rejected) -> JSONResponse:
    """The app's handler for ``Rejected``: count it by endpoint and reason, answer its status."""
    metrics: ServiceMetrics = request.app.state.metrics
    metrics.rejected.labels(error.endpoint, error.reason).inc()
    if error.endpoint == "recall":
        metrics.bad_request.inc()
    body = {"detail": error.detail, "reason": error.reason}  # a Rejection
    if error.errors is not None:  # what failed and where, without echoing the input back
        body["errors"] = [{"type": e["type"], "loc": list(e["loc"]), "msg": _message(e)} for e in error.errors]
    return JSONResponse(status_code=error.status, content=body)


async def malformed_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming every field that failed, and the place in the request (the app's handler for RequestValidationError)."""
    errors = list(error.errors())
    return await rejected_request(
        request, Rejected(422, endpoint_label(request.url.path), reason_code(errors), f"malformed request: {problems(errors)}", errors)
    )


# --- endpoints ------------------------------------------------------------------------

# The recall body is read by the handler itself (see api_models): its schema is declared here.
RECALL_BODY = {
    "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/RecallRequest"}}}, "required": True}
}


@router.post(
    "/v1/recall",
    response_model=RecallResponse,
    openapi_extra=RECALL_BODY,
    responses={
        413: {"description": "body over service.max_request_bytes", "model": Rejection},
        422: {"description": "malformed request", "model": Rejection},
        503: {"description": "no release"},
    },
)
async def recall_endpoint(request: Request) -> Response:
    """Top-k items for a user, computed now from the latest published ID embedding and the request's features."""
    # The hot path: on the event loop (no worker-thread hop), body decoded by
    # msgspec, answer encoded straight to bytes; see docs/service.md.
    app_state = request.app.state
    content_type = request.headers.get("content-type")
    if content_type != "application/json" and not _is_json(content_type):
        sent = repr(content_type) if content_type else "no content-type"
        raise Rejected(422, "recall", "not_json", f"send the body as JSON (content-type: application/json), not with {sent}")
    try:
        query = decode_recall_request(await request.body())
    except MalformedBody as error:
        raise Rejected(422, "recall", reason_code(error.errors), f"malformed request: {problems(error.errors)}", error.errors) from None
    max_k = app_state.settings.service.max_k
    if query.k > max_k:
        raise Rejected(422, "recall", "k_above_max", f"k = {query.k} is above the limit service.max_k = {max_k}")
    metrics: ServiceMetrics = app_state.metrics
    live: LiveRelease = app_state.live_release
    state = live.state  # read once: a swap during this request does not change it
    if state is None:
        metrics.unavailable.inc()
        raise HTTPException(503, f"no release loaded yet (store {live.store.root}, pointer {live.pointer()})")
    started = time.perf_counter()
    try:
        result = recall(state, query.user_id, query.user_features, query.k)
    except FeatureError as error:
        raise Rejected(422, "recall", "feature_mismatch", str(error)) from None
    metrics.latency.observe(time.perf_counter() - started)
    metrics.ok.inc()
    if result.cold_start:
        metrics.cold_start.inc()
    if result.new_items:
        metrics.recall_new_items.inc(result.new_items)
    return Response(recall_response_json(query.user_id, result, state, time.time()), media_type="application/json")


_VALID_ID = re.compile(ID_PATTERN)


def _is_json(content_type: str | None) -> bool:
    """application/json or application/<anything>+json, with parameters, as
    FastAPI's strict content-type check (a browser form cannot send it
    cross-origin without asking first)."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


@router.get(
    "/v1/users/{user_id}/embedding", response_model=EmbeddingResponse, responses={422: {"description": "bad user ID", "model": Rejection}}
)
def embedding_endpoint(user_id: str, live: Live) -> EmbeddingResponse:
    """The user's latest published ID embedding (the cold-start row if they have none)."""
    if not 1 <= len(user_id) <= USER_ID_MAX:
        raise Rejected(422, "embedding", "invalid_user_id", f"user_id must be 1 to {USER_ID_MAX} characters, got {len(user_id)}")
    if not _VALID_ID.match(user_id):
        raise Rejected(422, "embedding", "invalid_user_id", "user_id must not contain control characters (U+0000-U+001F, U+007F-U+009F)")
    state = serving_state(live)
    vector, event_time, cold_start = user_row(state, user_id)
    return EmbeddingResponse(
        user_id=user_id,
        cold_start=cold_start,
        dim=state.tower.id_dim,
        id_embedding=vector.tolist(),
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
            created_at=release.manifest.created_at,
            newest_click_event_time_ms=release.manifest.newest_click_event_time_ms,
            rows=release.manifest.rows,
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
    if state is not None and live.follower is not None:
        body["followed"] = {"through": state.followed_through, "rows": len(state.followed), "topic": live.follower.topic}
    if state is not None and body["active"] in live.refused:
        body["status"] = "degraded"
        body["refused"] = live.refused[body["active"]]
    return JSONResponse(body, status_code=200 if state else 503)


@router.get("/metrics")
def metrics_endpoint(metrics: Metrics) -> Response:
    """Prometheus metrics, including freshness."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
