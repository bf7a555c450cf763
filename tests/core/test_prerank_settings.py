from __future__ import annotations

import pytest
from pydantic import ValidationError

from freshtower.core.settings import load_settings, settings_from_record


def test_prerank_and_distillation_defaults(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("FRESHTOWER_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.prerank.upper_hidden_dims == (64, 32) and settings.prerank.max_candidates == 10_000
    assert settings.prerank.category_feature in settings.model.item_categorical
    assert settings.distillation.retrieval_weight == 0.0  # retrieval distillation is off by default
    assert (settings.distillation.click_weight, settings.distillation.distill_weight) == (1.0, 1.0)


def test_prerank_settings_come_from_the_environment_and_round_trip(monkeypatch):
    monkeypatch.setenv("FRESHTOWER_PRERANK__UPPER_HIDDEN_DIMS", "[128, 16]")
    monkeypatch.setenv("FRESHTOWER_DISTILLATION__MODE", "pointwise")
    settings = load_settings()
    assert settings.prerank.upper_hidden_dims == (128, 16) and settings.distillation.mode == "pointwise"
    assert settings_from_record(settings.as_record()).prerank == settings.prerank


def test_bad_prerank_values_are_refused():
    with pytest.raises(ValidationError, match="upper_hidden_dims"):
        load_settings(prerank={"upper_hidden_dims": []})  # the serving fusion needs a first upper layer
    with pytest.raises(ValidationError, match="mode"):
        load_settings(distillation={"mode": "pairwise"})
    with pytest.raises(ValidationError, match="ctr_prior"):
        load_settings(prerank={"ctr_prior": 1.5})
