"""The three-tower pre-ranker (COLD, Wang et al. 2020).

Pre-ranking scores the thousands of candidates retrieval returns and keeps
a few hundred for the ranker. Its model:

- **user tower**: user ID embedding + user categorical and numeric
  features -> MLP -> unit vector ``u`` (B, tower_dim); once per request,
  so it may be wide;
- **item tower**: item ID embedding + item categorical features -> MLP ->
  unit vector ``i`` (n, tower_dim); its outputs are cached at serving, so
  it runs only on a cache miss;
- **cross tower**: the statistics features of each (user, candidate) pair
  (``freshtower.core.statistics.FEATURE_NAMES``, encoded by
  ``encode_statistics``) -> MLP -> ``c`` (n, cross_dim); statistics move
  all the time, so nothing is cached: n inferences;
- **upper layers**: MLP over ``[u, i, c]`` -> one logit per candidate;
  n inferences, most of the cost.

Both towers are ``trainer/model.py``'s ``Tower`` and the model inherits the
two-tower model's feature machinery (vocabularies, catalogue, table growth,
``user_inputs``/``item_inputs``, ``export_state``/``import_state``), so the
trainers that grow tables and update user ID rows online work with it
unchanged. Sizes come from ``PrerankConfig``.

Serving rearranges the same function (``CandidateScorer``): the upper
layers' first layer is linear in ``[u, i, c]``, ``W [u; i; c] + b =
W_u u + W_i i + W_c c + b``, so ``W_u u + b`` is computed once per request,
``W_i i`` is what the item cache holds per item (``item_cache_rows``: the
item tower's output carried through that fixed linear map), and the cross
tower's last linear layer ``c = A h + a`` folds into ``W_c`` (``(W_c A) h +
W_c a``): per candidate there remain the cross tower's hidden layers, one
(h -> first upper width) matmul and the upper layers after the first.
Exact up to float rounding (a test compares it with ``forward``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from freshtower.trainer.model import Tower, TowerInputs, TwoTowerModel
from torch import nn

from freshtower.core.statistics import FEATURE_NAMES


def _mlp(input_width: int, hidden_dims: Sequence[int], output_width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = input_width
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, output_width))
    return nn.Sequential(*layers)


def _linears(mlp: nn.Sequential) -> list[nn.Linear]:
    return [layer for layer in mlp if isinstance(layer, nn.Linear)]


class ThreeTowerPreranker(TwoTowerModel):
    """User, item and cross towers and upper layers -> one logit per
    (user, candidate) pair.

    ``model_config`` (``ModelConfig``) names the user and item features,
    ``prerank_config`` (``PrerankConfig``) gives the shapes,
    ``vocabulary_config`` the ID tables' frequency filter and expiry.

    >>> from freshtower.core.settings import ModelConfig, PrerankConfig, VocabularyConfig
    >>> model = ThreeTowerPreranker(ModelConfig(), PrerankConfig(), VocabularyConfig())
    >>> users = model.user_inputs(["u1"], {}, np.zeros((1, 3)))
    >>> items = model.item_inputs(["i1", "i2"], {})
    >>> model(users, items, torch.zeros(2, 13), request_of=torch.tensor([0, 0])).shape
    torch.Size([2])
    """

    def __init__(self, model_config, prerank_config, vocabulary_config):
        if prerank_config.category_feature not in model_config.item_categorical:
            raise ValueError(
                f"prerank.category_feature {prerank_config.category_feature!r} is not an item categorical feature "
                f"(model.item_categorical = {list(model_config.item_categorical)})"
            )
        p = prerank_config
        tower_config = model_config.model_copy(
            update={
                "id_dim": p.id_dim,
                "categorical_dim": p.categorical_dim,
                "hidden_dims": tuple(p.user_hidden_dims),
                "output_dim": p.tower_dim,
            }
        )
        super().__init__(tower_config, vocabulary_config)  # the user tower, vocabularies and catalogue
        self.prerank_config = p
        self.item_tower = Tower(p.id_dim, len(self.item_categorical), p.categorical_dim, 0, p.item_hidden_dims, p.tower_dim)
        self.statistics_width = len(FEATURE_NAMES)
        self.cross_tower = _mlp(self.statistics_width, p.cross_hidden_dims, p.cross_dim)
        self.upper = _mlp(2 * p.tower_dim + p.cross_dim, p.upper_hidden_dims, 1)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every weight outside the embedding tables (the dense optimiser's
        share): both towers' MLPs, the cross tower and the upper layers."""
        modules = (self.user_tower.mlp, self.item_tower.mlp, self.cross_tower, self.upper)
        return [p for module in modules for p in module.parameters()]

    # --- training ------------------------------------------------------------

    def forward(
        self,
        user_inputs: TowerInputs,
        item_inputs: TowerInputs,
        statistics: torch.Tensor,
        request_of: torch.Tensor | None = None,
        sparse: bool = False,
    ) -> torch.Tensor:
        """(N,) logits of N (user, candidate) pairs.

        ``user_inputs`` holds R users (one per request), ``request_of`` (N,)
        the request of each candidate (None: R == N, row by row); ``item_inputs``
        the N candidates; ``statistics`` (N, 13) their encoded statistics.
        """
        user = self.user_tower(user_inputs, sparse)  # (R, D)
        if request_of is not None:
            user = user[request_of]  # (N, D)
        item = self.item_tower(item_inputs, sparse)  # (N, D)
        cross = self.cross_tower(statistics)  # (N, cross_dim)
        return self.upper(torch.cat([user, item, cross], dim=1)).squeeze(1)  # (N,)

    # --- serving -------------------------------------------------------------

    def _first_upper_blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        first = self.upper[0]
        d = self.prerank_config.tower_dim
        weight = first.weight.detach()  # (H1, 2D + cross_dim)
        return weight[:, :d], weight[:, d : 2 * d], weight[:, 2 * d :], first.bias.detach()

    @torch.no_grad()
    def item_outputs(self, item_inputs: TowerInputs, chunk: int = 65536) -> torch.Tensor:
        """(n, D) the item tower's outputs ``i``, computed in chunks of ``chunk`` items."""
        parts = []
        for start in range(0, len(item_inputs), chunk):
            index = torch.arange(start, min(start + chunk, len(item_inputs)))
            parts.append(self.item_tower(item_inputs.select(index)))  # (c, D)
        if not parts:
            return torch.zeros((0, self.prerank_config.tower_dim))
        return torch.cat(parts)

    @torch.no_grad()
    def project_item_outputs(self, item_outputs: torch.Tensor) -> torch.Tensor:
        """(n, D) item tower outputs -> (n, H1) cache rows ``W_i i`` (H1 = first
        upper width): for a cache that keeps the raw outputs instead."""
        _, item_block, _, _ = self._first_upper_blocks()
        return item_outputs @ item_block.T

    @torch.no_grad()
    def item_cache_rows(self, item_inputs: TowerInputs, chunk: int = 65536) -> torch.Tensor:
        """(n, H1) what the item cache holds per item: the item tower's output
        ``i`` times the upper layers' item block ``W_i``."""
        return self.project_item_outputs(self.item_outputs(item_inputs, chunk))

    @torch.no_grad()
    def catalogue_item_rows(self, chunk: int = 65536) -> torch.Tensor:
        """(N, H1) item cache rows of the whole catalogue, in catalogue order."""
        return self.item_cache_rows(self.catalogue_inputs(np.arange(len(self.catalogue))), chunk)

    @torch.no_grad()
    def cold_item_row(self) -> torch.Tensor:
        """(H1,) the cache row of an unknown item: default ID and feature rows."""
        categorical = len(self.item_categorical)
        inputs = TowerInputs(torch.zeros(1, dtype=torch.long), torch.zeros((1, categorical), dtype=torch.long), torch.zeros((1, 0)))
        return self.item_cache_rows(inputs)[0]

    def candidate_scorer(self, max_candidates: int) -> "CandidateScorer":
        """The serving form of the current weights of the cross tower and the
        upper layers (copies: later training does not touch them)."""
        return CandidateScorer(self, max_candidates)


