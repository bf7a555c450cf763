from __future__ import annotations

from collections import Counter

from freshtower.streams.metrics import StreamMetrics


def test_metrics_follow_the_joins_counters_and_compute_the_hit_rate():
    metrics = StreamMetrics()
    counters = Counter({"events_in.click": 10, "joined_clicks": 8, "dead_letters.orphan_click": 2, "dead_letters.invalid_json": 5})
    summary = metrics.update(counters, watermark_ms=1_000_000, open_requests=3, now_ms=1_060_000)
    assert summary["join_hit_rate"] == 0.8  # 8 / (8 + 2 orphans); the invalid JSON is not a click that failed to join
    assert summary["watermark_lag_seconds"] == 60.0 and summary["dead_letters"] == 7
    counters["events_in.click"] += 5
    metrics.update(counters, 1_000_000, 3, 1_060_000)
    text = metrics.exposition().decode()
    assert 'freshtower_streams_events_total{kind="click"} 15.0' in text  # deltas, not double counts
    assert 'freshtower_streams_dead_letters_total{code="orphan_click"} 2.0' in text
    assert "freshtower_streams_open_requests 3.0" in text
