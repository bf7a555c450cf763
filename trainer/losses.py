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
# Callers floor sampling probabilities at their estimator's resolution
# (``FrequencyEstimator.resolution``); this default only keeps log() finite.
_LOG_GUARD = 1e-30


def cosine_logits(user_vectors: torch.Tensor, item_vectors: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, D) x (N, D) unit vectors -> (B, N) logits ``cos / temperature``."""
    return user_vectors @ item_vectors.T / temperature


def sampling_probability_correction(
    logits: torch.Tensor, item_probabilities: torch.Tensor, probability_floor: float = _LOG_GUARD
) -> torch.Tensor:
    """logQ correction: ``logits - log(clip(p, floor, 1))`` per candidate column.

    Popular items appear more often as in-batch negatives; subtracting their
    log sampling probability removes that bias. ``p`` must be the
    probability with which the item appears among the candidates (after any
    re-sampling of the batch), and ``probability_floor`` the smallest
    probability the caller can tell apart (its estimator's resolution).
    Training only: serving uses the plain cosine.
    """
    return logits - torch.log(item_probabilities.clamp(probability_floor, 1.0)).unsqueeze(0)


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
    row_weights: torch.Tensor | None = None,
    probability_floor: float = _LOG_GUARD,
) -> torch.Tensor:
    """Listwise loss with in-batch negatives: row i's positive is item i, the
    other items of the batch are its negatives.

    (B, D) users, (N, D) candidate items (N = B: the rows' clicked items);
    ``item_probabilities`` (N,) turns on the logQ correction (floored at
    ``probability_floor``); ``item_keys`` (N,) removes accidental hits.
    Data-parallel training passes the items of every worker's batch:
    ``targets`` (B,) then gives each row's own column, ``positive_keys`` (B,)
    its item key and ``candidate_mask`` (N,) the real (not padding) columns.
    ``row_weights`` (B,) weighs each row's cross-entropy: the loss is
    ``mean_i(w_i * loss_i)`` (default: every row weighs 1).

    Columns with equal keys must be copies of one item (same vector, same
    probability). In-batch (no ``targets``), each distinct item becomes one
    column weighted by its count (see ``_distinct_columns``), and the
    gradient of its copies lands on its first copy.
    """
    b, n = user_vectors.shape[0], item_vectors.shape[0]
    if n == 0:
        raise ValueError("in-batch softmax needs at least one candidate")
    column_bias = None  # (N,) added to every row's logits
    if item_probabilities is not None:
        column_bias = -torch.log(item_probabilities.clamp(probability_floor, 1.0))  # the logQ correction
    if item_keys is not None and targets is None and positive_keys is None and candidate_mask is None:
        return _distinct_columns(user_vectors, item_vectors, 1.0 / temperature, column_bias, item_keys, row_weights)
    if candidate_mask is not None:
        padding = torch.where(candidate_mask, 0.0, _MASKED).to(user_vectors.dtype)
        column_bias = padding if column_bias is None else column_bias + padding
    excluded = None  # accidental hits: a (B, N) mask
    if item_keys is not None and (targets is not None or len(torch.unique(item_keys)) < len(item_keys)):
        row_keys = item_keys if positive_keys is None else positive_keys
        excluded = row_keys.unsqueeze(1) == item_keys.unsqueeze(0)
        if targets is None:
            excluded.fill_diagonal_(False)
        else:
            excluded[torch.arange(b), targets] = False
    if targets is None:
        targets = torch.arange(b, device=user_vectors.device)
    return _InBatchSoftmaxCrossEntropy.apply(
        user_vectors, item_vectors, 1.0 / temperature, column_bias, excluded, None, targets, row_weights
    )


def _distinct_columns(
    user_vectors: torch.Tensor,
    item_vectors: torch.Tensor,
    inverse_temperature: float,
    column_bias: torch.Tensor | None,
    item_keys: torch.Tensor,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The in-batch softmax with accidental hits removed, over distinct items.

    Row i's softmax counts its own item once (the other copies are
    accidental hits) and every other item k as often as it is in the batch,
    m_k times. So the logits need one column per distinct item with
    ``log m_k`` added, and ``-log m_k`` back on row i's own column: the same
    value and user gradients as the B x B form, in a B x U buffer (U
    distinct items; popular items make U well below B).

    >>> users = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    >>> items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # item 7 twice
    >>> keys = torch.tensor([7, 8, 7])
    >>> plain = F.cross_entropy(remove_accidental_hits(users @ items.T, keys, keys), torch.arange(3))
    >>> bool(torch.isclose(_distinct_columns(users, items, 1.0, None, keys), plain))
    True
    """
    keys = item_keys.cpu().numpy()
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    b = user_vectors.shape[0]
    inverse = inverse.reshape(-1)[:b]  # the rows' own items (N = B here)
    if len(first) == len(keys):  # nothing repeats
        targets = torch.arange(b, device=user_vectors.device)
        return _InBatchSoftmaxCrossEntropy.apply(
            user_vectors, item_vectors, inverse_temperature, column_bias, None, None, targets, row_weights
        )
    columns = torch.from_numpy(first)
    log_counts = torch.from_numpy(np.log(counts)).to(user_vectors.dtype)
    bias = log_counts if column_bias is None else column_bias.index_select(0, columns) + log_counts
    rows = np.flatnonzero(counts[inverse] > 1)  # rows whose own item has copies
    own = (torch.from_numpy(rows), torch.from_numpy(inverse[rows]), -log_counts[inverse[rows]])
    return _InBatchSoftmaxCrossEntropy.apply(
        user_vectors, item_vectors.index_select(0, columns), inverse_temperature, bias, None, own, torch.from_numpy(inverse), row_weights
    )


class _InBatchSoftmaxCrossEntropy(torch.autograd.Function):
    """``cross_entropy(users @ items.T / t + bias + cell bias, masked, targets)``
    in one (B, N) buffer: the composition of matmul, logQ, masking and
    ``F.cross_entropy`` allocates and walks a B x N tensor a dozen times
    forward and back, which made it 2/3 of an online step. Here the logits
    become the unnormalised softmax in place and the backward is
    ``(P - onehot) @ V``. Exact, not approximate: tests check values and
    gradients against the plain composition."""

    @staticmethod
    def forward(ctx, users, items, inverse_temperature, column_bias, excluded, cell_bias, targets, row_weights=None):
        if column_bias is None:
            logits = torch.mm(users, items.T).mul_(inverse_temperature)  # (B, N)
        else:
            logits = torch.addmm(column_bias.unsqueeze(0), users, items.T, alpha=inverse_temperature)
        if excluded is not None:
            logits.masked_fill_(excluded, _MASKED)
        if cell_bias is not None:
            rows, columns, values = cell_bias
            logits.index_put_((rows, columns), values, accumulate=True)
        target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)  # (B,)
        row_max = logits.amax(dim=1, keepdim=True)  # (B, 1)
        exponentials = logits.sub_(row_max).exp_()  # unnormalised softmax, in place
        sums = exponentials.sum(dim=1, keepdim=True)  # (B, 1)
        log_normaliser = row_max.squeeze(1) + torch.log(sums.squeeze(1))  # logsumexp, (B,)
        row_losses = log_normaliser - target_logits  # (B,)
        if row_weights is not None:
            row_losses = row_losses * row_weights
        loss = row_losses.mean()
        ctx.save_for_backward(users, items, exponentials, sums, targets, row_weights)
        ctx.inverse_temperature = inverse_temperature
        ctx.consumed = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("in_batch_softmax_loss: backward twice (retain_graph) is not supported")
        ctx.consumed = True
        users, items, grad_logits, sums, targets, row_weights = ctx.saved_tensors
        b = grad_logits.shape[0]
        scale = grad_loss * (ctx.inverse_temperature / b)  # d loss / d (u . v) = scale * (softmax - onehot)
        if row_weights is None:
            grad_logits.mul_(scale / sums)  # the softmax's normalisation, folded into the scaling pass
            grad_logits[torch.arange(b), targets] -= scale
        else:
            row_scale = scale * row_weights.unsqueeze(1)  # (B, 1)
            grad_logits.mul_(row_scale / sums)
            grad_logits[torch.arange(b), targets] -= row_scale.squeeze(1)
        grad_users = grad_logits @ items if ctx.needs_input_grad[0] else None
        grad_items = grad_logits.T @ users if ctx.needs_input_grad[1] else None
        return grad_users, grad_items, None, None, None, None, None, None


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
