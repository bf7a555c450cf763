"""An events file against the configured feature schema; its first days."""

import json

import pytest

from freshtower.app.event_schema import SchemaMismatch, check_schema, first_days
from tests.conftest import make_settings

DAY = 86_400_000


def _log(path, impressions):
    with open(path, "w") as handle:
        for n, (ts, categorical, numeric, item_features) in enumerate(impressions):
            event = {"event_id": f"e{n}", "request_id": f"r{n}", "user_id": "u1", "ts": ts,
                     "items": [{"item_id": "i1", "position": 0, "features": item_features}],
                     "user_features": {"categorical": categorical, "numeric": numeric}}
            handle.write(json.dumps({"topic": "impressions", "event": event}) + "\n")
            handle.write(json.dumps({"topic": "clicks", "event": {"event_id": f"c{n}", "request_id": f"r{n}", "user_id": "u1",
                                                                  "item_id": "i1", "ts": ts + 1000}}) + "\n")


def _settings(tmp_path, **model):
    return make_settings(tmp_path / "data", model=model)


def test_a_log_with_the_configured_features_passes_and_extra_ones_are_listed(tmp_path):
    _log(tmp_path / "e.jsonl", [(1_000, {"plan": "pro", "country": "fr"}, {"tenure": 3.5}, {"genre": "jazz"})])
    settings = _settings(tmp_path, user_categorical=("plan",), user_numeric=("tenure",), item_categorical=("genre",))
    report = check_schema(tmp_path / "e.jsonl", settings)
    assert report.impressions == 1 and report.ignored["categorical"] == {"country"}
    assert "country" in report.describe()


def test_a_configured_feature_the_log_lacks_is_named(tmp_path):
    _log(tmp_path / "e.jsonl", [(1_000, {"plan": "pro"}, {"tenure": 3.5}, {"genre": "jazz"})])
    # the defaults are the simulator's features: age_bucket, city, device, ...
    with pytest.raises(SchemaMismatch, match=r"\['age_bucket', 'city', 'device'\] \(model.user_categorical\).*\['plan'\]"):
        check_schema(tmp_path / "e.jsonl", make_settings(tmp_path / "data"))


def test_a_numeric_feature_must_be_a_number(tmp_path):
    _log(tmp_path / "e.jsonl", [(1_000, {"plan": "pro"}, {"tenure": "long"}, {"genre": "jazz"})])
    settings = _settings(tmp_path, user_categorical=("plan",), user_numeric=("tenure",), item_categorical=("genre",))
    with pytest.raises(SchemaMismatch, match=r"e.jsonl:1: user feature 'tenure' is configured numeric"):
        check_schema(tmp_path / "e.jsonl", settings)


def test_first_days_keeps_the_first_utc_days(tmp_path):
    start = 1_790_000_000_000 - 1_790_000_000_000 % DAY + 3_600_000
    _log(tmp_path / "e.jsonl", [(start + d * DAY, {"p": "x"}, {}, {}) for d in range(4)])
    kept = first_days(tmp_path / "e.jsonl", tmp_path / "kept.jsonl", 2)
    assert kept.events == 4 and kept.days == 2 and kept.counts == {"impressions": 2, "clicks": 2}
    assert len((tmp_path / "kept.jsonl").read_text().splitlines()) == 4
    assert first_days(tmp_path / "e.jsonl", tmp_path / "all.jsonl", None).days == 4
