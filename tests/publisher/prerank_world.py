"""A small seeded pre-ranking world for the item-cache and scorer tests: a
three-tower model that knows some users and items (with categories), and
statistics counted from a few hundred interactions."""

from __future__ import annotations

import numpy as np
import torch
from freshtower.trainer.prerank_model import ThreeTowerPreranker

from freshtower.core.settings import ModelConfig, PrerankConfig, VocabularyConfig
from freshtower.core.statistics import Interactions, ItemStatistics, UserStatistics, item_count_deltas

PRERANK = PrerankConfig(id_dim=8, categorical_dim=4, user_hidden_dims=(16,), item_hidden_dims=(12,), tower_dim=6,
                        cross_hidden_dims=(10,), cross_dim=5, upper_hidden_dims=(9, 7))
USER_CATEGORICAL = {"age_bucket": ["a", "b", "a", "b"], "city": ["x", "y", "x", "y"], "device": ["ios", "web", "web", "ios"]}
T = 1_795_132_800_000 + 5 * 3_600_000  # a request time: 05:00 on a UTC day


def category_of(item: int) -> str:
    return f"c{item % 4}"


def small_model(items: int = 30, seed: int = 0) -> ThreeTowerPreranker:
    torch.manual_seed(seed)
    model = ThreeTowerPreranker(ModelConfig(), PRERANK, VocabularyConfig(user_min_count=1))
    model.observe_users([f"u{k}" for k in range(4)], USER_CATEGORICAL, day=0)
    item_ids = [f"i{k}" for k in range(items)]
    features = {"category": [category_of(k) for k in range(items)]}
    model.observe_items(item_ids, features, day=0)
    model.catalogue.update(item_ids, features, day=0)
    model.sync_tables()
    with torch.no_grad():
        for table, _ in model.table_vocabularies():
            table.normal_(0, 1.0)
    return model


def user_inputs(model: ThreeTowerPreranker, user: int):
    categorical = {name: [values[user]] for name, values in USER_CATEGORICAL.items()}
    return model.user_inputs([f"u{user}"], categorical, np.array([[0.5, 0.1, 0.9]]) * (user + 1))


def statistics(items: int = 30, seed: int = 0) -> tuple[ItemStatistics, UserStatistics]:
    """Counts of 600 interactions over the 30 hours before ``T``."""
    rng = np.random.default_rng(seed)
    n = 600
    item_index = rng.integers(0, items + 5, n)  # some interactions with items the model does not know
    rows = Interactions(
        [f"u{k}" for k in rng.integers(0, 4, n).tolist()],
        [f"i{k}" for k in item_index.tolist()],
        [category_of(k) if k < items else "" for k in item_index.tolist()],
        T - rng.integers(1, 30 * 3_600_000, n),
        rng.random(n) < 0.3,
    )
    item_stats, user_stats = ItemStatistics(), UserStatistics()
    item_stats.apply(item_count_deltas(rows))
    user_stats.add(rows)
    return item_stats, user_stats
