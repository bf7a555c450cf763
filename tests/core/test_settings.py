from __future__ import annotations

import pytest
from pydantic import ValidationError

from freshtower.core.settings import load_settings, settings_from_record


def test_defaults_are_the_embedded_local_run(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("FRESHTOWER_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.kafka is None  # embedded broker
    assert settings.service.host == "127.0.0.1"
    assert settings.service.admin_token is None
    assert settings.streams.window_seconds == 60.0
    assert settings.publisher.publish_interval_seconds == 1800.0


def test_environment_overrides_toml_which_overrides_defaults(tmp_path, monkeypatch):
    config = tmp_path / "freshtower.toml"
    config.write_text('data_dir = "/srv/ft"\n[training]\nmode = "pairwise"\nbatch_size = 64\n[training.negatives]\nhard_fraction = 0.25\n')
    monkeypatch.setenv("FRESHTOWER_TRAINING__BATCH_SIZE", "128")
    settings = load_settings(config)
    assert str(settings.data_dir) == "/srv/ft"
    assert settings.training.mode == "pairwise"
    assert settings.training.batch_size == 128  # the environment wins
    assert settings.training.negatives.hard_fraction == 0.25
    assert settings.releases_dir == settings.data_dir / "releases"


def test_bad_values_and_unknown_keys_are_refused(tmp_path):
    with pytest.raises(ValidationError):
        load_settings(training={"mode": "sideways"})
    config = tmp_path / "typo.toml"
    config.write_text("[training]\nbatch_sise = 3\n")
    with pytest.raises(ValidationError, match="batch_sise"):
        load_settings(config)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


def test_records_hide_the_admin_token_and_round_trip(monkeypatch):
    settings = load_settings(service={"admin_token": "s3cret"})
    record = settings.as_record()
    assert record["service"]["admin_token"] is None
    monkeypatch.setenv("FRESHTOWER_TRAINING__BATCH_SIZE", "7")
    assert settings_from_record(record).training.batch_size == settings.training.batch_size  # env ignored
