"""The retrieval model's distillation samples: the shown items of a batch
with the ranker's logged score (``teacher_score``), grouped by request.

The trainers normally learn from clicked records only. With distillation
on (``DistillationConfig.retrieval_weight > 0``) they keep, beside the
clicks, every shown record that carries a teacher score, and cut their
minibatches so that each still holds ``batch_size`` clicks (a batch file
or shard without any click is skipped): the click loss
sees the same minibatches as without distillation, and the distillation
term sees the shown items around them. The full trainer shuffles whole
requests, so a request's shown items stay together for the listwise term.

Where a window has ranking samples (``core/batches/ranking.py``: every
candidate the ranker scored, dropped ones too), the distillation term
takes each request's scored candidates from them instead of its shown
records (``DistillationConfig.retrieval_candidates = "ranked"``): the
ranker's opinion of what it dropped is what retrieval most needs to
learn. A stream without rank logs has only the clicks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from freshtower.core.batches import FeatureSpec, SampleColumns, read_batch
from freshtower.core.batches.ranking import RankingColumns, read_ranking_samples


def distillation_records(
    ref, spec: FeatureSpec, config, category_feature: str, records: SampleColumns | None = None
) -> SampleColumns:
    """A batch file's records for a distilling trainer: every record (not
    only the clicks; ``records`` if already read whole) and, with
    ``config.retrieval_candidates == "ranked"``, the window's ranking-sample
    candidates (``with_ranked_candidates``)."""
    if records is None:
        records = read_batch(ref, spec, positives_only=False)
    if config.retrieval_candidates == "ranked":
        ranked = read_ranking_samples(ref, spec)
        if len(ranked):
            records = with_ranked_candidates(records, ranking_rows(ranked, spec, category_feature), spec)
    return distillation_rows(records)


def distillation_rows(columns: SampleColumns) -> SampleColumns:
    """The records the distilling trainers keep: clicked ones and those with a teacher score."""
    keep = np.flatnonzero((columns.labels == 1) | np.isfinite(columns.teacher_scores))
    return columns if len(keep) == len(columns) else columns.take(keep)


def positive_spans(labels: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """Cut records into consecutive spans of ``batch_size`` clicks each, as
    many spans as ``ceil(clicks / batch_size)`` (the trainers' step count);
    the last span also takes the records after its last click. No clicks:
    no span.

    >>> positive_spans(np.array([0, 1, 0, 1, 1, 0]), 2)
    [(0, 4), (4, 6)]
    >>> positive_spans(np.array([1, 1, 0]), 2)
    [(0, 3)]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    clicks = np.flatnonzero(labels == 1)
    if len(clicks) == 0:
        return []
    ends = (clicks[batch_size - 1 :: batch_size] + 1).tolist()
    if len(clicks) % batch_size:
        ends.append(len(labels))
    else:
        ends[-1] = len(labels)
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def request_grouped_order(request_ids: list[str], rng: np.random.Generator) -> np.ndarray:
    """A random order of the records in which each request's records stay
    together (requests in random order, records in their given order)."""
    _, inverse = np.unique(np.asarray(request_ids, dtype=object), return_inverse=True)
    rank = rng.permutation(int(inverse.max()) + 1 if len(inverse) else 0)
    return np.argsort(rank[inverse.reshape(-1)], kind="stable")


@dataclass(frozen=True)
class SoftLabelGroups:
    """Shown records with a teacher score, sorted by request: request ``r``
    holds rows ``offsets[r]:offsets[r + 1]`` of ``rows``; ``first[r]`` is
    the index in ``rows`` of its first record (whose user features stand
    for the request's user)."""

    rows: SampleColumns
    offsets: np.ndarray  # (R + 1,) int64
    first: np.ndarray  # (R,) int64

    @property
    def requests(self) -> int:
        return len(self.first)


def soft_label_groups(columns: SampleColumns, known_items: np.ndarray | None = None) -> SoftLabelGroups | None:
    """The records of ``columns`` with a finite teacher score (and, if
    ``known_items`` (N,) bool is given, a known item), grouped by request;
    None when there is none."""
    keep = np.isfinite(columns.teacher_scores)
    if known_items is not None:
        keep &= known_items
    picked = np.flatnonzero(keep)
    if len(picked) == 0:
        return None
    request_ids = np.asarray([columns.request_ids[i] for i in picked.tolist()], dtype=object)
    order = np.argsort(request_ids, kind="stable")
    rows = columns.take(picked[order])
    sorted_ids = request_ids[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]]))
    offsets = np.concatenate([starts, [len(rows)]]).astype(np.int64)
    return SoftLabelGroups(rows, offsets, starts.astype(np.int64))


def ranking_rows(columns: RankingColumns, spec: FeatureSpec, category_feature: str) -> SampleColumns:
    """Every scored candidate of ``columns`` as an unclicked record carrying
    the ranker's score (``teacher_scores``) and its request's user features;
    the candidate's category fills ``category_feature``, other item
    features are unknown ("")."""
    request_of = columns.request_of()
    pick = request_of.tolist()
    n = columns.candidates
    return SampleColumns(
        user_ids=[columns.user_ids[r] for r in pick],
        item_ids=list(columns.candidate_ids),
        labels=np.zeros(n, np.int8),
        event_time_ms=columns.event_time_ms[request_of],
        request_ids=[columns.request_ids[r] for r in pick],
        positions=np.zeros(n, np.int32),
        user_categorical={name: [columns.user_categorical[name][r] for r in pick] for name in spec.user_categorical},
        user_numeric=np.asarray(columns.user_numeric, np.float32)[request_of].reshape(n, len(spec.user_numeric)),
        item_categorical={
            name: list(columns.categories) if name == category_feature else [""] * n for name in spec.item_categorical
        },
        hard_negative_flat=[],
        hard_negative_offsets=np.zeros(n + 1, np.int64),
        teacher_scores=np.asarray(columns.scores, np.float32),
    )


def with_ranked_candidates(records: SampleColumns, ranked: SampleColumns, spec: FeatureSpec) -> SampleColumns:
    """``records`` plus the ranking samples' candidates (``ranking_rows``),
    in event-time order; the records of a request the ranking samples
    cover lose their teacher score (the candidates carry it, once)."""
    if not len(ranked):
        return records
    covered = set(ranked.request_ids)
    scores = records.teacher_scores.copy()
    scores[np.fromiter((r in covered for r in records.request_ids), bool, len(records))] = np.nan
    own = records.take(np.arange(len(records)))
    own.teacher_scores = scores
    merged = SampleColumns.concat([own, ranked], spec)
    return merged.take(np.argsort(merged.event_time_ms, kind="stable"))
