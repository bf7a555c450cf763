"""Row-sparse optimisation of embedding tables that grow.

``RowWiseAdagrad`` is the optimiser of DLRM / FBGEMM's embedding tables: one
accumulator per row (the mean of the squared gradient over the row), so its
state is ``rows`` floats instead of ``rows x dim``. PyTorch ships element-wise
Adagrad and ``SparseAdam``, not the row-wise form, hence this short class.
Both accept the sparse gradients of ``F.embedding(..., sparse=True)`` and
touch only the rows a batch used.

Tables grow in place (``Parameter.data`` is swapped for a larger tensor, so
the optimiser keeps its reference); ``grow_table`` pads the optimiser state
to match.
"""

from __future__ import annotations

import torch
from torch import nn


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for (rows, dim) tables with sparse or dense gradients.

    For each row r with gradient g_r (dim,):
    ``s_r += mean(g_r ** 2)``; ``w_r -= lr * g_r / (sqrt(s_r) + eps)``.

    ``gradient_scale`` (a param-group entry, set per step by the caller)
    multiplies the gradient first. The trainers set it to the minibatch's
    sample count, so g_r is the gradient of the summed loss, one row's own
    samples: the sums then mean the same whatever the minibatch size (the
    full trainer's 1,024, an online file's few dozen), and a trainer that
    forks from another's sums continues its steps instead of restarting
    them (with a mean loss, 17x smaller minibatches give 17x larger
    gradients, which swamp the carried sums).
    """

    def __init__(self, params, lr: float = 0.05, eps: float = 1e-8, initial_accumulator: float = 0.0):
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator=initial_accumulator, gradient_scale=1.0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    if grad.sparse_dim() != 1:  # element-sparse: make it row-sparse
                        grad = grad.to_dense().to_sparse(1)
                    grad = grad.coalesce()
                    rows = grad.indices()[0]
                    values = grad.values()
                else:
                    rows = torch.arange(param.shape[0], device=param.device)
                    values = grad
                if values.numel() == 0:
                    continue
                if group["gradient_scale"] != 1.0:
                    values = values * group["gradient_scale"]
                state = self.state[param]
                if "sum" not in state:
                    state["sum"] = torch.full((param.shape[0],), group["initial_accumulator"], dtype=param.dtype, device=param.device)
                accumulator = state["sum"]
                squared = values.pow(2).mean(dim=1)  # (R,)
                accumulator.index_add_(0, rows, squared)
                scale = group["lr"] / (accumulator[rows].sqrt() + group["eps"])  # (R,)
                param.index_add_(0, rows, values * -scale.unsqueeze(1))
        return loss


def grow_table(table: nn.Parameter, rows: int, optimizers=()) -> None:
    """Give ``table`` at least ``rows`` rows, doubling its capacity.

    Added rows copy row 0 (the default embedding), so an ID that gets a row
    starts from the cold-start vector. The optimisers' per-row state is padded
    with zeros. The Parameter object stays the same.
    """
    current = table.shape[0]
    if rows <= current:
        return
    capacity = max(rows, 2 * current)
    with torch.no_grad():
        grown = table.data[:1].expand(capacity, *table.shape[1:]).clone()
        grown[:current] = table.data
    table.data = grown
    for optimizer in optimizers:
        state = optimizer.state.get(table)
        if not state:
            continue
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == current:
                padded = value.new_zeros((capacity, *value.shape[1:]))
                padded[:current] = value
                state[key] = padded


ROW_NOISE_STD = 0.01  # a tenth of the initial embedding scale (trainer.model._INIT_STD)


def reset_rows(table: nn.Parameter, rows: torch.Tensor, optimizers=(), noise_std: float = 0.0) -> None:
    """Set ``rows`` back to the default row, plus ``noise_std`` noise, and
    clear their optimiser state (new IDs, or rows freed by expiry).

    The default row keeps a new ID where the shared row had it (no jump in
    serving). Full training adds ``ROW_NOISE_STD`` noise to break the
    symmetry of rows admitted together: from scratch every row would
    otherwise be an identical copy, every item vector the same, and the user
    tower's gradient pure rounding noise. Online training adds none: its
    item tower is trained already, and its results stay bit-reproducible
    across restarts."""
    if rows.numel() == 0:
        return
    with torch.no_grad():
        table.data[rows] = table.data[0].clone()
        if noise_std:
            table.data[rows] += noise_std * torch.randn(len(rows), table.shape[1], dtype=table.dtype)
    for optimizer in optimizers:
        state = optimizer.state.get(table)
        if not state:
            continue
        for value in state.values():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == table.shape[0]:
                value[rows] = 0
