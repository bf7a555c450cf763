"""The two-tower retrieval model.

User tower: user ID embedding + user categorical embeddings + user
continuous features -> MLP -> L2-normalised vector ``a``. The item tower is
built the same way from the item ID and item categorical features into
``b``. The score is ``cos(a, b)`` (both are unit vectors, so a dot product);
the losses divide it by a temperature. The towers never see each other's
features (late fusion), so item vectors can be precomputed and indexed.

Every embedding table is indexed by an ``IdVocabulary`` (collisionless,
growing), and grows with it: ``sync_tables`` gives each table as many rows
as its vocabulary and initialises new rows from the default row 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from freshtower.trainer.catalogue import ItemCatalogue
from freshtower.trainer.sparse_optim import grow_table, reset_rows
from freshtower.trainer.vocabulary import IdVocabulary
from torch import nn

_INIT_STD = 0.1  # initial embedding scale; the MLP's first layer sees O(1) inputs


@dataclass
class TowerInputs:
    """What one tower reads for B entities (users or items)."""

    id_rows: torch.Tensor  # (B,) int64 rows of the ID table
    categorical_rows: torch.Tensor  # (B, C) int64 rows of each categorical table
    numeric: torch.Tensor  # (B, F) float32 continuous features

    def __len__(self) -> int:
        return self.id_rows.shape[0]

    def select(self, index: torch.Tensor) -> "TowerInputs":
        return TowerInputs(self.id_rows[index], self.categorical_rows[index], self.numeric[index])


class Tower(nn.Module):
    """ID embedding + categorical embeddings + numeric -> MLP -> unit vector."""

    def __init__(
        self,
        id_dim: int,
        categorical_count: int,
        categorical_dim: int,
        numeric_count: int,
        hidden_dims: Sequence[int],
        output_dim: int,
    ):
        super().__init__()
        self.id_embedding = nn.Parameter(torch.randn(1, id_dim) * _INIT_STD)
        self.categorical_embeddings = nn.ParameterList(
            [nn.Parameter(torch.randn(1, categorical_dim) * _INIT_STD) for _ in range(categorical_count)]
        )
        self.numeric_count = numeric_count
        layers: list[nn.Module] = []
        width = id_dim + categorical_count * categorical_dim + numeric_count
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, output_dim))
        self.mlp = nn.Sequential(*layers)

    def tables(self) -> list[nn.Parameter]:
        """The embedding tables, ID table first."""
        return [self.id_embedding, *self.categorical_embeddings]

    def dense_parameters(self) -> list[nn.Parameter]:
        return list(self.mlp.parameters())

    def forward(self, inputs: TowerInputs, sparse: bool = False) -> torch.Tensor:
        """(B,) inputs -> (B, output_dim) unit vectors.

        ``sparse`` makes the tables' gradients sparse (only used rows)."""
        return self.from_id_vectors(F.embedding(inputs.id_rows, self.id_embedding, sparse=sparse), inputs, sparse)

    def from_id_vectors(self, id_vectors: torch.Tensor, inputs: TowerInputs, sparse: bool = False) -> torch.Tensor:
        """Forward pass with the ID embeddings already gathered (B, id_dim)."""
        parts = [id_vectors]
        for j, table in enumerate(self.categorical_embeddings):
            parts.append(F.embedding(inputs.categorical_rows[:, j], table, sparse=sparse))  # (B, categorical_dim)
        if self.numeric_count:
            parts.append(inputs.numeric)
        hidden = torch.cat(parts, dim=1)  # (B, input width)
        return F.normalize(self.mlp(hidden), dim=1)  # (B, output_dim)


