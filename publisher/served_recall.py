"""Next-hour recall of what serving served, from the release store.

For each hour that a full release's chain covers (from the day after its
model's day until the next full release's), the clicks of that hour are
scored twice with the service's own code path (``ServingState``: the
release's user tower, ID rows and index):

- **served**: the full release plus every embeddings release of its chain
  whose learnt data ends before the hour starts (``checkpoint_event_time_ms``),
  i.e. what the pipeline had published from the clicks before the hour;
- **frozen**: the full release alone, the daily model as it was trained.

The gap is what fresh user ID embeddings bought. Hours are matched to
releases in event time (what was learnt before the hour), not by the wall
time a release went live, which a fast replay stretches. ``freshtower
run`` prints it in its summary (it keeps every release of the run for this).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from freshtower.publisher.releases import Release, ReleaseStore
from freshtower.publisher.serving import ServingState, load_state, search, served_item_ids
from freshtower.trainer.evaluation import Holdout, holdout_from_samples
from freshtower.trainer.metrics import ranking_metrics, relevant_positions

from freshtower.core.batches import BatchRef, FeatureSpec, SampleColumns, read_batch
from freshtower.core.eventtime import DAY_MS, HOUR_MS, day_name, floor_ms


@dataclass(frozen=True)
class HourRecall:
    hour_start_ms: int
    users: int
    frozen: float  # Recall@k of the full release alone
    served: float  # Recall@k of the newest release published before the hour
    release: str  # that release


def state_recall(state: ServingState, holdout: Holdout, k: int) -> float:
    """Recall@k of ``state`` on ``holdout`` (users without a published row
    read the cold-start row 0, as serving does; clicked items outside the
    release's catalogue count as misses)."""
    rows = np.fromiter((state.user_rows.get(u, 0) for u in holdout.user_ids), dtype=np.int64, count=len(holdout))
    tower = state.tower
    categorical = {name: holdout.user_categorical.get(name, [""] * len(holdout)) for name in tower.categorical}
    numeric = holdout.user_numeric  # (U, F), the model's user_numeric order, as the tower's
    if numeric.shape[1] != len(tower.numeric):
        raise ValueError(f"holdout has {numeric.shape[1]} numeric features, release {state.version}'s tower {len(tower.numeric)}")
    vectors = tower.vectors(state.id_table[rows], categorical, numeric)  # (U, D)
    retrieved = search(state, vectors, k)  # (U, k): the full release's items, then those born since
    position = {item: i for i, item in enumerate(served_item_ids(state))}
    relevant = [relevant_positions(position.get(item, -1) for item in sorted(clicked)) for clicked in holdout.clicked]
    return ranking_metrics(retrieved, relevant, (k,))[f"recall@{k}"]


def _hours(refs: list[BatchRef], spec: FeatureSpec, start_ms: int, end_ms: int) -> list[tuple[int, Holdout]]:
    """The clicks of each whole hour in [start_ms, end_ms) (by batch
    window), each file read once."""
    by_hour: dict[int, list[BatchRef]] = defaultdict(list)
    for ref in refs:
        hour = floor_ms(ref.window_start_ms, HOUR_MS)
        if start_ms <= hour and hour + HOUR_MS <= end_ms:
            by_hour[hour].append(ref)
    hours = []
    for hour in sorted(by_hour):
        holdout = holdout_from_samples(SampleColumns.concat([read_batch(r, spec) for r in by_hour[hour]], spec))
        if len(holdout):
            hours.append((hour, holdout))
    return hours


def _followed_from(release: Release) -> int:
    """A full release serves from the day after its model's day (00:00 UTC, ms)."""
    model_day_start = release.manifest.event_time.start_ms
    if model_day_start is None:
        raise ValueError(f"full release {release.version} records no event-time start")
    return floor_ms(model_day_start, DAY_MS) + DAY_MS


def served_recall_by_hour(
    store: ReleaseStore, refs: list[BatchRef], spec: FeatureSpec, *, until_ms: int, k: int = 50
) -> dict[str, list[HourRecall]]:
    """Per day (``YYYY-MM-DD``), next-hour Recall@k of the served state and
    of the frozen full release, for every hour that ends by ``until_ms``
    (event time, ms). A full release's chain is scored from the day after
    its model's day until the next full release takes over (a refused
    model leaves the previous chain serving)."""
    releases = store.list()
    chains: dict[str, list[Release]] = defaultdict(list)
    for release in releases:
        if release.kind == "embeddings":
            chains[release.manifest.full_version].append(release)
    roots = [r for r in releases if r.kind == "full"]
    result: dict[str, list[HourRecall]] = defaultdict(list)
    for n, root in enumerate(roots):
        end = min(until_ms, _followed_from(roots[n + 1])) if n + 1 < len(roots) else until_ms
        hours = _hours(refs, spec, _followed_from(root), end)
        if not hours:
            continue
        frozen = served = load_state(store, root.version)
        pending = sorted(chains[root.version], key=lambda r: r.sequence)
        for start, holdout in hours:
            while pending and pending[0].manifest.checkpoint_event_time_ms <= start:
                if pending[0].parent != served.version:
                    break  # a rollback split the chain: keep what was served
                served = load_state(store, pending.pop(0).version, current=served)
            row = HourRecall(start, len(holdout), state_recall(frozen, holdout, k), state_recall(served, holdout, k), served.version)
            result[day_name(start)].append(row)
    return dict(result)
