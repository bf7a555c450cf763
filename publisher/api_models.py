"""The recall service's request and response bodies; they make its OpenAPI schema."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from freshtower.publisher.serving import ServingState

USER_ID_MAX = 256


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
