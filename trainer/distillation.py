"""Distillation losses: the ranker's logged scores as soft labels.

The ranking stage logs a score in [0, 1] for every candidate it saw (rank
logs: ``scores``, ``kept``); the students, the pre-ranker and the two-tower
retrieval model, learn from those scores as well as from clicks, which
carries the ranker's knowledge into the cheap models and aligns the stages'
objectives. The logged scores are used as they are; nothing is re-scored.

Candidates are ragged per request: request ``r`` holds candidates
``offsets[r]:offsets[r + 1]`` of the flat (N,) tensors (``offsets`` (R + 1,)
int64, ``offsets[0] = 0``, ``offsets[-1] = N``). Everything is vectorised
over all requests at once (no Python loop per request).

Pieces, each tested alone:

- ``soft_label_bce``: pointwise binary cross-entropy of the student's
  logits against soft labels in [0, 1];
- ``teacher_logits``: the teacher's scores as logits (``logit(score)``, the
  ranker's own logit if it is a sigmoid model, or the score itself);
- ``segment_log_softmax``: log-softmax within each request;
- ``listwise_distillation``: KL(teacher || student) between the softmaxes
  over a request's candidates at a temperature T, times T^2 (Hinton et al.
  2015: keeps the gradient's size when T changes), averaged over requests
  with at least two candidates (a single candidate's softmax is 1 whatever
  the logits: it carries nothing);
- ``combined_objective``: ``click_weight * click_loss + distill_weight * distill_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_offsets(offsets: torch.Tensor, total: int) -> None:
    """Refuse ragged offsets that do not cut ``total`` candidates into requests."""
    if offsets.ndim != 1 or len(offsets) < 1:
        raise ValueError(f"offsets must be a (R + 1,) vector, got shape {tuple(offsets.shape)}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != total:
        raise ValueError(f"offsets must run from 0 to {total} candidates, got {int(offsets[0])} .. {int(offsets[-1])}")
    if len(offsets) > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("offsets must not decrease")


def request_index(offsets: torch.Tensor) -> torch.Tensor:
    """(N,) the request of each candidate.

    >>> request_index(torch.tensor([0, 2, 2, 3])).tolist()
    [0, 0, 2]
    """
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), counts)


def segment_log_softmax(logits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(N,) log-softmax of ``logits`` within each request.

    >>> segment_log_softmax(torch.tensor([0.0, 0.0, 5.0]), torch.tensor([0, 2, 3])).exp().tolist()
    [0.5, 0.5, 1.0]
    """
    requests = len(offsets) - 1
    segments = request_index(offsets)
    # the per-request maximum only keeps exp() in range; the result does not depend on it
    maxima = torch.full((requests,), float("-inf"), dtype=logits.dtype, device=logits.device)
    maxima = maxima.scatter_reduce(0, segments, logits.detach(), reduce="amax")
    shifted = logits - maxima[segments]
    sums = torch.zeros(requests, dtype=logits.dtype, device=logits.device).index_add(0, segments, shifted.exp())
    return shifted - sums.log()[segments]


def teacher_logits(scores: torch.Tensor, space: str = "logit", epsilon: float = 1e-4) -> torch.Tensor:
    """The teacher's scores in [0, 1] as logits: ``logit(clip(score, eps, 1 - eps))``
    (``space="logit"``) or the scores themselves (``space="score"``).

    >>> [round(x, 2) for x in teacher_logits(torch.tensor([0.2, 0.5, 1.0])).tolist()]  # 1.0 clipped to 1 - 1e-4
    [-1.39, 0.0, 9.21]
    """
    if space == "logit":
        return torch.logit(scores.clamp(epsilon, 1.0 - epsilon))
    if space == "score":
        return scores
    raise ValueError(f"teacher space must be 'logit' or 'score', got {space!r}")


