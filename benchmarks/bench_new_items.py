"""Next-hour Recall@50 on clicks of items born that day, with and without
new-item vectors in the embeddings releases.

Arms: ``on`` (``new_item_id_row = feature_mean``, the default),
``on_default_row`` (``default``) and ``off`` (``new_item_vectors = false``).

The world is the simulator's, plus items born during day 1 (at uniform
times over its first 20 hours, each in a random topic). A request's
candidates then also hold up to ``--fresh-per-request`` items born in the
last 12 hours, drawn from the user's interests, as a news or short-video
feed would: they are shown and clicked like any item of their topic.

Per seed, with the real code paths: the day-0 full model
(``train_full``), the online trainer through day 1 (``OnlineTrainer``), and
two publishers on the same checkpoints (``Publisher``), one with
``publisher.new_item_vectors`` on, one off, each into its own release
store. At every hour of day 1 the online trainer has learnt every batch
before the hour, both publishers release, and the hour's clicks are scored
on each store's served state (``load_state``: the service's own swap path,
``served_recall.state_recall``: its own search). Reported per arm: Recall@50
on clicks of items born that day (and, of those, on items first clicked
before the hour: what a release could know), on clicks of older items and
on all clicks; mean over seeds with a 95% t-interval, and the paired
difference on minus off.

    python benchmarks/bench_new_items.py --seeds 3
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from freshtower.publisher.publish import Publisher
from freshtower.publisher.releases import ReleaseStore
from freshtower.publisher.served_recall import state_recall
from freshtower.publisher.serving import load_state
from freshtower.trainer.evaluation import holdout_from_samples
from freshtower.trainer.full import train_full
from freshtower.trainer.online import OnlineTrainer

from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.core.batches import FeatureSpec, SampleColumns, list_batches, read_batch
from freshtower.core.eventtime import HOUR_MS
from freshtower.core.settings import load_settings

K = 50
FRESH_HOURS = 12
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


class BirthSimulator(Simulator):
    """The simulator with ``born`` items born during day 1."""

    def __init__(self, config: SimulatorConfig, born: int, fresh_per_request: int):
        super().__init__(config)
        rng = np.random.default_rng([config.seed, 7])
        self.base_items = config.items
        self.fresh_per_request = fresh_per_request
        self.item_topic = np.concatenate([self.item_topic, rng.integers(0, config.topics, born)])
        self.birth_ms = self.day_start_ms(1) + np.sort(rng.integers(0, 20 * HOUR_MS, born))  # (born,)
        self._now_ms = 0

    def born_ids(self) -> set[str]:
        return {self.item_id(self.base_items + j) for j in range(len(self.birth_ms))}

    def interest_at(self, user: int, ts_ms: int, day: int) -> np.ndarray:
        self._now_ms = ts_ms  # the request being generated (read by _candidates next)
        return super().interest_at(user, ts_ms, day)

    def _candidates(self, interest: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        candidates = super()._candidates(interest, rng)
        live = np.flatnonzero((self.birth_ms <= self._now_ms) & (self._now_ms < self.birth_ms + FRESH_HOURS * HOUR_MS))
        if not len(live) or not self.fresh_per_request:
            return candidates
        topics = self.item_topic[self.base_items + live]
        wanted = np.minimum(np.searchsorted(np.cumsum(interest), rng.random(self.fresh_per_request) * interest.sum()), len(interest) - 1)
        fresh = []
        for topic in wanted.tolist():
            pool = live[topics == topic]
            if len(pool):
                fresh.append(self.base_items + int(pool[rng.integers(0, len(pool))]))
        return rng.permutation(np.unique(np.concatenate([candidates, np.asarray(fresh, dtype=np.int64)])))


ARMS = {  # arm -> publisher settings
    "on": {"new_item_vectors": True, "new_item_id_row": "feature_mean"},
    "on_default_row": {"new_item_vectors": True, "new_item_id_row": "default"},
    "off": {"new_item_vectors": False},
}


def arm_settings(data_dir: Path, arm: str):
    return load_settings(
        data_dir=data_dir,
        frequency={"buckets": 1 << 16},
        training={"checkpoint_every_seconds": 1e9},
        publisher={"kafka_enabled": False, **ARMS[arm]},
    )


def recall_or_none(state, samples: SampleColumns, keep: np.ndarray) -> tuple[float, int] | None:
    if not keep.any():
        return None
    holdout = holdout_from_samples(samples.take(np.flatnonzero(keep)))
    return state_recall(state, holdout, K), len(holdout)


def run_seed(seed: int, args) -> dict[str, dict[str, float]]:
    config = SimulatorConfig(users=args.users, items=args.items, topics=args.topics, requests_per_day=args.requests, seed=seed)
    simulator = BirthSimulator(config, args.born, args.fresh_per_request)
    born = simulator.born_ids()
    with tempfile.TemporaryDirectory(prefix="bench-new-items-") as tmp:
        on_dir = Path(tmp) / "on"
        simulator.write_batches(on_dir / "batches", [0, 1], args.window_seconds)
        on = arm_settings(on_dir, "on")
        train_full(on, simulator.day_name(0))
        for shared in ("batches", "models", "online"):
            (on_dir / shared).mkdir(exist_ok=True)
        arms = {"on": on}
        for arm in ARMS:
            if arm == "on":
                continue
            arm_dir = Path(tmp) / arm
            arm_dir.mkdir()
            for shared in ("batches", "models", "online"):  # the same data, model and checkpoints; only the releases differ
                os.symlink(on_dir / shared, arm_dir / shared)
            arms[arm] = arm_settings(arm_dir, arm)
        spec = FeatureSpec.from_model(on.model)
        trainer = OnlineTrainer.start(on)
        refs = list_batches(on.batches_dir)
        day1 = simulator.day_start_ms(1)
        seen: set[str] = set()  # items clicked before the hour
        sums: dict[str, dict[str, list[float]]] = {arm: {} for arm in ARMS}
        states = {}
        with ExitStack() as stack:
            publishers = {arm: stack.enter_context(Publisher(settings)) for arm, settings in arms.items()}
            for name, publisher in publishers.items():
                assert publisher.publish_full_if_new(now_s=day1 / 1000).status == "published"
            for hour in range(1, 24):
                start = day1 + hour * HOUR_MS
                todo = [r for r in trainer.pending() if r.window_start_ms < start]
                if todo:
                    trainer.run(max_batches=len(todo), prefetch=False)
                for name, publisher in publishers.items():
                    outcome = publisher.publish_delta_if_due(now_s=start / 1000, force=True)
                    store = ReleaseStore(publisher.settings.releases_dir)
                    states[name] = load_state(store, store.active_version(), current=states.get(name))
                    if outcome.status != "published":
                        print(f"  seed {seed} hour {hour} {name}: {outcome.status}: {outcome.reason}")
                hour_refs = [r for r in refs if start <= r.window_start_ms < start + HOUR_MS]
                if not hour_refs:
                    continue
                samples = SampleColumns.concat([read_batch(r, spec) for r in hour_refs], spec)
                items = np.asarray(samples.item_ids, dtype=object)
                is_born = np.isin(items, list(born))
                known = np.isin(items, list(seen))
                parts = {
                    "born_today": is_born,
                    "born_seen_before_hour": is_born & known,
                    "older": ~is_born,
                    "all": np.ones(len(items), bool),
                }
                for name, state in states.items():
                    for part, keep in parts.items():
                        scored = recall_or_none(state, samples, keep)
                        if scored is not None:
                            sums[name].setdefault(part, []).append(scored)
                seen.update(samples.item_ids)
    result = {"new_items_served_at_end": {arm: float(len(state.new_items)) for arm, state in states.items()}}
    for name, parts in sums.items():
        for part, rows in parts.items():
            recalls, users = np.array([r for r, _ in rows]), np.array([u for _, u in rows], dtype=np.float64)
            result.setdefault(part, {})[name] = float((recalls * users).sum() / users.sum())  # user-weighted over hours
            result[part]["users"] = float(users.sum())
    return result


def interval(values: list[float]) -> str:
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return f"{mean:.4f}"
    half = T_975.get(len(values) - 1, 1.96) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return f"{mean:.4f} [{mean - half:.4f}, {mean + half:.4f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--topics", type=int, default=20)
    parser.add_argument("--born", type=int, default=100, help="items born during day 1")
    parser.add_argument("--fresh-per-request", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8000, help="requests per day")
    parser.add_argument("--window-seconds", type=float, default=600.0)
    args = parser.parse_args()
    started = time.perf_counter()
    results = []
    for seed in range(args.seeds):
        seed_started = time.perf_counter()
        results.append(run_seed(seed, args))
        row = results[-1]
        print(
            f"seed {seed}: born-today clicks' Recall@{K} on {row['born_today']['on']:.4f} "
            f"default row {row['born_today']['on_default_row']:.4f} off {row['born_today']['off']:.4f}; "
            f"all on {row['all']['on']:.4f} off {row['all']['off']:.4f}; {row['new_items_served_at_end']['on']:.0f} new items served "
            f"at the day's end ({time.perf_counter() - seed_started:.0f} s)",
            flush=True,
        )
    print(f"\nnext-hour Recall@{K}, day 1, {args.seeds} seeds, mean [95% t-interval]; {vars(args)}")
    print("| clicks on | users x hours per seed | on (feature-mean ID row) | on (default ID row) | off | on - off (paired) |")
    print("|---|---|---|---|---|---|")
    for part in ("born_today", "born_seen_before_hour", "older", "all"):
        rows = [r[part] for r in results if part in r]
        on, default, off = ([r[arm] for r in rows] for arm in ("on", "on_default_row", "off"))
        users = np.mean([r["users"] for r in rows])
        diff = interval([a - b for a, b in zip(on, off)])
        print(f"| {part} | {users:.0f} | {interval(on)} | {interval(default)} | {interval(off)} | {diff} |")
    print(f"\ntook {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
