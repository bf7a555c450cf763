"""The worker's figures: Prometheus metrics (``/metrics`` on the worker's
web endpoint) and a periodic log line, both from the join's plain counters
(the pure core counts; this module only reports).

Metric                                  meaning
=====================================   ============================================
freshtower_streams_events_total{kind}   messages read, by stream
freshtower_streams_records_total{label} samples written to batches (1 clicked, 0 shown)
freshtower_streams_dead_letters_total   dead letters, by reason code
freshtower_streams_duplicates_total     events that counted once already, by kind
freshtower_streams_rerouted_total       events forwarded to murmur2's partition (repartition), by kind
freshtower_streams_late_records_total   samples that went to a later window than their own
freshtower_streams_joined_clicks_total  clicks joined to their impression
freshtower_streams_batches_total        windows written
freshtower_streams_events_per_second    input rate over the last reporting period
freshtower_streams_records_per_second   output rate over the last reporting period
freshtower_streams_join_hit_rate        joined / (joined + orphaned or unjoinable) clicks
freshtower_streams_watermark_ms         event-time watermark
freshtower_streams_watermark_lag_seconds wall clock minus watermark
freshtower_streams_open_requests        requests held in the join state
"""

from __future__ import annotations

import time
from collections import Counter

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client import Counter as PromCounter

# Dead-letter codes that mean "a click that did not join".
_UNJOINED_CLICK_CODES = ("orphan_click", "click_outside_join_window", "click_item_not_shown", "click_after_finalization")


class StreamMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = PromCounter("freshtower_streams_events", "Messages read, by stream", ["kind"], registry=r)
        self.records = PromCounter("freshtower_streams_records", "Samples written to batches, by label", ["label"], registry=r)
        self.dead_letters = PromCounter("freshtower_streams_dead_letters", "Dead-lettered events, by reason code", ["code"], registry=r)
        self.duplicates = PromCounter("freshtower_streams_duplicates", "Events that had counted once already", ["kind"], registry=r)
        self.rerouted = PromCounter(
            "freshtower_streams_rerouted", "Events on the wrong partition forwarded to murmur2's, by kind", ["kind"], registry=r
        )
        self.late = PromCounter("freshtower_streams_late_records", "Samples sent to a later window than their own", registry=r)
        self.joined = PromCounter("freshtower_streams_joined_clicks", "Clicks joined to their impression", registry=r)
        self.batches = PromCounter("freshtower_streams_batches", "Windows written as batch files", registry=r)
        self.events_rate = Gauge("freshtower_streams_events_per_second", "Input rate over the last period", registry=r)
        self.records_rate = Gauge("freshtower_streams_records_per_second", "Output rate over the last period", registry=r)
        self.hit_rate = Gauge("freshtower_streams_join_hit_rate", "Joined / (joined + unjoined) clicks", registry=r)
        self.watermark = Gauge("freshtower_streams_watermark_ms", "Event-time watermark (ms since epoch)", registry=r)
        self.watermark_lag = Gauge("freshtower_streams_watermark_lag_seconds", "Wall clock minus watermark", registry=r)
        self.open_requests = Gauge("freshtower_streams_open_requests", "Requests held in the join state", registry=r)
        self._reported: Counter[str] = Counter()
        self._period_start = time.monotonic()
        self._period_events = 0
        self._period_records = 0
        self.events_per_second = 0.0
        self.records_per_second = 0.0
        self.snapshot: dict = {}

    def update(self, counters: Counter[str], watermark_ms: int | None, open_requests: int, now_ms: int) -> dict:
        """Push counter deltas into Prometheus; return a summary dict."""
        for name, value in counters.items():
            delta = value - self._reported[name]
            if delta <= 0:
                continue
            self._reported[name] = value
            group, _, label = name.partition(".")
            if group == "events_in":
                self.events.labels(label).inc(delta)
                self._period_events += delta
            elif group == "records_out":
                self.records.labels(label[-1]).inc(delta)
                self._period_records += delta
            elif group == "dead_letters":
                self.dead_letters.labels(label).inc(delta)
            elif group == "duplicates":
                self.duplicates.labels(label).inc(delta)
            elif group == "rerouted":
                self.rerouted.labels(label).inc(delta)
            elif name == "late_records":
                self.late.inc(delta)
            elif name == "joined_clicks":
                self.joined.inc(delta)
            elif name == "windows_closed":
                self.batches.inc(delta)
        elapsed = time.monotonic() - self._period_start
        if elapsed >= 1.0:
            self.events_per_second = self._period_events / elapsed
            self.records_per_second = self._period_records / elapsed
            self.events_rate.set(self.events_per_second)
            self.records_rate.set(self.records_per_second)
            self._period_start = time.monotonic()
            self._period_events = self._period_records = 0
        joined = counters["joined_clicks"]
        unjoined = sum(counters["dead_letters." + code] for code in _UNJOINED_CLICK_CODES)
        hit_rate = joined / (joined + unjoined) if joined + unjoined else 1.0
        self.hit_rate.set(hit_rate)
        if watermark_ms is not None:
            self.watermark.set(watermark_ms)
            self.watermark_lag.set((now_ms - watermark_ms) / 1000)
        self.open_requests.set(open_requests)
        self.snapshot = {
            "events_in": sum(v for k, v in counters.items() if k.startswith("events_in.")),
            "records_out": counters["records_out.label1"] + counters["records_out.label0"],
            "events_per_second": round(self.events_per_second, 1),
            "records_per_second": round(self.records_per_second, 1),
            "join_hit_rate": round(hit_rate, 4),
            "late_records": counters["late_records"],
            "duplicates": sum(v for k, v in counters.items() if k.startswith("duplicates.")),
            "rerouted": sum(v for k, v in counters.items() if k.startswith("rerouted.")),
            "dead_letters": sum(v for k, v in counters.items() if k.startswith("dead_letters.")),
            "batches": counters["windows_closed"],
            "watermark_ms": watermark_ms,
            "watermark_lag_seconds": None if watermark_ms is None else round((now_ms - watermark_ms) / 1000, 1),
            "open_requests": open_requests,
            "counters": dict(counters),
        }
        return self.snapshot

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