class TwoTowerModel(nn.Module):
    """Both towers, their vocabularies and the item catalogue.

    ``config`` is the ``ModelConfig``; ``vocabulary_config`` the
    ``VocabularyConfig`` (frequency filter and expiry per table).
    """

    def __init__(self, config, vocabulary_config):
        super().__init__()
        self.config = config
        self.user_categorical = tuple(config.user_categorical)
        self.user_numeric = tuple(config.user_numeric)
        self.item_categorical = tuple(config.item_categorical)
        self.user_tower = Tower(
            config.id_dim, len(self.user_categorical), config.categorical_dim, len(self.user_numeric), config.hidden_dims, config.output_dim
        )
        self.item_tower = Tower(config.id_dim, len(self.item_categorical), config.categorical_dim, 0, config.hidden_dims, config.output_dim)
        expiry = vocabulary_config.expiry_days
        self.user_ids = IdVocabulary(vocabulary_config.user_min_count, expiry)
        self.item_ids = IdVocabulary(vocabulary_config.item_min_count, expiry)
        # Categorical values are few and long-lived: admitted at once, never expired.
        self.user_values = {name: IdVocabulary(1, None) for name in self.user_categorical}
        self.item_values = {name: IdVocabulary(1, None) for name in self.item_categorical}
        self.catalogue = ItemCatalogue(self.item_categorical)

    @property
    def temperature(self) -> float:
        return self.config.temperature

    # --- vocabularies and tables -------------------------------------------

    def table_vocabularies(self) -> list[tuple[nn.Parameter, IdVocabulary]]:
        pairs = [(self.user_tower.id_embedding, self.user_ids), (self.item_tower.id_embedding, self.item_ids)]
        pairs += [(t, self.user_values[n]) for t, n in zip(self.user_tower.categorical_embeddings, self.user_categorical)]
        pairs += [(t, self.item_values[n]) for t, n in zip(self.item_tower.categorical_embeddings, self.item_categorical)]
        return pairs

    def sync_tables(self, new_rows: Mapping[int, np.ndarray] | None = None, optimizers=(), row_noise_std: float = 0.0) -> None:
        """Grow every table to its vocabulary's size; reset ``new_rows``
        (``id(table) -> rows``) to the default row (plus ``row_noise_std``
        noise, see ``reset_rows``) with fresh optimiser state."""
        for table, vocab in self.table_vocabularies():
            grow_table(table, len(vocab), optimizers)
            rows = (new_rows or {}).get(id(table))
            if rows is not None and len(rows):
                reset_rows(table, torch.as_tensor(rows, dtype=torch.long), optimizers, row_noise_std)

    def observe_users(
        self,
        user_ids: Sequence[str],
        categorical: Mapping[str, Sequence[str]],
        day: int,
        fingerprints: np.ndarray | None = None,
        categorical_fingerprints: Mapping[str, np.ndarray] | None = None,
    ) -> dict[int, np.ndarray]:
        """Count sightings of users and their feature values; new rows by table."""
        new = {id(self.user_tower.id_embedding): self.user_ids.observe(user_ids, day, fingerprints)}
        for table, name in zip(self.user_tower.categorical_embeddings, self.user_categorical):
            value_fingerprints = (categorical_fingerprints or {}).get(name)
            new[id(table)] = self.user_values[name].observe(categorical[name], day, value_fingerprints)
        return new

    def observe_items(
        self, item_ids: Sequence[str], categorical: Mapping[str, Sequence[str]], day: int, fingerprints: np.ndarray | None = None
    ) -> dict[int, np.ndarray]:
        new = {id(self.item_tower.id_embedding): self.item_ids.observe(item_ids, day, fingerprints)}
        for table, name in zip(self.item_tower.categorical_embeddings, self.item_categorical):
            new[id(table)] = self.item_values[name].observe(categorical[name], day)
        return new

    # --- inputs --------------------------------------------------------------

    def user_inputs(
        self,
        user_ids: Sequence[str],
        categorical: Mapping[str, Sequence[str]],
        numeric: np.ndarray | torch.Tensor,
        fingerprints: np.ndarray | None = None,
        categorical_fingerprints: Mapping[str, np.ndarray] | None = None,
    ) -> TowerInputs:
        """Raw user fields -> rows; unknown IDs and values read row 0.
        ``fingerprints`` of the user IDs (and ``categorical_fingerprints`` of
        the feature values, by name) save recomputing them."""
        n = len(user_ids)
        categorical_rows = np.zeros((n, len(self.user_categorical)), dtype=np.int64)
        for j, name in enumerate(self.user_categorical):
            if name in categorical:
                value_fingerprints = (categorical_fingerprints or {}).get(name)
                categorical_rows[:, j] = self.user_values[name].lookup(categorical[name], value_fingerprints)
        return TowerInputs(
            torch.from_numpy(self.user_ids.lookup(user_ids, fingerprints)),
            torch.from_numpy(categorical_rows),
            torch.as_tensor(numeric, dtype=torch.float32).reshape(n, len(self.user_numeric)),
        )

    def item_inputs(self, item_ids: Sequence[str], categorical: Mapping[str, Sequence[str]]) -> TowerInputs:
        n = len(item_ids)
        categorical_rows = np.zeros((n, len(self.item_categorical)), dtype=np.int64)
        for j, name in enumerate(self.item_categorical):
            if name in categorical:
                categorical_rows[:, j] = self.item_values[name].lookup(categorical[name])
        return TowerInputs(
            torch.from_numpy(self.item_ids.lookup(item_ids)),
            torch.from_numpy(categorical_rows),
            torch.zeros((n, 0), dtype=torch.float32),
        )

    def catalogue_inputs(self, indices: np.ndarray | Sequence[int]) -> TowerInputs:
        """Item-tower inputs for catalogue entries."""
        indices = np.asarray(indices, dtype=np.int64)
        ids = [self.catalogue.ids[i] for i in indices.tolist()]
        return self.item_inputs(ids, self.catalogue.categorical_columns(indices))

    # --- vectors -------------------------------------------------------------

    def user_vectors(self, inputs: TowerInputs) -> torch.Tensor:
        """(B, D) unit user vectors ``a``."""
        return self.user_tower(inputs)

    def item_vectors(self, inputs: TowerInputs) -> torch.Tensor:
        """(B, D) unit item vectors ``b``."""
        return self.item_tower(inputs)

    @torch.no_grad()
    def catalogue_vectors(self, chunk: int = 65536) -> torch.Tensor:
        """(N, D) vectors of the whole catalogue, computed in chunks."""
        parts = []
        for start in range(0, len(self.catalogue), chunk):
            indices = np.arange(start, min(start + chunk, len(self.catalogue)))
            parts.append(self.item_tower(self.catalogue_inputs(indices)))
        if not parts:
            return torch.zeros((0, self.config.output_dim))
        return torch.cat(parts)

    # --- persistence ---------------------------------------------------------

    def _table_names(self) -> dict[str, IdVocabulary]:
        tables = {id(t): v for t, v in self.table_vocabularies()}
        return {name: tables[id(p)] for name, p in self.named_parameters() if id(p) in tables}

    def export_state(self) -> dict:
        """Weights (tables trimmed to their vocabularies), vocabularies and
        catalogue as plain tensors, lists and dicts (``weights_only`` loads)."""
        tables = self._table_names()
        trimmed = {}
        for name, param in self.named_parameters():
            rows = len(tables[name]) if name in tables else param.shape[0]
            trimmed[name] = param.detach()[:rows].clone()
        return {
            "weights": trimmed,
            "user_ids": self.user_ids.state_dict(),
            "item_ids": self.item_ids.state_dict(),
            "user_values": {k: v.state_dict() for k, v in self.user_values.items()},
            "item_values": {k: v.state_dict() for k, v in self.item_values.items()},
            "catalogue": self.catalogue.state_dict(),
        }

    def import_state(self, state: dict) -> None:
        """Inverse of ``export_state`` (the architecture must match)."""
        self.user_ids = IdVocabulary.from_state_dict(state["user_ids"])
        self.item_ids = IdVocabulary.from_state_dict(state["item_ids"])
        self.user_values = {k: IdVocabulary.from_state_dict(state["user_values"][k]) for k in self.user_categorical}
        self.item_values = {k: IdVocabulary.from_state_dict(state["item_values"][k]) for k in self.item_categorical}
        self.catalogue = ItemCatalogue.from_state_dict(state["catalogue"])
        weights = state["weights"]
        tables = self._table_names()
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name not in weights:
                    raise KeyError(f"model state has no weights for {name!r}")
                value = weights[name]
                if name in tables:
                    fits = value.shape[1:] == param.shape[1:] and value.shape[0] == len(tables[name])
                else:
                    fits = value.shape == param.shape
                if not fits:
                    raise ValueError(f"{name}: stored shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
                param.data = value.clone()