class CandidateScorer:
    """One user's candidates scored from cached item rows and statistics
    features, with preallocated buffers for up to ``max_candidates``.

    The user tower is not part of it: serving computes the user vector with
    its own (published) ID rows and passes it in. Not thread-safe (the
    buffers are shared); a service keeps one per worker. Every method runs
    without autograd.
    """

    def __init__(self, model: ThreeTowerPreranker, max_candidates: int):
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        self.max_candidates = int(max_candidates)
        with torch.no_grad():
            user_block, _, cross_block, first_bias = model._first_upper_blocks()
            self._user_block_t = user_block.T.contiguous().clone()  # (D, H1)
            cross = _linears(model.cross_tower)
            self._cross_hidden = [(layer.weight.detach().T.contiguous().clone(), layer.bias.detach().clone()) for layer in cross[:-1]]
            last = cross[-1]
            # (W_c A) h + W_c a: the cross tower's last layer folded into the upper block
            self._cross_to_upper_t = (cross_block @ last.weight.detach()).T.contiguous()  # (h, H1)
            self._first_bias = first_bias.clone() + cross_block @ last.bias.detach()  # (H1,)
            self._upper_rest = [
                (layer.weight.detach().T.contiguous().clone(), layer.bias.detach().clone()) for layer in _linears(model.upper)[1:]
            ]
        self.width = self._user_block_t.shape[1]  # H1
        self.statistics_width = model.statistics_width
        n = self.max_candidates
        self._item_buffer = torch.empty((n, self.width))
        self._cross_buffers = [torch.empty((n, w.shape[1])) for w, _ in self._cross_hidden]
        self._upper_buffers = [torch.empty((n, w.shape[1])) for w, _ in self._upper_rest]

    def _check(self, n: int) -> None:
        if n > self.max_candidates:
            raise ValueError(f"{n} candidates exceed this scorer's maximum of {self.max_candidates}")

    @torch.no_grad()
    def user_row(self, user_vector: torch.Tensor) -> torch.Tensor:
        """(H1,) ``W_u u`` plus every per-request constant of the first upper layer."""
        return torch.addmv(self._first_bias, self._user_block_t.T, user_vector)

    def item_rows_buffer(self, n: int) -> torch.Tensor:
        """(n, H1) the buffer the item cache gathers into; ``upper`` works in place on it."""
        self._check(n)
        return self._item_buffer[:n]

    @torch.no_grad()
    def cross(self, statistics: torch.Tensor) -> torch.Tensor:
        """(n, 13) encoded statistics -> (n, h) the cross tower's last hidden layer
        (the statistics themselves when the cross tower has no hidden layer)."""
        n = statistics.shape[0]
        self._check(n)
        hidden = statistics
        for (weight_t, bias), buffer in zip(self._cross_hidden, self._cross_buffers):
            hidden = torch.addmm(bias, hidden, weight_t, out=buffer[:n]).relu_()
        return hidden

    @torch.no_grad()
    def upper(self, user_row: torch.Tensor, item_rows: torch.Tensor, cross_hidden: torch.Tensor) -> torch.Tensor:
        """(n,) logits. ``item_rows`` (n, H1) is overwritten (the first hidden layer)."""
        hidden = item_rows.add_(user_row).addmm_(cross_hidden, self._cross_to_upper_t).relu_()  # (n, H1)
        n = hidden.shape[0]
        for k, ((weight_t, bias), buffer) in enumerate(zip(self._upper_rest, self._upper_buffers)):
            hidden = torch.addmm(bias, hidden, weight_t, out=buffer[:n])
            if k < len(self._upper_rest) - 1:
                hidden.relu_()
        return hidden[:, 0]

    def score(self, user_vector: torch.Tensor, item_rows: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        """(n,) logits of n candidates of one user, from the user tower's
        output (D,) (a copy; ``item_rows`` is left alone)."""
        n = item_rows.shape[0]
        buffer = self.item_rows_buffer(n)
        buffer.copy_(item_rows)
        user_row = self.user_row(user_vector)
        return self.upper(user_row, buffer, self.cross(statistics)).clone()
