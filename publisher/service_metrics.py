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
        Gauge("freshtower_release_loaded_timestamp_seconds", "wall time the served state was loaded", registry=r).set_function(
            of_state(lambda s: s.loaded_at)
        )

    def swapped(self, state: ServingState) -> None:
        self.swaps.inc()
        self.release.clear()
        self.release.labels(state.version, state.full_version, state.model_version).set(1)