def soft_label_bce(logits: torch.Tensor, soft_labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy of (N,) logits against (N,) labels in [0, 1]
    (soft: the teacher's scores; hard: clicks), optionally weighted (N,)."""
    if soft_labels.numel() and (float(soft_labels.min()) < 0.0 or float(soft_labels.max()) > 1.0):
        raise ValueError(f"soft labels must lie in [0, 1], got {float(soft_labels.min())} .. {float(soft_labels.max())}")
    if weights is None:
        return F.binary_cross_entropy_with_logits(logits, soft_labels)
    losses = F.binary_cross_entropy_with_logits(logits, soft_labels, reduction="none")
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)


def listwise_distillation(
    student_logits: torch.Tensor, teacher: torch.Tensor, offsets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T^2 * mean_r KL(softmax(teacher_r / T) || softmax(student_r / T))``
    over the requests with at least two candidates (0 when there is none).

    ``teacher`` (N,) are the teacher's logits (``teacher_logits``); no
    gradient flows into them.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_offsets(offsets, student_logits.shape[0])
    teacher_log_p = segment_log_softmax(teacher.detach() / temperature, offsets)
    student_log_p = segment_log_softmax(student_logits / temperature, offsets)
    per_candidate = teacher_log_p.exp() * (teacher_log_p - student_log_p)  # (N,)
    requests = len(offsets) - 1
    per_request = torch.zeros(requests, dtype=student_logits.dtype, device=student_logits.device)
    per_request = per_request.index_add(0, request_index(offsets), per_candidate)
    informative = (offsets[1:] - offsets[:-1]) >= 2
    count = int(informative.sum())
    if count == 0:
        return student_logits.sum() * 0.0
    return temperature**2 * per_request[informative].sum() / count


def distillation_loss(student_logits: torch.Tensor, teacher_scores: torch.Tensor, offsets: torch.Tensor, config) -> torch.Tensor:
    """The distillation term ``config`` (``DistillationConfig``) asks for:
    pointwise BCE on the scores, or listwise KL over each request."""
    if config.mode == "pointwise":
        return soft_label_bce(student_logits, teacher_scores)
    if config.mode == "listwise":
        teacher = teacher_logits(teacher_scores, config.teacher_space, config.score_epsilon)
        return listwise_distillation(student_logits, teacher, offsets, config.temperature)
    raise ValueError(f"distillation mode must be 'pointwise' or 'listwise', got {config.mode!r}")


def combined_objective(click_loss: torch.Tensor, distill_loss: torch.Tensor, click_weight: float, distill_weight: float) -> torch.Tensor:
    """``click_weight * click_loss + distill_weight * distill_loss``; a zero
    weight drops its term (so a loss that is NaN for lack of data cannot leak in).

    >>> float(combined_objective(torch.tensor(2.0), torch.tensor(float("nan")), 0.5, 0.0))
    1.0
    """
    if click_weight == 0 and distill_weight == 0:
        raise ValueError("click_weight and distill_weight are both 0: nothing to learn")
    total = None
    for weight, loss in ((click_weight, click_loss), (distill_weight, distill_loss)):
        if weight:
            total = weight * loss if total is None else total + weight * loss
    return total


def prerank_objective(
    logits: torch.Tensor, clicks: torch.Tensor, teacher_scores: torch.Tensor, offsets: torch.Tensor, config
) -> torch.Tensor:
    """The pre-ranker's loss over N candidates of R requests: click BCE
    (labels 0/1) and the distillation term, weighted by ``config``
    (``DistillationConfig.click_weight``, ``.distill_weight``)."""
    click_loss = soft_label_bce(logits, clicks.to(logits.dtype)) if config.click_weight else logits.new_zeros(())
    distill = distillation_loss(logits, teacher_scores, offsets, config) if config.distill_weight else logits.new_zeros(())
    return combined_objective(click_loss, distill, config.click_weight, config.distill_weight)


def request_cosine_logits(
    user_vectors: torch.Tensor, request_of: torch.Tensor, item_vectors: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The two-tower student's logits over each request's candidates:
    ``cos(a_r, b_j) / temperature`` for (R, D) users, (N,) request of each
    candidate and (N, D) candidate item vectors -> (N,)."""
    return (user_vectors[request_of] * item_vectors).sum(dim=1) / temperature


def retrieval_distillation_loss(
    student_logits: torch.Tensor, teacher_scores: torch.Tensor, offsets: torch.Tensor, config
) -> torch.Tensor:
    """The two-tower retrieval model's distillation term over its requests'
    shown items: ``config.retrieval_mode`` (``DistillationConfig``) picks
    pointwise BCE on the scores or the listwise KL at ``config.temperature``."""
    if config.retrieval_mode == "pointwise":
        return soft_label_bce(student_logits, teacher_scores)
    teacher = teacher_logits(teacher_scores, config.teacher_space, config.score_epsilon)
    return listwise_distillation(student_logits, teacher, offsets, config.temperature)
