"""Positive and negative sampling for retrieval training.

- Positives are clicked records only (``clicked_only``): shown-but-not-
  clicked records are ranking-model negatives and never enter a retrieval
  loss, as positives or as negatives.
- Easy negatives: items drawn from the whole catalogue with probability
  proportional to ``clicks ** 0.75`` (``CatalogueSampler``), or the other
  items of the batch (``in_batch_negatives``).
- Hard negatives: items a ranking stage dropped for the request
  (``hard_negative_matrix``, from the records' hard negative IDs).
- ``mix_negatives`` combines them (default 50% easy, 50% hard).
- ``positive_multiplicity`` down-samples popular positives and up-samples
  rare ones, relative to a reference share that keeps the clicks' mean
  multiplicity at 1 (``unit_mean_reference``).

Every function takes its random generator; nothing reads a global seed.
"""

from __future__ import annotations

import numpy as np

from freshtower.core.batches import SampleColumns


def clicked_only(columns: SampleColumns) -> SampleColumns:
    """The clicked records of ``columns``: the only retrieval positives."""
    clicked = np.flatnonzero(columns.labels == 1)
    if len(clicked) == len(columns):
        return columns
    return columns.take(clicked)


def popularity_weights(click_probabilities: np.ndarray, exponent: float = 0.75, floor: float = 1e-9) -> np.ndarray:
    """Unnormalised sampling weights ``max(p, floor) ** exponent``.

    The floor keeps never-clicked items reachable.
    """
    return np.maximum(np.asarray(click_probabilities, dtype=np.float64), floor) ** exponent


