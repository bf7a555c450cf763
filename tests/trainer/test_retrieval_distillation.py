"""The two-tower retrieval model's distillation term: the loss by hand,
the minibatch helpers, that learning from the ranker's scores alone moves
the student's order towards the teacher's, and that both trainers use it."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from freshtower.trainer import learner as learner_module
from freshtower.trainer.distillation import retrieval_distillation_loss
from freshtower.trainer.full import train_full
from freshtower.trainer.learner import Learner
from freshtower.trainer.model import TwoTowerModel
from freshtower.trainer.online import OnlineTrainer
from freshtower.trainer.soft_labels import positive_spans, request_grouped_order, soft_label_groups

from freshtower.core.batches import SampleColumns
from freshtower.core.frequency import FrequencyEstimator
from freshtower.core.settings import DistillationConfig, load_settings
from tests.conftest import make_settings

DAY_MS = 1_795_000_000_000 - 1_795_000_000_000 % 86_400_000
SMALL_MODEL = {"id_dim": 8, "categorical_dim": 4, "hidden_dims": (16,), "output_dim": 8}


def test_pointwise_term_is_the_mean_bce_on_the_scores():
    # BCE(logit 0, 0.5) = ln 2; BCE(logit ln 3 -> p 0.75, 0.75) = -(0.75 ln 0.75 + 0.25 ln 0.25)
    config = DistillationConfig(retrieval_weight=1.0, retrieval_mode="pointwise")
    loss = retrieval_distillation_loss(torch.tensor([0.0, math.log(3.0)]), torch.tensor([0.5, 0.75]), torch.tensor([0, 2]), config)
    expected = (math.log(2.0) - (0.75 * math.log(0.75) + 0.25 * math.log(0.25))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)  # 0.627741


def test_listwise_term_is_the_kl_between_the_requests_softmaxes():
    # teacher logits logit(0.5), logit(0.75) = 0, ln 3: softmax (0.25, 0.75); student (0, 0): (0.5, 0.5)
    config = DistillationConfig(retrieval_weight=1.0, retrieval_mode="listwise")
    scores, offsets = torch.tensor([0.5, 0.75, 0.9]), torch.tensor([0, 2, 3])  # the single-candidate request carries nothing
    loss = retrieval_distillation_loss(torch.zeros(3), scores, offsets, config)
    assert loss.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)  # 0.130812
    same_order = retrieval_distillation_loss(torch.tensor([0.0, math.log(3.0), 7.0]), scores, offsets, config)
    assert same_order.item() == pytest.approx(0.0, abs=1e-6)


def test_both_weights_zero_is_refused():
    with pytest.raises(ValueError, match="retrieval_weight and retrieval_click_weight are both 0"):
        DistillationConfig(retrieval_weight=0.0, retrieval_click_weight=0.0)


def test_spans_hold_batch_size_clicks_and_requests_stay_together():
    labels = np.array([0, 1, 0, 0, 1, 1, 0, 1, 0])
    spans = positive_spans(labels, 2)
    assert spans == [(0, 5), (5, 9)]
    assert [int(labels[a:b].sum()) for a, b in spans] == [2, 2]
    assert positive_spans(np.zeros(4), 2) == []
    requests = ["b", "a", "b", "c", "a", "c", "c"]
    order = request_grouped_order(requests, np.random.default_rng(0))
    grouped = [requests[i] for i in order]
    assert sorted(order.tolist()) == list(range(len(requests)))
    assert sum(1 for x, y in zip(grouped, grouped[1:]) if x != y) == 2  # three runs: one per request


def shown_records(users: int, items_per_request: int, catalogue: int, teacher, rng, requests_per_user: int = 4) -> SampleColumns:
    """Requests of shown, unclicked records, each with the teacher's score."""
    user_ids, item_ids, request_ids, scores = [], [], [], []
    for r in range(users * requests_per_user):
        u = r % users
        shown = rng.choice(catalogue, items_per_request, replace=False)
        for i in shown.tolist():
            user_ids.append(f"u{u}")
            item_ids.append(f"i{i}")
            request_ids.append(f"r{r}")
            scores.append(teacher[u, i])
    n = len(user_ids)
    return SampleColumns(
        user_ids=user_ids,
        item_ids=item_ids,
        labels=np.zeros(n, np.int8),
        event_time_ms=DAY_MS + np.arange(n, dtype=np.int64),
        request_ids=request_ids,
        positions=np.zeros(n, np.int32),
        user_categorical={"age_bucket": ["a"] * n, "city": ["c"] * n, "device": ["d"] * n},
        user_numeric=np.zeros((n, 3), np.float32),
        item_categorical={"category": [f"k{int(i[1:]) % 5}" for i in item_ids]},
        hard_negative_flat=[],
        hard_negative_offsets=np.zeros(n + 1, np.int64),
        teacher_scores=np.asarray(scores, np.float32),
    )


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation (no ties in continuous scores)."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def mean_request_spearman(learner: Learner, records: SampleColumns) -> float:
    groups = soft_label_groups(records)
    model = learner.model
    rows = groups.rows
    with torch.no_grad():
        users = learner.user_vectors(rows.user_ids, rows.user_categorical, rows.user_numeric)
        items = learner.item_vectors(model.catalogue.indices(rows.item_ids))
        cosines = (users * items).sum(dim=1).numpy()
    correlations = [spearman(cosines[a:b], rows.teacher_scores[a:b]) for a, b in zip(groups.offsets[:-1], groups.offsets[1:])]
    return float(np.nanmean(correlations))


