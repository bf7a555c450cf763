"""The sampling corrections together: positive re-sampling, the logQ
correction, the frequency estimator's floor and the easy/hard mix, checked
against what they should compute (measured in-batch frequencies, per-row
oracles), through the real ``Learner``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from freshtower.trainer import losses
from freshtower.trainer.learner import Learner
from freshtower.trainer.model import TwoTowerModel

from freshtower.core.batches import SampleColumns
from freshtower.core.fingerprints import fingerprint_strings
from freshtower.core.frequency import FrequencyEstimator
from freshtower.core.settings import load_settings

DAY_MS = 1_795_000_000_000 - 1_795_000_000_000 % 86_400_000
# The corrections do not depend on the towers' size: small ones keep the
# hundreds of steps these tests take cheap.
SMALL_MODEL = {"id_dim": 8, "categorical_dim": 4, "hidden_dims": (16,), "output_dim": 8}


def clicks(user_ids, item_ids, hard=None, seed=0, start_ms=DAY_MS) -> SampleColumns:
    """Clicked samples with varied user features (so user vectors differ)."""
    n = len(user_ids)
    rng = np.random.default_rng(seed)
    hard = hard if hard is not None else [()] * n
    return SampleColumns(
        user_ids=list(user_ids),
        item_ids=list(item_ids),
        labels=np.ones(n, np.int8),
        event_time_ms=start_ms + np.arange(n, dtype=np.int64),
        request_ids=[f"r{seed}-{i}" for i in range(n)],
        positions=np.zeros(n, np.int32),
        user_categorical={"age_bucket": [f"a{i % 5}" for i in range(n)], "city": ["c"] * n, "device": ["d"] * n},
        user_numeric=rng.normal(size=(n, 3)).astype(np.float32),
        item_categorical={"category": [f"k{hash(i) % 7}" for i in item_ids]},
        hard_negative_flat=[h for row in hard for h in row],
        hard_negative_offsets=np.concatenate([[0], np.cumsum([len(row) for row in hard])]).astype(np.int64),
        teacher_scores=np.full(n, np.nan, np.float32),
    )


def zipf(n: int, exponent: float = 1.0) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


def online_learner(tmp_path, items: int, buckets: int, **training) -> tuple[Learner, TwoTowerModel]:
    settings = load_settings(
        data_dir=tmp_path, model=SMALL_MODEL, vocabulary={"user_min_count": 1}, frequency={"buckets": buckets}, training=training
    )
    torch.manual_seed(0)
    model = TwoTowerModel(settings.model, settings.vocabulary)
    f = settings.frequency
    return Learner(model, settings.training, FrequencyEstimator(f.buckets, f.hashes, f.alpha), trainable="user_ids"), model


class LossSpy:
    """Records what the learner hands the in-batch softmax (and calls it)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []
        original = losses.in_batch_softmax_loss

        def spy(user_vectors, item_vectors, temperature, item_probabilities=None, item_keys=None, *args, **kwargs):
            self.calls.append((item_keys.numpy().copy(), item_probabilities.numpy().astype(np.float64)))
            return original(user_vectors, item_vectors, temperature, item_probabilities, item_keys, *args, **kwargs)

        monkeypatch.setattr(losses, "in_batch_softmax_loss", spy)


