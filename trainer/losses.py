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
    logits = cosine_logits(user_vectors, item_vectors, temperature)  # (B, N)
    if item_probabilities is not None:
        logits = sampling_probability_correction(logits, item_probabilities)
    if item_keys is not None:
        row_keys = item_keys if positive_keys is None else positive_keys
        if targets is not None or len(torch.unique(item_keys)) < len(item_keys):  # only if an item repeats
            logits = remove_accidental_hits(logits, row_keys, item_keys, targets)
    if candidate_mask is not None:
        logits = logits.masked_fill(~candidate_mask.unsqueeze(0), _MASKED)
    if targets is None:
        targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets)


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