@pytest.mark.parametrize("mode", ["listwise", "pointwise"])
def test_distillation_alone_moves_the_students_order_towards_the_teachers(tmp_path, mode):
    # The teacher scores (user, item) pairs by a hidden rank-4 affinity; the
    # student learns from those scores only (click weight 0). Its cosines'
    # per-request rank correlation with the teacher must rise from ~0 (random
    # init) to well above it.
    rng = np.random.default_rng(3)
    users, catalogue = 40, 60
    affinity = rng.normal(size=(users, 4)) @ rng.normal(size=(4, catalogue))
    teacher = 1.0 / (1.0 + np.exp(-affinity))
    settings = load_settings(
        data_dir=tmp_path, model=SMALL_MODEL, vocabulary={"user_min_count": 1, "item_min_count": 1}, frequency={"buckets": 1 << 12},
        distillation={"retrieval_weight": 1.0, "retrieval_click_weight": 0.0, "retrieval_mode": mode},
    )
    torch.manual_seed(0)
    model = TwoTowerModel(settings.model, settings.vocabulary)
    f = settings.frequency
    learner = Learner(model, settings.training, FrequencyEstimator(f.buckets, f.hashes, f.alpha), trainable="all",
                      distillation=settings.distillation)
    train = shown_records(users, 8, catalogue, teacher, rng)
    seen = train.take(np.arange(len(train)))
    seen.labels = np.ones(len(seen), np.int8)
    learner.observe(seen, DAY_MS // 86_400_000)  # admit the users and items, as the full trainer's first pass does
    test = shown_records(users, 8, catalogue, teacher, np.random.default_rng(4))
    before = mean_request_spearman(learner, test)
    for epoch in range(30):
        order = request_grouped_order(train.request_ids, rng)
        for start in range(0, len(order), 64):
            learner.learn(train.take(order[start : start + 64]), observe=False)
    after = mean_request_spearman(learner, test)
    assert abs(before) < 0.2
    assert after > before + 0.3, (before, after)


class DistillSpy:
    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, int]] = []  # (candidates, requests) per call
        original = learner_module.retrieval_distillation_loss

        def spy(logits, scores, offsets, config):
            self.calls.append((len(scores), len(offsets) - 1))
            return original(logits, scores, offsets, config)

        monkeypatch.setattr(learner_module, "retrieval_distillation_loss", spy)


DISTILL = {"retrieval_weight": 1.0}


