from __future__ import annotations

import numpy as np
import pytest
import torch
from freshtower.trainer.distillation import listwise_distillation, prerank_objective, teacher_logits
from freshtower.trainer.prerank_model import ThreeTowerPreranker
from torch import nn

from freshtower.core.settings import DistillationConfig, ModelConfig, PrerankConfig, VocabularyConfig
from freshtower.core.statistics import FEATURE_NAMES

MODEL = ModelConfig()
SMALL = PrerankConfig(id_dim=8, categorical_dim=4, user_hidden_dims=(16,), item_hidden_dims=(12,), tower_dim=6,
                      cross_hidden_dims=(10,), cross_dim=5, upper_hidden_dims=(9, 7))


def built(prerank=SMALL, users=6, items=20, seed=0):
    torch.manual_seed(seed)
    model = ThreeTowerPreranker(MODEL, prerank, VocabularyConfig(user_min_count=1))
    user_ids = [f"u{k}" for k in range(users)]
    item_ids = [f"i{k}" for k in range(items)]
    categorical = {"age_bucket": ["a", "b"] * (users // 2), "city": ["x"] * users, "device": ["ios", "web"] * (users // 2)}
    model.observe_users(user_ids, categorical, day=0)
    item_features = {"category": [f"c{k % 4}" for k in range(items)]}
    model.observe_items(item_ids, item_features, day=0)
    model.catalogue.update(item_ids, item_features, day=0)
    model.sync_tables()
    with torch.no_grad():  # spread the tables so that rows differ
        for table, _ in model.table_vocabularies():
            table.normal_(0, 1.0)
    numeric = np.random.default_rng(seed).normal(size=(users, 3))
    return model, model.user_inputs(user_ids, categorical, numeric), model.catalogue_inputs(np.arange(items))


def test_layer_widths_follow_the_prerank_config():
    model, _, _ = built()
    widths = lambda mlp: [(m.in_features, m.out_features) for m in mlp if isinstance(m, nn.Linear)]  # noqa: E731
    assert widths(model.user_tower.mlp) == [(8 + 3 * 4 + 3, 16), (16, 6)]  # ID 8 + 3 categorical x 4 + 3 numeric
    assert widths(model.item_tower.mlp) == [(8 + 4, 12), (12, 6)]
    assert widths(model.cross_tower) == [(len(FEATURE_NAMES), 10), (10, 5)]
    assert widths(model.upper) == [(6 + 6 + 5, 9), (9, 7), (7, 1)]
    assert model.user_tower.id_embedding.shape[1] == 8
    # every dense weight is in dense_parameters, no table is
    tables = {id(t) for t, _ in model.table_vocabularies()}
    dense = {id(p) for p in model.dense_parameters()}
    assert dense.isdisjoint(tables) and dense | tables == {id(p) for p in model.parameters()}


def test_a_category_feature_the_items_lack_is_refused():
    with pytest.raises(ValueError, match="'genre' is not an item categorical feature"):
        ThreeTowerPreranker(MODEL, PrerankConfig(category_feature="genre"), VocabularyConfig())


@pytest.mark.parametrize(
    "prerank",
    [
        SMALL,
        SMALL.model_copy(update={"cross_hidden_dims": (), "upper_hidden_dims": (9,)}),  # linear cross tower, one upper layer
        PrerankConfig(),  # the defaults
    ],
)
def test_the_serving_scorer_computes_the_forward_pass_from_cached_item_rows(prerank):
    model, users, items = built(prerank)
    statistics = torch.rand(len(items), len(FEATURE_NAMES), generator=torch.Generator().manual_seed(1)) * 3
    scorer = model.candidate_scorer(max_candidates=64)
    item_rows = model.item_cache_rows(items)  # (n, H1) precomputed, as the cache holds them
    for user in range(len(users)):
        one = users.select(torch.tensor([user]))
        with torch.no_grad():
            expected = model(one, items, statistics, request_of=torch.zeros(len(items), dtype=torch.long))
            user_vector = model.user_tower(one)[0]
        got = scorer.score(user_vector, item_rows, statistics)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # a sub-list reuses the buffers
    assert torch.allclose(scorer.score(user_vector, item_rows[:3], statistics[:3]), expected[:3], atol=1e-5)
    with pytest.raises(ValueError, match="exceed this scorer's maximum of 64"):
        scorer.item_rows_buffer(65)


def test_item_rows_in_chunks_equal_one_call_and_follow_catalogue_order():
    model, _, items = built()
    whole = model.item_cache_rows(items)
    assert torch.allclose(model.item_cache_rows(items, chunk=7), whole)
    assert torch.allclose(model.project_item_outputs(model.item_outputs(items, chunk=7)), whole)
    assert torch.allclose(model.item_outputs(items), model.catalogue_vectors())  # the towers' own bulk path
    assert torch.allclose(model.catalogue_item_rows(), whole)
    # an unknown item reads the default ID row and unknown feature values: the cold row
    unknown = model.item_inputs(["never-seen"], {"category": ["no-such-category"]})
    assert torch.allclose(model.item_cache_rows(unknown)[0], model.cold_item_row())


def test_state_round_trips_into_a_fresh_model():
    model, users, items = built()
    statistics = torch.rand(len(items), len(FEATURE_NAMES))
    request_of = torch.arange(len(items)) % len(users)
    with torch.no_grad():
        before = model(users, items, statistics, request_of)
    fresh = ThreeTowerPreranker(MODEL, SMALL, VocabularyConfig(user_min_count=1))
    fresh.import_state(model.export_state())
    fresh.sync_tables()
    with torch.no_grad():
        after = fresh(users, items, statistics, request_of)
    assert torch.equal(before, after)


def test_training_on_the_rankers_scores_moves_the_student_toward_the_teacher():
    # a teacher the towers alone cannot express: it depends on the statistics feature 0 and on the
    # (user, item category) pair; after training the listwise KL to the teacher falls well below its start
    model, users, items = built(seed=3)
    generator = torch.Generator().manual_seed(4)
    requests, per_request = 6, 20
    request_of = torch.arange(requests).repeat_interleave(per_request)
    candidates = torch.randint(0, len(items), (requests * per_request,), generator=generator)
    statistics = torch.rand(len(candidates), len(FEATURE_NAMES), generator=generator)
    affinity = torch.randn(len(users), 4, generator=generator)
    teacher_logit = 2 * statistics[:, 0] + affinity[request_of, candidates % 4]
    scores = torch.sigmoid(teacher_logit)
    clicks = (torch.rand(len(scores), generator=generator) < scores).long()
    offsets = torch.arange(0, requests * per_request + 1, per_request)
    item_inputs = items.select(candidates)
    config = DistillationConfig(mode="listwise", click_weight=0.1, distill_weight=1.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)

    def kl():
        with torch.no_grad():
            return listwise_distillation(model(users, item_inputs, statistics, request_of), teacher_logits(scores), offsets).item()

    start = kl()
    for _ in range(300):
        optimiser.zero_grad()
        prerank_objective(model(users, item_inputs, statistics, request_of), clicks, scores, offsets, config).backward()
        optimiser.step()
    end = kl()
    assert end < 0.2 * start, (start, end)
