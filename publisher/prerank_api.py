"""Request and response bodies of ``POST /v1/prerank`` and ``POST /v1/recommend``
(their OpenAPI schema; pydantic validates them and names each bad field)."""

from __future__ import annotations

from typing import Annotated

from freshtower.publisher.api_models import ID_PATTERN, USER_FEATURES_MAX, USER_ID_MAX, ReleasesUsed
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

CandidateId = Annotated[str, Field(min_length=1, max_length=USER_ID_MAX, pattern=ID_PATTERN)]
UserFeatures = Annotated[dict[str, StrictStr | StrictFloat | StrictInt], Field(default_factory=dict, max_length=USER_FEATURES_MAX)]


class PrerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(..., min_length=1, max_length=USER_ID_MAX, pattern=ID_PATTERN, description="raw user ID")
    user_features: UserFeatures
    candidates: list[CandidateId] = Field(..., min_length=1, description="candidate item IDs (at most prerank.max_candidates)")
    keep: int | None = Field(None, ge=1, description="how many of the best to return (at most service.max_recommend_keep); null: all")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(..., min_length=1, max_length=USER_ID_MAX, pattern=ID_PATTERN, description="raw user ID")
    user_features: UserFeatures
    recall_k: int = Field(1000, ge=1, description="N: candidates recalled from the index (at most service.max_recommend_recall)")
    keep: int = Field(100, ge=1, description="M: the pre-ranker's best kept (at most service.max_recommend_keep and recall_k)")


class PrerankedItem(BaseModel):
    item_id: str
    score: float = Field(description="the pre-ranker's logit")
    recall_score: float | None = Field(None, description="/v1/recommend: the retrieval cosine that brought the item in")


class PrerankReleases(ReleasesUsed):
    prerank_model_version: str = Field(description="the pre-ranker (models/prerank/<day>.<n>) of the full release")


class PrerankFreshness(BaseModel):
    statistics_as_of_ms: int | None = Field(description="time of the published statistics features (null: none published; all read 0)")
    statistics_age_seconds: float | None = Field(description="wall time now minus that")
    prerank_data_end_ms: int = Field(description="end of the day of ranking samples the pre-ranker learnt")
    newest_click_event_time_ms: int = Field(description="retrieval: the newest click the served embeddings learnt from")
    prerank_user_event_time_ms: int | None = Field(
        None, description="the newest ranking sample of this user the pre-ranker's user row learnt online (null: the daily model's row)"
    )
    prerank_rows_release: str | None = Field(
        None, description="the embeddings release whose pre-ranker user rows are served (null: the daily model's rows only)"
    )


class ItemCacheUse(BaseModel):
    hits: int = Field(description="candidates whose item row came from the cache")
    misses: int = Field(description="candidates the item tower computed now")


class PrerankResponse(BaseModel):
    user_id: str
    cold_start: bool = Field(description="the pre-ranker has no row for this user: the default row was used")
    items: list[PrerankedItem] = Field(description="best first")
    candidates: int = Field(description="how many were scored")
    unknown_ids: list[str] = Field(description="candidates the pre-ranker does not know, scored as cold items")
    item_cache: ItemCacheUse
    releases: PrerankReleases
    freshness: PrerankFreshness