@pytest.mark.parametrize(
    "n_items,steps,min_slots",
    [(100, 150, 2000), pytest.param(20_000, 300, 800, marks=pytest.mark.slow)],
)
def test_logq_uses_the_measured_in_batch_frequency_after_resampling(tmp_path, monkeypatch, n_items, steps, min_slots):
    # A Zipf(1) click stream through the real learner: the estimator (warmed
    # on 300k clicks), positive re-sampling and the batch composition feed the
    # in-batch softmax. The probability handed to its logQ correction for an
    # item must be the share of candidate slots the item actually fills,
    # counted over `steps` minibatches of 1024: within 10% for every item
    # counted in >= min_slots slots (one standard error <= 3.5%), and for the
    # items of popularity ranks 4-300 together (the flattened middle, each
    # too rare to measure alone). The click share p alone is ~10x too high
    # for the head, which re-sampling keeps ~0.1 times per click (log 10 =
    # 2.3 nats of over-correction), and too low for the tail.
    learner, model = online_learner(tmp_path, n_items, 1 << 16, negatives={"hard_fraction": 0.0})
    p = zipf(n_items)
    rng = np.random.default_rng(1)
    item_names = np.array([f"i{k}" for k in range(n_items)])
    warm = rng.choice(n_items, size=300_000, p=p)
    learner.estimator.update(None, fingerprint_strings(item_names.tolist())[warm])
    spy = LossSpy(monkeypatch)
    for step in range(steps):
        drawn = rng.choice(n_items, size=1024, p=p)
        learner.learn(clicks([f"u{k}" for k in rng.integers(0, 5000, 1024)], item_names[drawn].tolist(), seed=step))
    keys = np.concatenate([k for k, _ in spy.calls])
    passed = np.concatenate([q for _, q in spy.calls])
    slots = len(keys)
    counts = np.bincount(keys)
    mean_passed = np.bincount(keys, weights=passed) / np.maximum(counts, 1)
    frequent = np.flatnonzero(counts >= min_slots)
    ratio = mean_passed[frequent] / (counts[frequent] / slots)
    top = frequent[np.argsort(-counts[frequent])[:3]]
    names = [model.catalogue.ids[i] for i in top]
    print(f"{n_items:,} items, {slots:,} slots, {len(frequent)} items in >= {min_slots} slots: logQ probability / measured "
          f"frequency median {np.median(ratio):.3f}, range {ratio.min():.3f}..{ratio.max():.3f}; top items {names}: "
          f"{np.round(mean_passed[top] / (counts[top] / slots), 3).tolist()}")
    middle = model.catalogue.indices([f"i{r}" for r in range(3, min(300, n_items))])
    assert np.all(counts[middle] > 0)  # every one of them measured
    middle_ratio = mean_passed[middle].sum() / (counts[middle].sum() / slots)  # predicted / measured slots
    print(f"  ranks 4-300 together: logQ probability / measured frequency {middle_ratio:.3f}")
    assert len(frequent) >= 2
    assert np.all(np.abs(ratio - 1) < 0.10)
    assert abs(middle_ratio - 1) < 0.10


@pytest.mark.parametrize("n_items,buckets", [(300, 1 << 14), (1_000_000, 1 << 20)])
def test_resampling_keeps_the_number_of_clicks_at_any_catalogue_size(tmp_path, n_items, buckets):
    # Zipf(1) clicks. After the estimator has seen 2M clicks, 30 minibatches
    # of 1024 go through the learner; the positives it learns from after
    # re-sampling must number the clicks, within 10% (mean multiplicity 1).
    # An absolute reference share of 1e-3 kept 0.42 of the clicks on 300
    # items and up-sampled a 1M-item stream (most clicks at the 3x cap).
    learner, _ = online_learner(tmp_path, n_items, buckets, negatives={"hard_fraction": 0.0})
    p = zipf(n_items)
    rng = np.random.default_rng(2)
    fingerprints = fingerprint_strings([f"i{k}" for k in range(n_items)])
    warm = rng.choice(n_items, size=2_000_000, p=p)
    for start in range(0, len(warm), 200_000):
        learner.estimator.update(None, fingerprints[warm[start : start + 200_000]])
    given = learnt = 0
    for step in range(30):
        drawn = rng.choice(n_items, size=1024, p=p)
        result = learner.learn(clicks([f"u{k}" for k in rng.integers(0, 5000, 1024)], [f"i{k}" for k in drawn], seed=step))
        given += 1024
        learnt += result.samples
    print(f"{n_items:,} items: {learnt:,} positives learnt from {given:,} clicks (mean multiplicity {learnt / given:.3f})")
    assert learnt / given == pytest.approx(1.0, abs=0.1)


def _per_row_oracle(model, batch, hard_fraction, temperature):
    """The loss as each row's own easy/hard mix, computed from the model by
    hand: plain cross-entropies, no fused code."""
    with torch.no_grad():
        users = model.user_vectors(
            model.user_inputs(batch.user_ids, batch.user_categorical, batch.user_numeric)
        )  # (B, D)
        items = model.item_vectors(model.catalogue_inputs(model.catalogue.indices(batch.item_ids)))  # (B, D)
        easy = F.cross_entropy(users @ items.T / temperature, torch.arange(len(batch)), reduction="none")  # (B,)
        rows = []
        for i, dropped in enumerate(batch.hard_negative_ids):
            dropped = [d for d in dropped if d != batch.item_ids[i]]  # a row's own item is never its negative
            if not dropped:
                rows.append(easy[i])
                continue
            negatives = model.item_vectors(model.catalogue_inputs(model.catalogue.indices(list(dropped))))  # (H, D)
            logits = torch.cat([(users[i] @ items[i]).view(1), negatives @ users[i]]) / temperature
            hard = -F.log_softmax(logits, dim=0)[0]
            rows.append((1 - hard_fraction) * easy[i] + hard_fraction * hard)
        return float(torch.stack(rows).mean())


