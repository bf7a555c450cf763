"""The user tower as serving runs it.

A full release carries the user tower without its ID table
(``user_tower.pt``: MLP weights, categorical-feature tables and their
vocabularies, feature names); the ID embeddings travel separately as
release rows, so that embeddings releases can replace them. At request
time serving gathers the user's latest published ID row and runs the tower
on it and the request's features.

The forward pass is the trainer's ``Tower.from_id_vectors`` (concatenate the
ID row, one row of each categorical table and the numeric features; Linear
and ReLU layers; L2-normalise), done in numpy on weights copied out of the
module once at load: for one request that is a few matrix-vector products,
~13 us, where the same pass through torch costs ~0.2 ms (dispatcher and
autograd bookkeeping). The torch module stays (``ServingUserTower.tower``)
as the exact oracle: tests check both paths against the trainer's
``Tower.from_id_vectors``, to float32 rounding (1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from freshtower.trainer.model import Tower, TwoTowerModel
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
        self.tower = tower  # the trainer's module: the oracle the numpy forward pass is checked against
        self.categorical_dim = int(state["categorical_dim"])
        self.input_dim = self.id_dim + len(self.categorical) * self.categorical_dim + len(self.numeric)
        # float32 copies, read-only: weights (in, out) so that x @ W is Linear(x); tables (V, categorical_dim)
        self._layers = [
            (_frozen(layer.weight.detach().numpy().T), _frozen(layer.bias.detach().numpy()))
            for layer in tower.mlp
            if isinstance(layer, torch.nn.Linear)
        ]
        self._tables = [_frozen(table.detach().numpy()) for table in tower.categorical_embeddings]
        self._row_of = [self.values[name].row_of for name in self.categorical]  # value -> table row, unknown -> 0
        self._known = frozenset(self.categorical) | frozenset(self.numeric)

    @classmethod
    def load(cls, path: Path) -> ServingUserTower:
        try:
            state = torch.load(path, weights_only=True)
        except Exception as error:
            raise ValueError(f"{path}: cannot load the user tower: {error}") from error
        return cls(state, where=str(path))

    def _unknown_features(self, features: Mapping[str, object]) -> FeatureError:
        unknown = sorted(set(features) - self._known)
        shown = ", ".join(repr(name[:64]) for name in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        return FeatureError(
            f"unknown user feature(s) [{shown}]; this release knows categorical {list(self.categorical)} and numeric {list(self.numeric)}"
        )

    def parse_features(self, features: Mapping[str, object]) -> tuple[dict[str, str], np.ndarray]:
        """Check one request's features: categorical ones must be strings,
        numeric ones finite numbers; absent ones read as unknown / 0 (as in
        the batch format). Returns (categorical by name, numeric (F,))."""
        if not self._known.issuperset(features):
            raise self._unknown_features(features)
        categorical = {name: _categorical(name, features.get(name, "")) for name in self.categorical}
        numeric = np.array([_numeric(name, features.get(name, 0.0)) for name in self.numeric], dtype=np.float32)  # (F,)
        return categorical, numeric

    def vector(self, id_row: np.ndarray, features: Mapping[str, object]) -> np.ndarray:
        """One request: its (id_dim,) ID row and raw features -> the (output_dim,)
        float32 unit vector. Raises ``FeatureError`` for features that do not fit."""
        if not self._known.issuperset(features):
            raise self._unknown_features(features)
        x = np.empty(self.input_dim, dtype=np.float32)  # (input width,): [ID row | categorical rows | numeric]
        x[: self.id_dim] = id_row
        at, width = self.id_dim, self.categorical_dim
        for name, row_of, table in zip(self.categorical, self._row_of, self._tables):
            x[at : at + width] = table[row_of(_categorical(name, features.get(name, "")))]
            at += width
        for name in self.numeric:
            x[at] = _numeric(name, features.get(name, 0.0))
            at += 1
        return _unit(self._mlp(x))

    def vectors(self, id_vectors: np.ndarray, categorical: Mapping[str, list[str]], numeric: np.ndarray) -> np.ndarray:
        """(B, id_dim) ID rows, B values per categorical feature, (B, F) numeric
        -> (B, output_dim) float32 unit vectors."""
        batch = len(id_vectors)
        x = np.empty((batch, self.input_dim), dtype=np.float32)  # (B, input width)
        x[:, : self.id_dim] = id_vectors
        at, width = self.id_dim, self.categorical_dim
        for name, table in zip(self.categorical, self._tables):
            x[:, at : at + width] = table[self.values[name].lookup(categorical[name])]  # unknown values read row 0
            at += width
        x[:, at:] = np.asarray(numeric, dtype=np.float32).reshape(batch, len(self.numeric))
        out = self._mlp(x)  # (B, D)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), _NORM_EPS)

    def _mlp(self, x: np.ndarray) -> np.ndarray:
        """Linear, ReLU, ..., Linear on (..., input width) float32."""
        *hidden, (weight, bias) = self._layers
        for w, b in hidden:
            x = x @ w
            x += b
            np.maximum(x, 0, out=x)
        x = x @ weight
        x += bias
        return x


_NORM_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.sqrt(vector @ vector))
    vector /= max(norm, _NORM_EPS)
    return vector


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array, dtype=np.float32)  # a copy: the module's memory is its own
    array.setflags(write=False)
    return array


def _categorical(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise FeatureError(f"user feature {name!r} is categorical and needs a string, got {_shown(value)}")
    return value


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _numeric(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FeatureError(f"user feature {name!r} is numeric and needs a finite number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
        raise FeatureError(f"user feature {name!r} is numeric and needs a finite number within float32 range, got {_shown(value)}")
    return number


def _shown(value: object, limit: int = 80) -> str:
    """repr of a request value, cut short (values come from clients)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return f"an int of {value.bit_length()} bits"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
