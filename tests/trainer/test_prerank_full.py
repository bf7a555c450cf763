"""The pre-ranker's daily training on the stream's ranking samples: a
versioned model with its holdout quality, warm-started the next day with
its parent scored on the same requests; the quality metrics by hand."""

from __future__ import annotations

import numpy as np
import pytest
from freshtower.trainer.prerank_full import latest_preranker, load_preranker, prerank_models_dir, train_prerank_full
from freshtower.trainer.prerank_metrics import click_auc, ndcg_vs_ranker, ranker_top_recall

from freshtower.app.simulator import Simulator, SimulatorConfig
from tests.conftest import make_settings
from tests.streams.oracle import stream_batches

pytestmark = pytest.mark.slow  # two simulated days through the streams join

DAY0, DAY1 = "2026-11-20", "2026-11-21"
SMALL = {"id_dim": 8, "categorical_dim": 4, "user_hidden_dims": [16], "item_hidden_dims": [16], "tower_dim": 8,
         "cross_hidden_dims": [8], "cross_dim": 4, "upper_hidden_dims": [16, 8], "batch_requests": 32, "eval_top_k": 5, "eval_keep": 10}


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("prerank-data")
    sim = Simulator(SimulatorConfig(users=150, items=120, topics=8, requests_per_day=1000, seed=5))
    stream_batches(sim, [0, 1], data_dir / "batches")
    return data_dir


def settings_for(data_dir, **distillation):
    return make_settings(data_dir, prerank=SMALL, distillation=distillation, vocabulary={"user_min_count": 1})


def test_the_preranker_trains_daily_warm_starts_and_records_its_quality(streamed, tmp_path):
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(streamed / "batches", data_dir / "batches")
    settings = settings_for(data_dir)
    first = train_prerank_full(settings, DAY0)
    assert first.ref.version == f"{DAY0}.1" and first.ref.manifest.from_scratch
    assert first.requests > 700 and first.candidates > first.requests * 10
    metrics = first.metrics
    assert metrics["requests"] > 0  # the next day's first 10 minutes
    assert 0 <= metrics["ndcg@10"] <= 1 and 0 <= metrics["ranker_top5_in_top10"] <= 1
    assert latest_preranker(settings).version == first.ref.version
    loaded = load_preranker(first.ref)
    assert len(loaded.model.catalogue) > 50
    second = train_prerank_full(settings, DAY1)
    assert second.ref.manifest.parent == first.ref.version
    assert second.metrics["parent"]["version"] == first.ref.version
    assert (prerank_models_dir(settings) / second.ref.version / "prerank.pt").is_file()


def test_distillation_teaches_the_rankers_order(streamed, tmp_path):
    """Distilled, the pre-ranker agrees with the ranker far better than untrained."""
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(streamed / "batches", data_dir / "batches")
    trained = train_prerank_full(settings_for(data_dir, click_weight=0.0, distill_weight=1.0), DAY0).metrics
    # the same model untrained: scored by its parent-free baseline, a fresh random pre-ranker
    from freshtower.trainer.prerank_full import evaluate_preranker, item_statistics_for, new_preranker, prepare
    from freshtower.trainer.full import holdout_batches

    from freshtower.core.batches import FeatureSpec

    settings = settings_for(data_dir)
    _, _, refs = holdout_batches(settings.batches_dir, DAY0, settings.training.holdout_seconds)
    holdout = prepare(settings, refs, FeatureSpec.from_model(settings.model), item_statistics_for(settings.batches_dir, refs))
    untrained = evaluate_preranker(new_preranker(settings), holdout, settings)
    assert trained["ndcg@10"] > untrained["ndcg@10"] + 0.05, (trained, untrained)


def test_a_day_without_ranking_samples_trains_no_preranker(tmp_path):
    assert train_prerank_full(settings_for(tmp_path), DAY0) is None


def test_quality_metrics_against_hand_computed_values():
    offsets = np.array([0, 3, 5])
    student = np.array([0.3, 0.2, 0.1, 0.0, 1.0])
    teacher = np.array([0.1, 0.9, 0.5, 0.8, 0.2])
    # request 0: ranker top-1 is position 1, the student's top-2 is {0, 1}; request 1: top-1 is 3, student top-2 is both
    assert ranker_top_recall(student, teacher, offsets, k=1, keep=2) == 1.0
    assert ranker_top_recall(student, teacher, offsets, k=1, keep=1) == 0.0
    discounts = 1 / np.log2([2, 3, 4])
    request0 = (0.1 * discounts[0] + 0.9 * discounts[1] + 0.5 * discounts[2]) / (0.9 * discounts[0] + 0.5 * discounts[1] + 0.1 * discounts[2])
    request1 = (0.2 + 0.8 * discounts[1]) / (0.8 + 0.2 * discounts[1])
    assert ndcg_vs_ranker(student, teacher, offsets, keep=3) == pytest.approx((request0 + request1) / 2)
    clicked = np.array([False, True, False, True, False])
    shown = np.array([True, True, True, True, True])
    # request 0: the click (0.2) beats 0.1, loses to 0.3 -> 0.5; request 1: the click (0.0) loses to 1.0 -> 0
    assert click_auc(student, clicked, shown, offsets) == pytest.approx(0.25)
