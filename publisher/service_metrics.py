"""The recall service's Prometheus metrics (served at ``/metrics``), freshness among them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from freshtower.publisher.serving import ServingState
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)  # seconds
RECALL_PATH = "/v1/recall"


def endpoint_label(path: str) -> str:
    """A bounded label for a request path (paths carry user IDs and versions).

    >>> endpoint_label("/v1/users/u1/embedding"), endpoint_label("/v1/releases/00000002-full/activate")
    ('embedding', 'activate')
    """
    if path == RECALL_PATH:
        return "recall"
    if path.startswith("/v1/users/"):
        return "embedding"
    if path.startswith("/v1/releases/"):
        return "activate"
    if path in ("/v1/prerank", "/v1/recommend"):
        return path.rsplit("/", 1)[1]
    return "other"


class ServiceMetrics:
    """One registry per app, so two apps in one process (tests) count apart.

    ``serving`` returns the state served now (None before the first load);
    the freshness gauges read it at every scrape.
    """

    def __init__(self, serving: Callable[[], ServingState | None]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("freshtower_recall_requests", "recall requests by outcome", ["outcome"], registry=r)
        self.ok, self.bad_request, self.unavailable = (self.requests.labels(o) for o in ("ok", "bad_request", "unavailable"))
        self.rejected = Counter(
            "freshtower_rejected_requests",
            "requests answered 4xx for what they sent, by endpoint and reason code (see docs/service.md)",
            ["endpoint", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "freshtower_recall_latency_seconds", "in-process recall time (user tower + index search)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.handler = Histogram(
            "freshtower_recall_handler_seconds",
            "time a recall request spends in the app: body read and parsed, recall, freshness, response encoded (no socket I/O)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cold_start = Counter("freshtower_recall_cold_start", "recall requests served with the cold-start embedding", registry=r)
        self.swaps = Counter("freshtower_release_swaps", "serving state swaps", registry=r)
        self.refused = Counter("freshtower_release_refused", "releases refused (checksum, missing file, bad shape)", registry=r)
        self.followed = Counter(
            "freshtower_followed_rows",
            "user-embeddings topic rows: applied on the served release, skipped (not newer, another model), malformed",
            ["outcome"],
            registry=r,
        )
        self.release = Gauge(
            "freshtower_release_info", "the release being served (value 1)", ["version", "full_version", "model_version"], registry=r
        )

        def of_state(value: Callable[[ServingState], float]) -> Callable[[], float]:
            return lambda: math.nan if (state := serving()) is None else value(state)

        Gauge(
            "freshtower_embeddings_newest_click_event_time_seconds",
            "event time of the newest click the served embeddings learnt from",
            registry=r,
        ).set_function(of_state(lambda s: s.newest_click_event_time_ms / 1000))
        Gauge(
            "freshtower_embeddings_freshness_age_seconds",
            "wall time now minus the event time of the newest click the served embeddings learnt from",
            registry=r,
        ).set_function(of_state(lambda s: time.time() - s.newest_click_event_time_ms / 1000))
        Gauge(
            "freshtower_new_items_served",
            "items born since the full release that the served state retrieves (beside the full release's index)",
            registry=r,
        ).set_function(of_state(lambda s: len(s.new_items)))
        Gauge("freshtower_index_items_served", "items of the full release's index", registry=r).set_function(
            of_state(lambda s: len(s.item_ids))
        )
        self.recall_new_items = Counter(
            "freshtower_recall_new_items", "items born since the full release returned in recall answers", registry=r
        )
        Gauge("freshtower_release_loaded_timestamp_seconds", "wall time the served state was loaded", registry=r).set_function(
            of_state(lambda s: s.loaded_at)
        )

        # --- pre-ranking ---
        self.prerank_requests = Counter(
            "freshtower_prerank_requests", "pre-ranking requests by endpoint (prerank, recommend) and outcome", ["endpoint", "outcome"], registry=r
        )
        self.prerank_stage = Histogram(
            "freshtower_prerank_stage_seconds",
            "pre-ranking time per stage and tower (features, user_tower, item_tower, cross_tower, upper_layers, sort)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prerank_latency = Histogram(
            "freshtower_prerank_latency_seconds", "in-process time of a pre-ranking request, by endpoint", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prerank_unknown = Counter("freshtower_prerank_unknown_candidates", "candidates the pre-ranker did not know (scored cold)", registry=r)

        def of_cache(value) -> Callable[[], float]:
            def read() -> float:
                state = serving()
                prerank = None if state is None else state.prerank
                return math.nan if prerank is None else float(value(prerank.cache_stats()))

            return read

        for name, doc, value in (
            ("freshtower_prerank_item_cache_hit_rate", "item-tower cache hits / lookups since the release loaded", lambda c: c.hit_rate),
            ("freshtower_prerank_item_cache_items", "items in the item-tower cache", lambda c: c.size),
            ("freshtower_prerank_item_cache_hits", "candidates served from the item-tower cache", lambda c: c.hits),
            ("freshtower_prerank_item_cache_misses", "candidates the item tower computed (cache misses)", lambda c: c.misses),
            ("freshtower_prerank_item_cache_evictions", "items evicted from the item-tower cache", lambda c: c.evictions),
        ):
            Gauge(name, doc, registry=r).set_function(of_cache(value))

    def prerank_timing(self, stage: str, seconds: float) -> None:
        self.prerank_stage.labels(stage).observe(seconds)

    def swapped(self, state: ServingState) -> None:
        self.swaps.inc()
        self.release.clear()
        self.release.labels(state.version, state.full_version, state.model_version).set(1)
