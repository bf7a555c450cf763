"""Retrieval losses, built from small named pieces (as TFRS builds its
retrieval task from RemoveAccidentalHits and SamplingProbablityCorrection).

All inputs are cosines or unit vectors; none of these functions sees a
shown-but-not-clicked record (the trainers only pass clicked positives and
sampled or ranking-dropped negatives). ``mask`` arguments mark which
negative slots are real (True) so rows with fewer negatives still count
their own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_MASKED = -1e9  # a logit that softmax turns into 0 without producing NaN


def cosine_logits(user_vectors: torch.Tensor, item_vectors: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, D) x (N, D) unit vectors -> (B, N) logits ``cos / temperature``."""
    return user_vectors @ item_vectors.T / temperature


def sampling_probability_correction(logits: torch.Tensor, item_probabilities: torch.Tensor) -> torch.Tensor:
    """logQ correction: ``logits - log(clip(p, 1e-6, 1))`` per candidate column.

    Popular items appear more often as in-batch negatives; subtracting their
    log sampling probability removes that bias. Training only: serving uses
    the plain cosine.
    """
    return logits - torch.log(item_probabilities.clamp(1e-6, 1.0)).unsqueeze(0)


def remove_accidental_hits(
    logits: torch.Tensor,
    positive_keys: torch.Tensor,
    candidate_keys: torch.Tensor,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask candidates that are the row's own positive item, except the
    row's target column (by default column i for row i: in-batch softmax).

    (B, N) logits, (B,) positive item keys, (N,) candidate item keys.
    """
    same = positive_keys.unsqueeze(1) == candidate_keys.unsqueeze(0)  # (B, N)
    if targets is None:
        same.fill_diagonal_(False)
    else:
        same[torch.arange(len(targets)), targets] = False
    return logits.masked_fill(same, _MASKED)


def in_batch_softmax_loss(
    user_vectors: torch.Tensor,
    item_vectors: torch.Tensor,
    temperature: float,
    item_probabilities: torch.Tensor | None = None,
    item_keys: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    positive_keys: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Listwise loss with in-batch negatives: row i's positive is item i, the
    other items of the batch are its negatives.

    (B, D) users, (N, D) candidate items (N = B: the rows' clicked items);
    ``item_probabilities`` (N,) turns on the logQ correction; ``item_keys``
    (N,) removes accidental hits. Data-parallel training passes the items of
    every worker's batch: ``targets`` (B,) then gives each row's own column,
    ``positive_keys`` (B,) its item key and ``candidate_mask`` (N,) the real
    (not padding) columns.
    """
    b, n = user_vectors.shape[0], item_vectors.shape[0]
    column_bias = None  # (N,) added to every row's logits
    if item_probabilities is not None:
        column_bias = -torch.log(item_probabilities.clamp(1e-6, 1.0))  # the logQ correction
    if candidate_mask is not None:
        padding = torch.where(candidate_mask, 0.0, _MASKED).to(user_vectors.dtype)
        column_bias = padding if column_bias is None else column_bias + padding
    excluded = None  # accidental hits: (rows, columns) to mask, or a (B, N) mask
    if item_keys is not None:
        if targets is None and positive_keys is None:
            excluded = _repeated_key_pairs(item_keys)  # in-batch: usually a few pairs, not a B x B compare
        elif targets is not None or len(torch.unique(item_keys)) < len(item_keys):
            row_keys = item_keys if positive_keys is None else positive_keys
            excluded = row_keys.unsqueeze(1) == item_keys.unsqueeze(0)
            if targets is None:
                excluded.fill_diagonal_(False)
            else:
                excluded[torch.arange(b), targets] = False
    if targets is None:
        targets = torch.arange(b, device=user_vectors.device)
    if n == 0:
        raise ValueError("in-batch softmax needs at least one candidate")
    return _InBatchSoftmaxCrossEntropy.apply(user_vectors, item_vectors, 1.0 / temperature, column_bias, excluded, targets)


def _repeated_key_pairs(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row, column) pairs i != j with ``keys[i] == keys[j]``: the accidental
    hits of an in-batch softmax, found by sorting (O(B log B)) instead of a
    B x B comparison. None when no key repeats.

    >>> rows, columns = _repeated_key_pairs(torch.tensor([7, 3, 7]))
    >>> sorted(zip(rows.tolist(), columns.tolist()))
    [(0, 2), (2, 0)]
    """
    values = keys.numpy()
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first position of each key
    sizes = np.diff(np.r_[starts, len(values)])
    repeated = sizes > 1
    if not repeated.any():
        return None
    starts, sizes = starts[repeated], sizes[repeated]
    # every ordered pair within each group of equal keys, diagonal dropped
    member_start = np.repeat(starts, sizes)  # per member: its group's first position
    member_size = np.repeat(sizes, sizes)
    members = member_start + np.arange(len(member_start)) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # sorted positions
    row_positions = np.repeat(members, member_size)
    pair_offsets = np.arange(len(row_positions)) - np.repeat(np.cumsum(member_size) - member_size, member_size)
    column_positions = np.repeat(member_start, member_size) + pair_offsets
    keep = row_positions != column_positions
    rows, columns = order[row_positions[keep]], order[column_positions[keep]]
    return torch.from_numpy(rows), torch.from_numpy(columns)


class _InBatchSoftmaxCrossEntropy(torch.autograd.Function):
    """``cross_entropy(users @ items.T / t + bias, masked, targets)`` in one
    (B, N) buffer: the composition of matmul, logQ, masking and
    ``F.cross_entropy`` allocates and walks a B x N tensor a dozen times
    forward and back, which made it 2/3 of an online step. Here the logits
    become the softmax in place and the backward is ``(P - onehot) @ V``.
    Exact, not approximate: tests check values and gradients against the
    plain composition."""

    @staticmethod
    def forward(ctx, users, items, inverse_temperature, column_bias, excluded, targets):
        if column_bias is None:
            logits = torch.mm(users, items.T).mul_(inverse_temperature)  # (B, N)
        else:
            logits = torch.addmm(column_bias.unsqueeze(0), users, items.T, alpha=inverse_temperature)
        if isinstance(excluded, tuple):
            logits[excluded] = _MASKED
        elif excluded is not None:
            logits.masked_fill_(excluded, _MASKED)
        target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)  # (B,)
        row_max = logits.amax(dim=1, keepdim=True)  # (B, 1)
        probabilities = logits.sub_(row_max).exp_()  # unnormalised softmax, in place
        sums = probabilities.sum(dim=1, keepdim=True)  # (B, 1)
        probabilities.div_(sums)
        log_normaliser = row_max.squeeze(1) + torch.log(sums.squeeze(1))  # logsumexp, (B,)
        loss = (log_normaliser - target_logits).mean()
        ctx.save_for_backward(users, items, probabilities, targets)
        ctx.inverse_temperature = inverse_temperature
        ctx.consumed = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("in_batch_softmax_loss: backward twice (retain_graph) is not supported")
        ctx.consumed = True
        users, items, grad_logits, targets = ctx.saved_tensors
        b = grad_logits.shape[0]
        grad_logits[torch.arange(b), targets] -= 1.0  # softmax - onehot, in place
        grad_logits.mul_(grad_loss * (ctx.inverse_temperature / b))  # d loss / d (u . v)
        grad_users = grad_logits @ items if ctx.needs_input_grad[0] else None
        grad_items = grad_logits.T @ users if ctx.needs_input_grad[1] else None
        return grad_users, grad_items, None, None, None, None


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def sampled_softmax_loss(
    positive_cosines: torch.Tensor,
    negative_cosines: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Listwise loss with explicit negatives: softmax over one positive and n
    negatives, cross-entropy on the positive.

    (B,) positive cosines, (B, n) negative cosines, (B, n) mask.
    """
    negative_logits = negative_cosines / temperature
    if mask is not None:
        negative_logits = negative_logits.masked_fill(~mask, _MASKED)
    logits = torch.cat([(positive_cosines / temperature).unsqueeze(1), negative_logits], dim=1)  # (B, 1 + n)
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def pointwise_loss(
    positive_cosines: torch.Tensor,
    negative_cosines: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy with logit ``cos / temperature``: pushes positive
    cosines towards +1 and negative ones towards -1. The positive:negative
    ratio is 1:n (n columns of ``negative_cosines``); each sample weighs one.

    (B,) positive cosines, (B, n) negative cosines, (B, n) mask.
    """
    positive = F.softplus(-positive_cosines / temperature)  # -log sigmoid(x), (B,)
    negative = F.softplus(negative_cosines / temperature)  # -log(1 - sigmoid(x)), (B, n)
    count = positive.numel() + (negative.numel() if mask is None else mask.sum())
    negative_sum = negative.sum() if mask is None else (negative * mask).sum()
    return (positive.sum() + negative_sum) / count


def triplet_hinge_loss(
    positive_cosines: torch.Tensor,
    negative_cosines: torch.Tensor,
    margin: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``max(0, cos(a, b-) + m - cos(a, b+))`` averaged over (positive, negative) pairs."""
    return _masked_mean(F.relu(negative_cosines + margin - positive_cosines.unsqueeze(1)), mask)


def triplet_logistic_loss(
    positive_cosines: torch.Tensor,
    negative_cosines: torch.Tensor,
    sigma: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log(1 + exp(sigma * (cos(a, b-) - cos(a, b+))))`` averaged over pairs."""
    return _masked_mean(F.softplus(sigma * (negative_cosines - positive_cosines.unsqueeze(1))), mask)


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Stop on a NaN or infinite loss, saying where it happened."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(f"loss is {value} at {where}; nothing was written")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the step's output is discarded."""
