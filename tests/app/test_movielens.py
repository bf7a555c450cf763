from __future__ import annotations

from freshtower.app.movielens import load_events


def test_movielens_maps_ratings_to_impressions_and_clicks():
    stream = load_events()
    assert stream.ratings == 100_000
    impressions = [e for t, e in stream.events if t == "impressions"]
    clicks = [e for t, e in stream.events if t == "clicks"]
    assert sum(len(e["items"]) for e in impressions) == 100_000  # every rating was shown once
    assert len(clicks) == stream.clicks == 55_375  # ratings of 4 and 5
    times = [e["ts"] for _, e in stream.events]
    assert times == sorted(times)
    shown_at = {e["request_id"]: e["ts"] for e in impressions}
    assert all(c["ts"] == shown_at[c["request_id"]] + 1000 for c in clicks)
    first = impressions[0]
    assert set(first["user_features"]["categorical"]) == {"age_bucket", "gender", "occupation"}
    half = load_events(time_scale=2.0)
    assert half.last_ms - half.first_ms < 0.51 * (stream.last_ms - stream.first_ms)