class CatalogueSampler:
    """Draws catalogue indices with probability proportional to ``weights``.

    >>> sampler = CatalogueSampler(np.array([0.0, 1.0, 3.0]))
    >>> draws = sampler.sample(4000, np.random.default_rng(0))
    >>> sorted(set(draws.tolist())), bool(abs(np.mean(draws == 2) - 0.75) < 0.03)
    ([1, 2], True)
    """

    def __init__(self, weights: np.ndarray):
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 1 or len(weights) == 0:
            raise ValueError("catalogue sampler needs a non-empty 1-d weight vector")
        if np.any(weights < 0) or not np.all(np.isfinite(weights)):
            raise ValueError("catalogue sampler weights must be finite and non-negative")
        total = weights.sum()
        if total <= 0:
            raise ValueError("catalogue sampler weights sum to zero")
        self.probabilities = weights / total
        self._cumulative = np.cumsum(self.probabilities)
        self._cumulative[-1] = 1.0

    def __len__(self) -> int:
        return len(self.probabilities)

    def sample(self, count: int | tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """Indices (int64) drawn with replacement, of shape ``count``."""
        uniform = rng.random(count)
        return np.searchsorted(self._cumulative, uniform, side="right").astype(np.int64)


def in_batch_negatives(positive_keys: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(B, count) batch positions to use as negatives for each row: other rows
    of the batch, never the row itself, drawn uniformly. A position whose
    item equals the row's own positive is replaced by -1 (no negative).
    """
    b = len(positive_keys)
    if b < 2:
        return np.full((b, count), -1, dtype=np.int64)
    offsets = rng.integers(1, b, size=(b, count))  # never 0: never the row itself
    positions = (np.arange(b)[:, None] + offsets) % b
    same_item = positive_keys[positions] == positive_keys[:, None]
    positions[same_item] = -1
    return positions


def hard_negative_matrix(
    offsets: np.ndarray,
    candidates: np.ndarray,
    positive_items: np.ndarray,
    width: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(B, width) catalogue indices of hard negatives per row, left-packed
    and -1 padded.

    Row i's ranking-dropped items are ``candidates[offsets[i]:offsets[i+1]]``
    (catalogue indices, -1 for items outside the catalogue). Takes up to
    ``width`` of them at random, skipping the row's own positive
    (``positive_items``) and unknown items. Vectorised.

    >>> hard_negative_matrix(np.array([0, 3, 3]), np.array([0, 1, -1]), np.array([1, 0]), 2, np.random.default_rng(0)).tolist()
    [[0, -1], [-1, -1]]
    """
    b = len(offsets) - 1
    matrix = np.full((b, width), -1, dtype=np.int64)
    if width == 0 or b == 0 or len(candidates) == 0:
        return matrix
    rows = np.repeat(np.arange(b), np.diff(offsets))
    valid = (candidates >= 0) & (candidates != positive_items[rows])
    rows, indices = rows[valid], candidates[valid]
    if np.any(np.bincount(rows, minlength=b) > width):
        # Random order within each row (rows stay grouped: the key's integer
        # part is the row), then each row keeps its first `width`.
        order = np.argsort(rows + rng.random(len(rows)), kind="stable")
        rows, indices = rows[order], indices[order]
    starts = np.searchsorted(rows, np.arange(b))
    rank = np.arange(len(rows)) - starts[rows]
    keep = rank < width
    matrix[rows[keep], rank[keep]] = indices[keep]
    return matrix


def mix_negatives(
    hard: np.ndarray,
    easy: np.ndarray,
    count: int,
    hard_fraction: float,
) -> np.ndarray:
    """(B, count) negatives: ``round(count * hard_fraction)`` hard slots
    first, filled from ``hard`` (left-packed, -1 padded) and topped up with
    easy ones when a row has too few; the remaining slots are easy.

    ``easy`` must have at least ``count`` columns.

    >>> hard = np.array([[7, 8, -1], [-1, -1, -1]])
    >>> easy = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    >>> mix_negatives(hard, easy, count=4, hard_fraction=0.5).tolist()
    [[7, 8, 1, 2], [5, 6, 7, 8]]
    """
    b = easy.shape[0]
    if easy.shape[1] < count:
        raise ValueError(f"need at least {count} easy candidates per row, got {easy.shape[1]}")
    n_hard = min(int(round(count * hard_fraction)), hard.shape[1])
    taken = np.minimum((hard >= 0).sum(axis=1), n_hard)[:, None]  # (B, 1) hard slots used per row
    columns = np.arange(count)[None, :]  # (1, count)
    rows = np.arange(b)[:, None]
    from_hard = hard[rows, np.minimum(columns, max(hard.shape[1] - 1, 0))] if hard.shape[1] else np.zeros((b, count), np.int64)
    from_easy = easy[rows, np.maximum(columns - taken, 0)]
    return np.where(columns < taken, from_hard, from_easy).astype(np.int64)


def unit_mean_reference(click_probabilities: np.ndarray, exponent: float, min_multiplicity: float, max_multiplicity: float) -> float:
    """The reference share p_ref at which the clicks' mean multiplicity is 1.

    ``click_probabilities`` are the clicks' item shares, one per click (a
    minibatch is a sample of the click stream), so the mean of
    ``clip((p_ref / p) ** exponent, min, max)`` over them estimates the
    stream's mean multiplicity. It grows with p_ref; bisection on log p_ref
    finds where it is 1. An absolute p_ref cannot do this: 1e-3 keeps 0.42 of
    a 300-item Zipf stream and up-samples a 1M-item one about twofold.

    >>> p = np.array([0.5, 0.5, 0.01, 0.01])
    >>> reference = unit_mean_reference(p, 0.5, 0.1, 3.0)
    >>> round(float(expected_multiplicity(p, 0.5, reference, 0.1, 3.0).mean()), 6)
    1.0
    """
    p = np.maximum(np.asarray(click_probabilities, dtype=np.float64), 1e-300)
    if len(p) == 0 or exponent == 0:
        return float(np.median(p)) if len(p) else 1.0
    log_p = np.log(p)
    # Below min(p) * min^(1/e) every click sits at the floor (mean = min <= 1);
    # above max(p) * max^(1/e) at the cap (mean = max >= 1).
    low = log_p.min() + np.log(min_multiplicity) / exponent
    high = log_p.max() + np.log(max_multiplicity) / exponent
    scaled = -exponent * log_p  # log m = exponent * (log p_ref - log p)
    log_min, log_max = np.log(min_multiplicity), np.log(max_multiplicity)
    for _ in range(40):  # the bracket is at most ~60 nats wide: 2^-40 of it
        middle = 0.5 * (low + high)
        if np.exp(np.clip(exponent * middle + scaled, log_min, log_max)).mean() < 1.0:
            low = middle
        else:
            high = middle
    return float(np.exp(0.5 * (low + high)))


def expected_multiplicity(
    click_probabilities: np.ndarray,
    exponent: float,
    reference_share: float,
    min_multiplicity: float,
    max_multiplicity: float,
) -> np.ndarray:
    """``clip((reference_share / p) ** exponent, min, max)`` per positive: an
    item clicked more often than the reference share is down-sampled, a
    rarer one up-sampled."""
    p = np.maximum(np.asarray(click_probabilities, dtype=np.float64), 1e-12)
    return np.clip((reference_share / p) ** exponent, min_multiplicity, max_multiplicity)


def stochastic_round(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integers with expectation ``expected``: floor, plus one with the
    fractional part's probability."""
    whole = np.floor(expected)
    return (whole + (rng.random(len(expected)) < expected - whole)).astype(np.int64)


def positive_multiplicity(
    click_probabilities: np.ndarray,
    rng: np.random.Generator,
    exponent: float,
    reference_share: float | None,
    min_multiplicity: float,
    max_multiplicity: float,
) -> np.ndarray:
    """How many times to use each positive: 0, 1, 2, ...

    The expected multiplicity is ``expected_multiplicity``; with
    ``reference_share`` None the reference is ``unit_mean_reference`` of
    these clicks, so they keep their number on average. Stochastic rounding
    keeps the expectation exact.
    """
    if reference_share is None:
        reference_share = unit_mean_reference(click_probabilities, exponent, min_multiplicity, max_multiplicity)
    expected = expected_multiplicity(click_probabilities, exponent, reference_share, min_multiplicity, max_multiplicity)
    return stochastic_round(expected, rng)
