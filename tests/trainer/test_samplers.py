from __future__ import annotations

import numpy as np
import pytest
import torch
from freshtower.trainer.learner import Learner
from freshtower.trainer.model import TwoTowerModel
from freshtower.trainer.samplers import (
    CatalogueSampler,
    clicked_only,
    hard_negative_matrix,
    in_batch_negatives,
    mix_negatives,
    popularity_weights,
    positive_multiplicity,
)

from freshtower.core.batches import SampleColumns
from freshtower.core.frequency import FrequencyEstimator
from freshtower.core.settings import load_settings


def test_catalogue_sampler_draws_in_proportion_to_clicks_to_the_075():
    clicks = np.array([0.8, 0.2])
    # weights 0.8^0.75 = 0.8459, 0.2^0.75 = 0.2991 -> shares 0.7388, 0.2612
    sampler = CatalogueSampler(popularity_weights(clicks, 0.75))
    assert sampler.probabilities == pytest.approx([0.7388, 0.2612], abs=1e-4)
    draws = sampler.sample(40_000, np.random.default_rng(0))
    assert np.mean(draws == 0) == pytest.approx(0.7388, abs=0.01)
    with pytest.raises(ValueError):
        CatalogueSampler(np.zeros(3))


def test_in_batch_negatives_are_other_rows_and_never_the_same_item():
    keys = np.array([5, 6, 5, 7])
    positions = in_batch_negatives(keys, 50, np.random.default_rng(0))
    rows = np.arange(4)[:, None]
    assert not np.any(positions == rows)  # never the row itself
    valid = positions >= 0
    assert np.all(keys[positions[valid]] != np.broadcast_to(keys[:, None], positions.shape)[valid])
    assert np.all(positions[0][positions[0] >= 0] != 2)  # row 2 holds the same item as row 0


def test_hard_negative_matrix_skips_the_positive_and_unknown_items():
    # rows' dropped items: [a, b, zz, c], [d], [] with a..d = catalogue 0..3, zz unknown
    offsets = np.array([0, 4, 5, 5])
    candidates = np.array([0, 1, -1, 2, 3])
    matrix = hard_negative_matrix(offsets, candidates, np.array([1, 3, 0]), width=2, rng=np.random.default_rng(0))
    assert matrix.shape == (3, 2)
    assert set(matrix[0].tolist()) == {0, 2}  # "b" is row 0's positive, "zz" unknown
    assert matrix[1].tolist() == [-1, -1]  # its only hard negative is its positive
    assert matrix[2].tolist() == [-1, -1]


def test_mix_takes_half_hard_and_tops_up_with_easy():
    hard = np.array([[10, 11, 12, 13], [20, -1, -1, -1], [-1, -1, -1, -1]])
    easy = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 8, 7, 6]])
    mixed = mix_negatives(hard, easy, count=4, hard_fraction=0.5)
    assert mixed.tolist() == [[10, 11, 1, 2], [20, 5, 6, 7], [9, 8, 7, 6]]
    assert mix_negatives(hard, easy, count=4, hard_fraction=0.0).tolist() == easy.tolist()


def test_positive_resampling_thins_popular_and_repeats_rare_items():
    rng = np.random.default_rng(0)
    p = np.array([0.1] * 5000 + [1e-5] * 5000)
    repeats = positive_multiplicity(p, rng, exponent=0.5, reference_share=1e-3, min_multiplicity=0.05, max_multiplicity=3.0)
    # popular: (1e-3 / 0.1)^0.5 = 0.1 kept on average; rare: (1e-3 / 1e-5)^0.5 = 10 -> clipped to 3
    assert repeats[:5000].mean() == pytest.approx(0.1, abs=0.02)
    assert np.all(repeats[5000:] == 3)


def columns(user_ids, item_ids, labels, hard) -> SampleColumns:
    n = len(user_ids)
    return SampleColumns(
        user_ids=list(user_ids),
        item_ids=list(item_ids),
        labels=np.array(labels, dtype=np.int8),
        event_time_ms=np.arange(n, dtype=np.int64) + 1_795_000_000_000,
        request_ids=[f"r{i}" for i in range(n)],
        positions=np.zeros(n, np.int32),
        user_categorical={"age_bucket": ["a"] * n, "city": ["c"] * n, "device": ["d"] * n},
        user_numeric=np.zeros((n, 3), np.float32),
        item_categorical={"category": ["k"] * n},
        hard_negative_flat=[h for row in hard for h in row],
        hard_negative_offsets=np.concatenate([[0], np.cumsum([len(row) for row in hard])]).astype(np.int64),
        teacher_scores=np.full(n, np.nan, np.float32),
    )


def test_clicked_only_drops_shown_records():
    batch = columns(["u1", "u2", "u3"], ["a", "b", "c"], [1, 0, 1], [(), (), ()])
    assert clicked_only(batch).item_ids == ["a", "c"]


@pytest.mark.parametrize(
    "mode,easy_source",
    [("listwise", "in_batch"), ("listwise", "catalogue"), ("pointwise", "in_batch"), ("pairwise", "catalogue")],
)
def test_shown_but_not_clicked_never_reaches_a_retrieval_loss(mode, easy_source, tmp_path):
    settings = load_settings(
        data_dir=tmp_path,
        vocabulary={"user_min_count": 1},
        frequency={"buckets": 256},
        training={"mode": mode, "negatives": {"easy_source": easy_source}, "positive_resampling": {"enabled": False}},
    )
    model = TwoTowerModel(settings.model, settings.vocabulary)
    learner = Learner(model, settings.training, FrequencyEstimator(256, 2, 0.1), trainable="all")
    n_clicks = 32
    user_ids = [f"u{i}" for i in range(n_clicks)] + [f"u{i}" for i in range(n_clicks)]
    item_ids = [f"clicked{i % 8}" for i in range(n_clicks)] + [f"shown-only{i}" for i in range(n_clicks)]
    labels = [1] * n_clicks + [0] * n_clicks
    hard = [(f"dropped{i % 5}",) for i in range(2 * n_clicks)]
    batch = columns(user_ids, item_ids, labels, hard)
    # The shown-only items are in the catalogue (the full trainer fills it
    # from every record), so only the sampling rules keep them out.
    model.catalogue.update(item_ids + [f"dropped{i}" for i in range(5)], None, day=0)
    shown_only = set(model.catalogue.indices([f"shown-only{i}" for i in range(n_clicks)]).tolist())

    seen: list[np.ndarray] = []
    original = learner._vectors_for
    learner._vectors_for = lambda indices: (seen.append(indices.copy()), original(indices))[1]
    learner.estimator.update([f"clicked{i % 8}" for i in range(n_clicks)])  # sampler weights: clicks...
    for _ in range(5):
        result = learner.learn(batch)
        assert result.samples == n_clicks  # only the clicks are learnt from
    candidates = set(np.concatenate([s.ravel() for s in seen]).tolist())
    if easy_source == "catalogue":
        # ...so a never-clicked item is drawn from the whole catalogue with
        # weight ~1e-7 (chance ~0.002 over these draws), never because it
        # was shown.
        assert len(candidates & shown_only) <= 1
    else:
        assert not candidates & shown_only


def test_a_batch_of_only_shown_records_changes_nothing(tmp_path):
    settings = load_settings(data_dir=tmp_path, frequency={"buckets": 256})
    model = TwoTowerModel(settings.model, settings.vocabulary)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = Learner(model, settings.training, FrequencyEstimator(256, 2, 0.1), trainable="all")
    result = learner.learn(columns(["u1", "u2"], ["a", "b"], [0, 0], [(), ()]))
    assert result.samples == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