@pytest.mark.parametrize("share_with_hard", [0.1, 1.0])
def test_each_row_is_its_own_easy_hard_mix(tmp_path, share_with_hard):
    # 40 rows of distinct users and items; a share f of them have 3 hard
    # negatives. The learner's loss must be mean_i(loss_i) with loss_i =
    # 0.5 * in_batch_i + 0.5 * hard_i for a row with hard negatives and
    # in_batch_i otherwise. The batch-level mix (0.5 * mean over all rows +
    # 0.5 * mean over the rows with hard ones) weighs each such row
    # (1 + 1/f) times the others: 11x at f = 0.1; at f = 1 both agree.
    settings = load_settings(
        data_dir=tmp_path,
        vocabulary={"user_min_count": 1},
        frequency={"buckets": 1 << 10},
        training={"negatives": {"logq_correction": False}, "positive_resampling": {"enabled": False}},
    )
    torch.manual_seed(0)
    model = TwoTowerModel(settings.model, settings.vocabulary)
    learner = Learner(model, settings.training, FrequencyEstimator(1 << 10, 2, 0.01), trainable="all")
    b = 40
    with_hard = set(range(0, b, round(1 / share_with_hard)))
    hard = [tuple(f"i{(i * 7 + j) % b}" for j in (1, 2, 3)) if i in with_hard else () for i in range(b)]
    batch = clicks([f"u{i}" for i in range(b)], [f"i{i}" for i in range(b)], hard, seed=4)
    learner.observe(batch, DAY_MS // 86_400_000)  # rows exist (with their noise) before the oracle reads them
    expected = _per_row_oracle(copy.deepcopy(model), batch, 0.5, model.temperature)
    result = learner.learn(batch, observe=False)
    print(f"f = {share_with_hard}: learner loss {result.loss:.5f}, per-row mix {expected:.5f}")
    assert result.loss == pytest.approx(expected, rel=1e-5)


def test_pointwise_draws_two_negatives_per_positive_by_default(tmp_path, monkeypatch):
    # The design's 1:2 to 1:3; 2 keeps the 50/50 easy/hard mix exact (1 + 1).
    settings = load_settings(data_dir=tmp_path, vocabulary={"user_min_count": 1}, frequency={"buckets": 1 << 10},
                             training={"mode": "pointwise"})
    model = TwoTowerModel(settings.model, settings.vocabulary)
    learner = Learner(model, settings.training, FrequencyEstimator(1 << 10, 2, 0.01), trainable="all")
    shapes = []
    original = losses.pointwise_loss
    monkeypatch.setattr(losses, "pointwise_loss", lambda pos, neg, *a: (shapes.append(tuple(neg.shape)), original(pos, neg, *a))[1])
    learner.learn(clicks([f"u{i}" for i in range(16)], [f"i{i}" for i in range(16)], [("i1", "i2")] * 16))
    assert shapes and all(shape[1] == 2 for shape in shapes)
    assert load_settings(data_dir=tmp_path, training={"mode": "listwise"}).training.negatives_per_positive == 4


def test_sampling_probabilities_are_floored_at_the_estimators_resolution(tmp_path):
    # 1024 buckets after 20,000 steps: resolution 1/1024. A never-seen item
    # and one seen once read p = 0 (no gap yet) and are floored there, not at
    # a fixed 1e-6; a common item keeps its estimate (1/2 of the stream).
    learner, _ = online_learner(tmp_path, 10, 1 << 10, positive_resampling={"enabled": False})
    learner.estimator.update([f"common" if k % 2 else f"other{k % 50}" for k in range(20_000)] + ["once"])
    batch = clicks(["u1", "u2", "u3"], ["common", "once", "never"])
    _, probabilities = learner.candidate_probabilities(batch)
    resolution = learner.estimator.resolution
    assert resolution == 1 / 1024
    assert probabilities[1] == probabilities[2] == resolution
    assert probabilities[0] == pytest.approx(0.5, rel=0.05)
