"""Vectors of items born since the full release, for embeddings releases.

Between two full models an item first seen in the batches has features but
no vector in the full release's index, so it cannot be retrieved. The
online trainers add every clicked item to their catalogue (ID and
categorical features, saved in each checkpoint), and the item tower is
frozen online: the vector the full model gives such an item is computable
now. Its categorical features read their tables (an unseen value reads
that table's default row). Its ID was never admitted by the full model,
so it has no ID row of its own; ``publisher.new_item_id_row`` says which
it reads:

- ``feature_mean`` (the default): the mean ID row of the full catalogue's
  items with the same categorical values (of all its items where none
  has them), the usual mean-embedding start for a new ID;
- ``default``: the table's shared default row, which is also where a new
  ID's row starts in training. With every item admitted at its first
  sighting (``vocabulary.item_min_count = 1``) that row is never trained,
  and the vectors it gives rank born items too low to be retrieved (see
  docs/service.md for the measurement).

``new_catalogue_items`` is the pure part (which items, with which
features); ``FrozenItemTower`` runs the full model's item tower on them
(``TwoTowerModel.item_vectors``, the trainers' own code path), loading
each full model once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from freshtower.trainer.artifacts import load_full_model, read_manifest
from freshtower.trainer.model import TwoTowerModel

EMBED_CHUNK = 65536  # items per item-tower call
IdRow = Literal["feature_mean", "default"]


@dataclass(frozen=True)
class CatalogueItems:
    """Items with their categorical feature values, one column per feature."""

    item_ids: list[str]
    categorical: dict[str, list[str]]  # feature name -> value per item ("" unknown)

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class NewItemVectors:
    item_ids: list[str]
    vectors: np.ndarray  # (n, output_dim) float32, unit length
    seconds: float  # to embed them


def new_catalogue_items(known: Iterable[str], catalogues: Sequence[Mapping]) -> CatalogueItems:
    """The items of ``catalogues`` (``ItemCatalogue.state_dict()``, one per
    online checkpoint) that are not in ``known`` (the full release's items),
    in the order first found. An item several catalogues hold takes, per
    feature, the first known value.

    >>> a = {"categorical_names": ["category"], "ids": ["i1", "i7"], "features": [["c1"], [""]], "last_seen": [0, 1]}
    >>> b = {"categorical_names": ["category"], "ids": ["i8", "i7"], "features": [["c2"], ["c3"]], "last_seen": [1, 1]}
    >>> new_catalogue_items({"i1"}, [a, b])
    CatalogueItems(item_ids=['i7', 'i8'], categorical={'category': ['c3', 'c2']})
    """
    known = set(known)
    names: tuple[str, ...] | None = None
    features: dict[str, list[str]] = {}
    for catalogue in catalogues:
        these = tuple(catalogue["categorical_names"])
        if names is None:
            names = these
        elif these != names:
            raise ValueError(f"online catalogues disagree on the item features: {list(names)} vs {list(these)}")
        for item_id, values in zip(catalogue["ids"], catalogue["features"]):
            if item_id in known:
                continue
            held = features.get(item_id)
            if held is None:
                features[item_id] = list(values)
            else:
                features[item_id] = [old or new for old, new in zip(held, values)]
    names = names or ()
    ids = list(features)
    return CatalogueItems(ids, {name: [features[i][j] for i in ids] for j, name in enumerate(names)})


class FrozenItemTower:
    """The item tower of the full model a release belongs to, loaded from
    ``models_dir`` once per model version (the newest one is kept)."""

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self._loaded: tuple[str, TwoTowerModel, dict[tuple[str, ...], torch.Tensor]] | None = None

    def model(self, version: str) -> TwoTowerModel:
        if self._loaded is None or self._loaded[0] != version:
            model = load_full_model(read_manifest(self.models_dir / version)).model
            model.eval()
            self._loaded = (version, model, feature_mean_rows(model))
        return self._loaded[1]

    def embed(self, version: str, items: CatalogueItems, id_row: IdRow = "feature_mean") -> NewItemVectors:
        """Vectors of ``items`` by the item tower of full model ``version``."""
        model = self.model(version)
        means = self._loaded[2]
        names = model.item_categorical
        started = time.perf_counter()
        parts = [np.zeros((0, model.config.output_dim), np.float32)]
        with torch.no_grad():
            for start in range(0, len(items), EMBED_CHUNK):
                end = min(start + EMBED_CHUNK, len(items))
                inputs = model.item_inputs(items.item_ids[start:end], {k: v[start:end] for k, v in items.categorical.items()})
                if id_row == "feature_mean":
                    keys = zip(*(items.categorical.get(name, [""] * len(items))[start:end] for name in names))
                    id_vectors = torch.stack([means.get(tuple(key), means[()]) for key in keys])  # (chunk, id_dim)
                    vectors = model.item_tower.from_id_vectors(id_vectors, inputs)
                else:
                    vectors = model.item_vectors(inputs)
                parts.append(vectors.numpy().astype(np.float32))  # (chunk, D)
        return NewItemVectors(list(items.item_ids), np.concatenate(parts), time.perf_counter() - started)


def feature_mean_rows(model: TwoTowerModel) -> dict[tuple[str, ...], torch.Tensor]:
    """The mean item ID row per tuple of categorical values among the
    catalogue's items with a row of their own; ``()`` holds the mean over
    all of them (the table's default row if there are none)."""
    table = model.item_tower.id_embedding.detach()
    rows = model.item_ids.lookup(model.catalogue.ids)  # (N,) int64; 0: no row of its own
    own = np.flatnonzero(rows > 0)
    means: dict[tuple[str, ...], torch.Tensor] = {(): table[torch.from_numpy(rows[own])].mean(0) if len(own) else table[0]}
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, values in zip(own.tolist(), model.catalogue.features_of(own.tolist())):
        groups.setdefault(tuple(values), []).append(int(rows[index]))
    for key, members in groups.items():
        means[key] = table[torch.as_tensor(members)].mean(0)
    return means
