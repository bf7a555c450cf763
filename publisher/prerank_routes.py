"""``POST /v1/prerank`` and ``POST /v1/recommend``: the pre-ranker of the
served full release over a request's candidates, and recall chained with
it. Bad input is a 4xx with a reason (``Rejected``); a release without a
pre-ranker answers 503; unknown candidates are scored as cold items and
listed in ``unknown_ids``."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request
from freshtower.publisher.api_models import Rejection
from freshtower.publisher.live_release import LiveRelease
from freshtower.publisher.prerank_api import (
    ItemCacheUse,
    PrerankedItem,
    PrerankFreshness,
    PrerankReleases,
    PrerankRequest,
    PrerankResponse,
    RecommendRequest,
)
from freshtower.publisher.prerank_serving import PrerankAnswer, PrerankState, prerank
from freshtower.publisher.routes import Rejected
from freshtower.publisher.service_metrics import ServiceMetrics
from freshtower.publisher.serving import ServingState, recall
from freshtower.publisher.user_tower import FeatureError

prerank_router = APIRouter()

RESPONSES = {
    413: {"description": "body over service.max_prerank_request_bytes", "model": Rejection},
    422: {"description": "malformed request, or over a configured bound", "model": Rejection},
    503: {"description": "no release, or the served release carries no pre-ranker"},
}


def _states(request: Request, endpoint: str) -> tuple[ServingState, PrerankState]:
    live: LiveRelease = request.app.state.live_release
    metrics: ServiceMetrics = request.app.state.metrics
    state = live.state  # read once: a swap during this request does not change it
    if state is None:
        metrics.prerank_requests.labels(endpoint, "unavailable").inc()
        raise HTTPException(503, f"no release loaded yet (store {live.store.root}, pointer {live.pointer()})")
    if state.prerank is None:
        metrics.prerank_requests.labels(endpoint, "unavailable").inc()
        raise HTTPException(503, f"release {state.full_version} carries no pre-ranker (none trained: no rank logs, or every one refused)")
    return state, state.prerank


def _score(request: Request, endpoint: str, prerank_state: PrerankState, user_id, features, candidates, keep) -> PrerankAnswer:
    metrics: ServiceMetrics = request.app.state.metrics
    started = time.perf_counter()
    try:
        answer = prerank(prerank_state, user_id, features, candidates, keep)
    except FeatureError as error:
        raise Rejected(422, endpoint, "feature_mismatch", str(error)) from None
    metrics.prerank_latency.labels(endpoint).observe(time.perf_counter() - started)
    metrics.prerank_requests.labels(endpoint, "ok").inc()
    metrics.prerank_unknown.inc(len(answer.unknown_ids))
    return answer


def _response(user_id: str, state: ServingState, answer: PrerankAnswer, candidates: int, recall_scores=None) -> PrerankResponse:
    p = state.prerank
    as_of = answer.statistics_as_of_ms
    return PrerankResponse(
        user_id=user_id,
        cold_start=answer.cold_start,
        items=[
            PrerankedItem(item_id=i, score=s, recall_score=None if recall_scores is None else recall_scores[i])
            for i, s in zip(answer.item_ids, answer.logits)
        ],
        candidates=candidates,
        unknown_ids=answer.unknown_ids,
        item_cache=ItemCacheUse(hits=answer.hits, misses=answer.misses),
        releases=PrerankReleases(
            active=state.version,
            full=state.full_version,
            embeddings=state.version if state.version != state.full_version else None,
            model_version=state.model_version,
            prerank_model_version=p.model_version,
        ),
        freshness=PrerankFreshness(
            statistics_as_of_ms=as_of,
            statistics_age_seconds=None if as_of is None else time.time() - as_of / 1000,
            prerank_data_end_ms=p.data_end_ms,
            newest_click_event_time_ms=state.newest_click_event_time_ms,
            prerank_user_event_time_ms=answer.user_event_time_ms,
            prerank_rows_release=p.rows_version,
        ),
    )


@prerank_router.post("/v1/prerank", response_model=PrerankResponse, responses=RESPONSES)
def prerank_endpoint(body: PrerankRequest, request: Request) -> PrerankResponse:
    """Score a user's candidates with the three-tower pre-ranker; the best ``keep`` (all when null), best first."""
    config = request.app.state.settings.service
    state, p = _states(request, "prerank")
    if len(body.candidates) > p.max_candidates:
        raise Rejected(
            422, "prerank", "too_many_candidates", f"{len(body.candidates):,} candidates are above the limit prerank.max_candidates = {p.max_candidates:,}"
        )
    if body.keep is not None and body.keep > config.max_recommend_keep:
        raise Rejected(422, "prerank", "keep_above_max", f"keep = {body.keep} is above the limit service.max_recommend_keep = {config.max_recommend_keep}")
    answer = _score(request, "prerank", p, body.user_id, body.user_features, body.candidates, body.keep)
    return _response(body.user_id, state, answer, len(body.candidates))


@prerank_router.post("/v1/recommend", response_model=PrerankResponse, responses=RESPONSES)
def recommend_endpoint(body: RecommendRequest, request: Request) -> PrerankResponse:
    """Recall the top ``recall_k`` items from the index, pre-rank them, return the best ``keep``."""
    config = request.app.state.settings.service
    state, p = _states(request, "recommend")
    bound = min(config.max_recommend_recall, p.max_candidates)
    if body.recall_k > bound:
        raise Rejected(422, "recommend", "recall_k_above_max",
                       f"recall_k = {body.recall_k} is above the limit {bound} (service.max_recommend_recall, prerank.max_candidates)")
    if body.keep > min(body.recall_k, config.max_recommend_keep):
        raise Rejected(422, "recommend", "keep_above_max",
                       f"keep = {body.keep} is above recall_k = {body.recall_k} or service.max_recommend_keep = {config.max_recommend_keep}")
    try:
        recalled = recall(state, body.user_id, body.user_features, body.recall_k)
    except FeatureError as error:
        raise Rejected(422, "recommend", "feature_mismatch", str(error)) from None
    scores = dict(zip(recalled.item_ids, recalled.scores))
    answer = _score(request, "recommend", p, body.user_id, body.user_features, recalled.item_ids, body.keep)
    return _response(body.user_id, state, answer, len(recalled.item_ids), scores)