def test_the_full_trainer_distils_the_shown_items_of_whole_requests(data_dir_with_batches, monkeypatch):
    spy = DistillSpy(monkeypatch)
    result = train_full(make_settings(data_dir_with_batches, distillation=DISTILL), "2026-11-20")
    assert spy.calls, "the distillation term was never computed"
    candidates = sum(c for c, _ in spy.calls)
    requests = sum(r for _, r in spy.calls)
    assert candidates > 5 * requests  # the simulator shows 10 items a request: whole requests reach the term
    assert math.isfinite(result.metrics["final_loss"])


def test_the_full_trainer_is_unchanged_with_distillation_off(data_dir_with_batches, monkeypatch):
    spy = DistillSpy(monkeypatch)
    train_full(make_settings(data_dir_with_batches), "2026-11-20")
    assert spy.calls == []


def test_the_online_trainer_distils_the_shown_items(data_dir_with_batches, monkeypatch):
    train_full(make_settings(data_dir_with_batches), "2026-11-20")
    spy = DistillSpy(monkeypatch)
    trainer = OnlineTrainer.start(make_settings(data_dir_with_batches, distillation=DISTILL))
    table_before = trainer.model.user_tower.id_embedding.detach().clone()
    report = trainer.learn_batch(trainer.pending()[0])
    assert spy.calls and report.samples > 0 and math.isfinite(report.mean_loss)
    assert not torch.equal(trainer.model.user_tower.id_embedding.detach()[: len(table_before)], table_before)


def test_ranked_candidates_replace_the_shown_records_scores_once():
    from freshtower.core.batches import FeatureSpec
    from freshtower.core.batches.ranking import RankingColumns
    from freshtower.trainer.soft_labels import ranking_rows, with_ranked_candidates

    spec = FeatureSpec(("age_bucket", "city", "device"), ("a", "b", "c"), ("category",))
    ranked = RankingColumns(
        request_ids=["r0"], user_ids=["u0"], event_time_ms=np.array([DAY_MS + 5]), user_categorical={k: ["x"] for k in spec.user_categorical},
        user_numeric=np.ones((1, 3), np.float32), offsets=np.array([0, 3]), candidate_ids=["i1", "i2", "i3"], categories=["k1", "k2", "k3"],
        scores=np.array([0.9, 0.5, 0.1], np.float32), kept=np.array([True, True, False]), shown=np.array([True, True, False]),
        clicked=np.array([True, False, False]), user_counts=np.zeros((3, 5), np.int64),
    )
    rows = ranking_rows(ranked, spec, "category")
    assert rows.item_ids == ["i1", "i2", "i3"] and rows.request_ids == ["r0"] * 3 and rows.labels.tolist() == [0, 0, 0]
    assert rows.item_categorical["category"] == ["k1", "k2", "k3"] and rows.teacher_scores.tolist() == pytest.approx([0.9, 0.5, 0.1])
    teacher = np.full((2, 4), 0.5)
    shown = shown_records(2, 2, 4, teacher, np.random.default_rng(0), requests_per_user=1)  # requests r0 and r1
    merged = with_ranked_candidates(shown, rows, spec)
    groups = soft_label_groups(merged)
    by_request = {merged_id: int(b - a) for merged_id, a, b in zip(
        [groups.rows.request_ids[i] for i in groups.first], groups.offsets[:-1], groups.offsets[1:])}
    assert by_request == {"r0": 3, "r1": 2}  # r0: its three scored candidates, not its two shown records as well


@pytest.mark.slow  # two simulated days through the streams join
def test_the_full_trainer_distils_the_ranking_samples_candidates(tmp_path, monkeypatch):
    from freshtower.app.simulator import Simulator, SimulatorConfig
    from tests.streams.oracle import stream_batches

    sim = Simulator(SimulatorConfig(users=150, items=120, topics=8, requests_per_day=600, candidates_per_request=30, seed=5))
    stream_batches(sim, [0, 1], tmp_path / "batches")
    spy = DistillSpy(monkeypatch)
    train_full(make_settings(tmp_path, distillation=DISTILL, vocabulary={"user_min_count": 1}), "2026-11-20")
    candidates, requests = sum(c for c, _ in spy.calls), sum(r for _, r in spy.calls)
    assert candidates > 15 * requests, (candidates, requests)  # ~30 scored a request, not the 10 shown
