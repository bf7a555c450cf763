"""The user tower as serving runs it.

A full release carries the user tower without its ID table
(``user_tower.pt``: MLP weights, categorical-feature tables and their
vocabularies, feature names); the ID embeddings travel separately as
release rows, so that embeddings releases can replace them. At request
time serving gathers the user's latest published ID row and runs
``Tower.from_id_vectors`` on it and the request's features: the same code
path as training (``trainer/model.py``), so the vector is the one the
trainer would compute (a test checks it against ``TwoTowerModel``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from freshtower.trainer.model import Tower, TowerInputs, TwoTowerModel
from freshtower.trainer.vocabulary import IdVocabulary

USER_TOWER_FORMAT = 1


class FeatureError(ValueError):
    """A request's user features do not fit the active user tower."""


def export_user_tower(model: TwoTowerModel) -> dict:
    """The serving half of a full model's user tower, as plain tensors, lists
    and dicts (loads with ``torch.load(weights_only=True)``)."""
    tower = model.user_tower
    names = list(model.user_categorical)
    return {
        "format": USER_TOWER_FORMAT,
        "id_dim": int(tower.id_embedding.shape[1]),
        "categorical_dim": int(model.config.categorical_dim),
        "hidden_dims": [int(h) for h in model.config.hidden_dims],
        "output_dim": int(model.config.output_dim),
        "categorical": names,
        "numeric": list(model.user_numeric),
        # tables trimmed to their vocabularies (the trainer grows them with spare rows)
        "categorical_tables": [t.detach()[: len(model.user_values[n])].clone() for t, n in zip(tower.categorical_embeddings, names)],
        "mlp": {k: v.detach().clone() for k, v in tower.mlp.state_dict().items()},
        "values": {n: model.user_values[n].state_dict() for n in names},
    }


def exported_tensors(state: dict) -> dict[str, torch.Tensor]:
    """Every weight in an exported tower, by name (for the finiteness check)."""
    named = {f"categorical/{n}": t for n, t in zip(state["categorical"], state["categorical_tables"])}
    named.update({f"mlp.{k}": v for k, v in state["mlp"].items()})
    return named


class ServingUserTower:
    """User features + an ID embedding row -> the unit user vector ``a``."""

    def __init__(self, state: dict, where: str = "user tower"):
        if state.get("format") != USER_TOWER_FORMAT:
            raise ValueError(f"{where}: unsupported user tower format {state.get('format')!r}")
        self.id_dim = int(state["id_dim"])
        self.output_dim = int(state["output_dim"])
        self.categorical = tuple(state["categorical"])
        self.numeric = tuple(state["numeric"])
        self.values = {n: IdVocabulary.from_state_dict(state["values"][n]) for n in self.categorical}
        tower = Tower(
            self.id_dim, len(self.categorical), int(state["categorical_dim"]), len(self.numeric), state["hidden_dims"], self.output_dim
        )
        with torch.no_grad():
            for name, parameter, table in zip(self.categorical, tower.categorical_embeddings, state["categorical_tables"]):
                if table.shape[1:] != parameter.shape[1:] or table.shape[0] != len(self.values[name]):
                    raise ValueError(f"{where}: table {name!r} has shape {tuple(table.shape)}, vocabulary {len(self.values[name])} rows")
                parameter.data = table.clone()
            try:
                tower.mlp.load_state_dict(state["mlp"])
            except RuntimeError as error:
                raise ValueError(f"{where}: MLP weights do not fit: {error}") from error
        tower.eval()
        tower.requires_grad_(False)
        self.tower = tower

    @classmethod
    def load(cls, path: Path) -> ServingUserTower:
        try:
            state = torch.load(path, weights_only=True)
        except Exception as error:
            raise ValueError(f"{path}: cannot load the user tower: {error}") from error
        return cls(state, where=str(path))

    def parse_features(self, features: Mapping[str, object]) -> tuple[dict[str, str], np.ndarray]:
        """Check one request's features: categorical ones must be strings,
        numeric ones finite numbers; absent ones read as unknown / 0 (as in
        the batch format). Returns (categorical by name, numeric (F,))."""
        unknown = sorted(set(features) - set(self.categorical) - set(self.numeric))
        if unknown:
            raise FeatureError(
                f"unknown user feature(s) {unknown}; "
                f"this release knows categorical {list(self.categorical)} and numeric {list(self.numeric)}"
            )
        categorical = {}
        for name in self.categorical:
            value = features.get(name, "")
            if not isinstance(value, str):
                raise FeatureError(f"user feature {name!r} is categorical and needs a string, got {value!r}")
            categorical[name] = value
        numeric = np.zeros(len(self.numeric), dtype=np.float32)
        for j, name in enumerate(self.numeric):
            value = features.get(name, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FeatureError(f"user feature {name!r} is numeric and needs a finite number, got {value!r}")
            numeric[j] = value
        return categorical, numeric

    @torch.inference_mode()
    def vectors(self, id_vectors: np.ndarray, categorical: Mapping[str, list[str]], numeric: np.ndarray) -> np.ndarray:
        """(B, id_dim) ID rows, B values per categorical feature, (B, F) numeric
        -> (B, output_dim) float32 unit vectors."""
        batch = len(id_vectors)
        rows = np.zeros((batch, len(self.categorical)), dtype=np.int64)
        for j, name in enumerate(self.categorical):
            rows[:, j] = self.values[name].lookup(categorical[name])  # unknown values read row 0
        inputs = TowerInputs(
            torch.zeros(batch, dtype=torch.long), torch.from_numpy(rows), torch.from_numpy(np.asarray(numeric, np.float32))
        )
        # np.array copies: serving's ID table is read-only and torch wants writable memory
        vectors = self.tower.from_id_vectors(torch.from_numpy(np.array(id_vectors, dtype=np.float32)), inputs)  # (B, D)
        return vectors.numpy()
