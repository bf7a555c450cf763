"""The recall service's request and response bodies; they make its OpenAPI schema.

The pydantic models are the contract (the schema, and the 422 messages that
name each field). ``POST /v1/recall``, the hot path, decodes its body with
``RecallQuery``, a msgspec twin of ``RecallRequest`` with the same fields and
limits (~1 us where json.loads + pydantic take ~5 us), and encodes its answer
straight to JSON bytes with ``recall_response_json`` in the shape of
``RecallResponse`` (~25 us for 100 items, where building the pydantic
models and FastAPI's ``jsonable_encoder`` take ~0.9 ms). A
body that ``RecallQuery`` refuses is validated again by ``RecallRequest``,
so the errors answered are pydantic's; should pydantic accept what msgspec
refused (its lax mode takes ``"k": "10"``), pydantic's reading is served.
Tests hold the twins equal.
"""

from __future__ import annotations

import json
from typing import Annotated

import msgspec
from freshtower.publisher.serving import RecallResult, ServingState
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError as PydanticValidationError

USER_ID_MAX = 256  # characters
USER_FEATURES_MAX = 64  # entries in user_features: a tower has a handful; a larger map is an error, not a workload
# no control characters (C0, DEL, C1) in IDs: they end up in logs and in other systems' keys
ID_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*$"


class RecallRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(
        ...,
        min_length=1,
        max_length=USER_ID_MAX,
        pattern=ID_PATTERN,
        description="raw user ID, without control characters; unknown users get the cold-start embedding",
    )
    user_features: dict[str, StrictStr | StrictFloat | StrictInt] = Field(
        default_factory=dict,
        max_length=USER_FEATURES_MAX,
        description="categorical features as strings, numeric ones as numbers; absent ones read as unknown / 0",
        examples=[{"age_bucket": "25-34", "city": "c3", "device": "ios", "activity_7d": 0.4, "hour_sin": 0.5, "hour_cos": 0.87}],
    )
    k: int = Field(100, ge=1, description="how many items (at most service.max_k)")


class Rejection(BaseModel):
    """The body of a 4xx answer to what a request sent."""

    detail: str = Field(description="what is wrong and where, e.g. 'malformed request: body.k: Input should be greater than or equal to 1'")
    reason: str = Field(description="reason code, counted in freshtower_rejected_requests_total{endpoint, reason}")
    errors: list[dict] | None = Field(None, description="for a malformed body: each failure's type, loc (where) and msg")


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="cosine between the user and item vectors")


class ReleasesUsed(BaseModel):
    active: str = Field(description="the release served (the newest of its chain)")
    full: str = Field(description="full release: user tower, item vectors, index")
    embeddings: str | None = Field(description="newest embeddings release applied on top, if any")
    model_version: str = Field(description="full-model artifact behind the towers")

    @classmethod
    def of(cls, state: ServingState) -> ReleasesUsed:
        embeddings = state.version if state.version != state.full_version else None
        return cls(active=state.version, full=state.full_version, embeddings=embeddings, model_version=state.model_version)


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


# --- the hot path of POST /v1/recall ----------------------------------------------------


class RecallQuery(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``RecallRequest`` for msgspec: the same fields, defaults and limits."""

    user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=USER_ID_MAX, pattern=ID_PATTERN)]
    user_features: Annotated[dict[str, str | float | int], msgspec.Meta(max_length=USER_FEATURES_MAX)] = msgspec.field(
        default_factory=dict
    )
    k: Annotated[int, msgspec.Meta(ge=1)] = 100


class MalformedBody(ValueError):
    """A recall body that ``RecallRequest`` refuses; ``errors`` as pydantic
    lists them, each ``loc`` starting with ``"body"`` as FastAPI's do."""

    def __init__(self, errors: list[dict]):
        super().__init__(errors)
        self.errors = errors


_query_decoder = msgspec.json.Decoder(RecallQuery)
_encoder = msgspec.json.Encoder()


def decode_recall_request(body: bytes) -> RecallQuery | RecallRequest:
    """The request in ``body`` (JSON), or ``MalformedBody`` with pydantic's errors."""
    try:
        return _query_decoder.decode(body)
    except msgspec.DecodeError:
        pass  # the slow path below says what is wrong, as RecallRequest does
    if not body.strip():
        raise MalformedBody([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:
        at = error.pos if isinstance(error, json.JSONDecodeError) else 0
        reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        error = {"type": "json_invalid", "loc": ("body", at), "msg": "JSON decode error", "input": {}, "ctx": {"error": reason}}
        raise MalformedBody([error]) from None
    try:
        return RecallRequest.model_validate(document)
    except PydanticValidationError as error:
        raise MalformedBody([{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]) from None


def recall_response_json(user_id: str, result: RecallResult, state: ServingState, now_s: float) -> bytes:
    """``RecallResponse`` as JSON bytes (the same fields, in the same order)."""
    return _encoder.encode(
        {
            "user_id": user_id,
            "cold_start": result.cold_start,
            "items": [{"item_id": i, "score": s} for i, s in zip(result.item_ids, result.scores)],
            "releases": {
                "active": state.version,
                "full": state.full_version,
                "embeddings": state.version if state.version != state.full_version else None,
                "model_version": state.model_version,
            },
            "freshness": {
                "newest_click_event_time_ms": state.newest_click_event_time_ms,
                "newest_click_age_seconds": now_s - state.newest_click_event_time_ms / 1000,
                "is_upper_bound": state.newest_click_is_bound,
                "user_embedding_event_time_ms": result.user_event_time_ms,
            },
        }
    )
