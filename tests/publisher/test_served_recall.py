from __future__ import annotations

from freshtower.publisher.publish import Publisher
from freshtower.publisher.served_recall import served_recall_by_hour

from freshtower.core.batches import FeatureSpec, list_batches
from freshtower.core.eventtime import DAY_MS, HOUR_MS
from tests.publisher.conftest import publisher_settings
from tests.publisher.test_publish import train_online


def test_each_hour_is_scored_with_the_releases_published_from_the_clicks_before_it(data_dir):
    settings = publisher_settings(data_dir, publisher={"clock": "event", "publish_interval_seconds": 1e9})
    with Publisher(settings) as publisher:
        full = publisher.publish_full_if_new(now_s=0.0).version
        for batches in (12, 12):  # two embeddings releases, ~2 event-time hours of ten-minute batches apart
            train_online(settings, batches)
            publisher.tick(now_s=0.0, force_delta=True)
        store = publisher.store
    releases = {r.version: r for r in store.list()}
    refs = list_batches(settings.batches_dir)
    day1 = refs[0].window_start_ms + DAY_MS  # the day after the full model's
    rows = served_recall_by_hour(store, refs, FeatureSpec.from_model(settings.model), until_ms=day1 + 6 * HOUR_MS)["2026-11-21"]

    assert [r.hour_start_ms for r in rows] == [day1 + h * HOUR_MS for h in range(6)]
    assert rows[0].release == full and rows[0].served == rows[0].frozen  # nothing learnt online before 00:00 was published yet
    served = [r.release for r in rows]
    assert len(set(served)) == 3 and served == sorted(served)  # the full release, then each delta once its data is in the past
    for row in rows:
        assert releases[row.release].manifest.checkpoint_event_time_ms <= row.hour_start_ms or row.release == full
        assert 0.0 <= row.frozen <= 1.0 and 0.0 <= row.served <= 1.0 and row.users > 0
