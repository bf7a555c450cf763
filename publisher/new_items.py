"""Vectors of items born since the full release, for embeddings releases.

Between two full models an item first seen in the batches has features but
no vector in the full release's index, so it cannot be retrieved. The
online trainers add every clicked item to their catalogue (ID and
categorical features, saved in each checkpoint), and the item tower is
frozen online: the vector the full model gives such an item is computable
now. Its ID was never admitted by the full model, so it reads the shared
default (cold-start) ID row; its categorical features read their tables
(an unseen value reads that table's default row too).

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

import numpy as np
import torch
from freshtower.trainer.artifacts import load_full_model, read_manifest
from freshtower.trainer.model import TwoTowerModel

EMBED_CHUNK = 65536  # items per item-tower call


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
        self._loaded: tuple[str, TwoTowerModel] | None = None

    def model(self, version: str) -> TwoTowerModel:
        if self._loaded is None or self._loaded[0] != version:
            model = load_full_model(read_manifest(self.models_dir / version)).model
            model.eval()
            self._loaded = (version, model)
        return self._loaded[1]

    def embed(self, version: str, items: CatalogueItems) -> NewItemVectors:
        """Vectors of ``items`` by the item tower of full model ``version``."""
        model = self.model(version)
        started = time.perf_counter()
        parts = [np.zeros((0, model.config.output_dim), np.float32)]
        with torch.no_grad():
            for start in range(0, len(items), EMBED_CHUNK):
                end = min(start + EMBED_CHUNK, len(items))
                inputs = model.item_inputs(items.item_ids[start:end], {k: v[start:end] for k, v in items.categorical.items()})
                parts.append(model.item_vectors(inputs).numpy().astype(np.float32))  # (chunk, D)
        return NewItemVectors(list(items.item_ids), np.concatenate(parts), time.perf_counter() - started)
