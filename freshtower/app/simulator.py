"""A seeded simulator of a recommender's traffic, for tests, benchmarks and
the local run.

The world:

- Items belong to one of ``topics`` topics (their ``category`` feature) and
  have power-law popularity (Zipf exponent ``popularity_exponent``).
- Users have an interest distribution over topics, concentrated on one or
  two; their ``age_bucket`` and ``device`` correlate with their main topic,
  ``city`` does not. Activity is log-normal, so a few users make many
  requests.
- Interests drift: each day a share ``drift_share`` of users switches, at a
  random moment, to a new topic chosen at random. The switch is invisible in
  the features, so only the user's own clicks reveal it; it persists into
  the next day.
- Newcomers (``new_users_per_day``, ``new_items_per_day``, 0 by default):
  from day 1 on, each day brings new users and new items, each born at a
  random moment of its day, drawn like the first ones; a user makes no
  request and an item is not shown before its birth. Room is made for
  ``max_days`` days of newcomers.
- Traffic follows a day/night cycle (peak 20:00 UTC, trough 08:00 UTC).
- Each request retrieves ``candidates_per_request`` items (half popular,
  half from the user's current interests); a ranking stage scores them
  (the teacher score, a noisy click probability), shows the best
  ``items_per_request`` and drops the rest, which the rank log reports (the
  hard negatives). The user clicks each shown item with a probability that
  grows with its topic's weight in the current interest (plus, with
  ``pair_affinity``, a per-(user, item) term the towers cannot express, so
  the ranker knows more than its students can copy); clicks follow the
  impression by a few seconds.

It emits the events that go to Kafka (``impressions``, ``clicks``,
``rank-logs``; JSON-ready dicts, see docs/formats.md) and, for tests, the training
samples those events join into, without Kafka.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from freshtower.core.batches import BatchRef, Sample, write_batch
from freshtower.core.eventtime import DAY_MS, HOUR_MS, day_start_ms

AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
DEVICES = ("ios", "android", "web")


@dataclass(frozen=True)
class SimulatorConfig:
    users: int = 2000
    items: int = 1000
    topics: int = 20
    requests_per_day: int = 20000
    items_per_request: int = 10
    candidates_per_request: int = 20
    popularity_exponent: float = 1.0
    drift_share: float = 0.5  # users whose interest moves, per day
    cities: int = 30
    start_day: str = "2026-11-20"  # day 0, UTC
    click_delay_seconds: float = 20.0  # mean delay from impression to click
    seed: int = 0
    new_users_per_day: int = 0  # users born during each day from day 1 on
    new_items_per_day: int = 0  # items born during each day from day 1 on
    max_days: int = 30  # days of newcomers made room for (later days bring none)
    # Per-(user, item) affinity in [-pair_affinity, +pair_affinity] added to the
    # click probability, which the ranker's score follows: a pseudo-random,
    # full-rank user x item term that no tower's dot product (nor a
    # per-(user, category) statistic) can express. 0: the click probability
    # depends on the item's topic only, which the students can learn exactly.
    pair_affinity: float = 0.0


@dataclass(frozen=True)
class Request:
    """One recommendation request and everything that followed it."""

    request_id: str
    user: int
    ts_ms: int
    shown: np.ndarray  # item indices, in slot order
    clicked: np.ndarray  # bool per shown item
    click_ts_ms: np.ndarray  # click time per shown item (meaningful where clicked)
    dropped: np.ndarray  # item indices the ranking stage dropped
    shown_scores: np.ndarray
    dropped_scores: np.ndarray


class Simulator:
    """Deterministic given its config: each day has its own seeded stream."""

    def __init__(self, config: SimulatorConfig = SimulatorConfig()):
        self.config = config
        rng = np.random.default_rng([config.seed, 0])
        c = config
        self.item_topic = rng.integers(0, c.topics, size=c.items)
        ranks = rng.permutation(c.items) + 1
        popularity = 1.0 / ranks.astype(np.float64) ** c.popularity_exponent
        self.item_popularity = popularity / popularity.sum()
        self._popular_cdf = np.cumsum(self.item_popularity)
        # Per topic, a pool of items pre-drawn by (flattened) popularity, so a
        # request draws its personal candidates with one vectorised index.
        self._topic_pool = np.zeros((c.topics, 4096), dtype=np.int64)
        for topic in range(c.topics):
            items = np.flatnonzero(self.item_topic == topic)
            if len(items) == 0:
                items = np.array([rng.integers(0, c.items)])
            weights = self.item_popularity[items] ** 0.5  # flatter within a topic
            self._topic_pool[topic] = rng.choice(items, size=4096, p=weights / weights.sum())
        main_topic = rng.integers(0, c.topics, size=c.users)
        second_topic = rng.integers(0, c.topics, size=c.users)
        interest = np.full((c.users, c.topics), 0.02 / c.topics)
        interest[np.arange(c.users), main_topic] += 0.7
        interest[np.arange(c.users), second_topic] += 0.28
        self._initial_interest = interest / interest.sum(axis=1, keepdims=True)
        self.user_age = np.where(rng.random(c.users) < 0.7, main_topic % len(AGE_BUCKETS), rng.integers(0, len(AGE_BUCKETS), c.users))
        self.user_device = np.where(rng.random(c.users) < 0.6, main_topic % len(DEVICES), rng.integers(0, len(DEVICES), c.users))
        self.user_city = rng.integers(0, c.cities, size=c.users)
        self.user_activity = rng.lognormal(0.0, 1.0, size=c.users)
        self._activity_cdf = np.cumsum(self.user_activity / self.user_activity.sum())
        self.n_users, self.n_items = c.users, c.items
        never = np.full(1, np.iinfo(np.int64).min)
        self.user_birth_ms, self.item_birth_ms = np.repeat(never, c.users), np.repeat(never, c.items)
        if c.new_users_per_day or c.new_items_per_day:
            self._add_newcomers(np.random.default_rng([c.seed, 4]), main_topic, second_topic, popularity)
        self._day_pools: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._interest_by_day: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._requests_by_day: dict[int, list[Request]] = {}

    def _add_newcomers(self, rng: np.random.Generator, main_topic, second_topic, popularity) -> None:
        """Users and items born from day 1 on, drawn like the first ones (their own random stream)."""
        c = self.config
        new_users, new_items = c.new_users_per_day * c.max_days, c.new_items_per_day * c.max_days
        births = lambda n, per_day: np.array(  # noqa: E731
            [self.day_start_ms(1 + j // per_day) for j in range(n)], dtype=np.int64
        ) + rng.integers(0, DAY_MS, size=n)
        if new_items:
            self.item_topic = np.concatenate([self.item_topic, rng.integers(0, c.topics, size=new_items)])
            ranks = rng.integers(1, c.items + 1, size=new_items)  # a rank on the first catalogue's scale
            popularity = np.concatenate([popularity, 1.0 / ranks.astype(np.float64) ** c.popularity_exponent])
            self.item_popularity = popularity / popularity.sum()
            self.item_birth_ms = np.concatenate([self.item_birth_ms, births(new_items, c.new_items_per_day)])
            self.n_items = c.items + new_items
        if new_users:
            main = rng.integers(0, c.topics, size=new_users)
            second = rng.integers(0, c.topics, size=new_users)
            interest = np.full((new_users, c.topics), 0.02 / c.topics)
            interest[np.arange(new_users), main] += 0.7
            interest[np.arange(new_users), second] += 0.28
            self._initial_interest = np.concatenate([self._initial_interest, interest / interest.sum(axis=1, keepdims=True)])
            age = np.where(rng.random(new_users) < 0.7, main % len(AGE_BUCKETS), rng.integers(0, len(AGE_BUCKETS), new_users))
            device = np.where(rng.random(new_users) < 0.6, main % len(DEVICES), rng.integers(0, len(DEVICES), new_users))
            self.user_age = np.concatenate([self.user_age, age])
            self.user_device = np.concatenate([self.user_device, device])
            self.user_city = np.concatenate([self.user_city, rng.integers(0, c.cities, size=new_users)])
            self.user_activity = np.concatenate([self.user_activity, rng.lognormal(0.0, 1.0, size=new_users)])
            self.user_birth_ms = np.concatenate([self.user_birth_ms, births(new_users, c.new_users_per_day)])
            self.n_users = c.users + new_users

    def _pools(self, day: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(alive items, their popularity cdf, topic pools of item indices, users' activity cdf over those born by the
        day's end): day 0 and a world without newcomers use the first ones."""
        c = self.config
        if (not c.new_items_per_day and not c.new_users_per_day) or day == 0:
            return np.arange(c.items), self._popular_cdf, self._topic_pool, self._activity_cdf
        if day not in self._day_pools:
            rng = np.random.default_rng([c.seed, 5, day])
            end = self.day_start_ms(day + 1)
            alive = np.flatnonzero(self.item_birth_ms < end)
            pool = np.zeros((c.topics, 4096), dtype=np.int64)
            for topic in range(c.topics):
                items = alive[self.item_topic[alive] == topic]
                if len(items) == 0:
                    items = alive[:1]
                weights = self.item_popularity[items] ** 0.5
                pool[topic] = rng.choice(items, size=4096, p=weights / weights.sum())
            users = self.user_birth_ms < end
            activity = np.where(users, self.user_activity, 0.0)
            self._day_pools[day] = (alive, np.cumsum(self.item_popularity[alive]), pool, np.cumsum(activity / activity.sum()))
        return self._day_pools[day]

    # --- identities ----------------------------------------------------------

    @staticmethod
    def user_id(user: int) -> str:
        return f"u{user}"

    @staticmethod
    def item_id(item: int) -> str:
        return f"i{item}"

    def item_category(self, item: int) -> str:
        return f"c{self.item_topic[item]}"

    def day_start_ms(self, day: int) -> int:
        return day_start_ms(date.fromisoformat(self.config.start_day) + timedelta(days=day))

    def day_name(self, day: int) -> str:
        return (date.fromisoformat(self.config.start_day) + timedelta(days=day)).isoformat()

    # --- interests -----------------------------------------------------------

    def _day_interests(self, day: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(interest at day start, interest after the switch, switch time ms)."""
        if day in self._interest_by_day:
            return self._interest_by_day[day]
        c = self.config
        if day == 0:
            start = self._initial_interest
        else:
            previous_start, previous_after, _ = self._day_interests(day - 1)
            start = previous_after
        rng = np.random.default_rng([c.seed, 1, day])
        drifts = rng.random(self.n_users) < c.drift_share
        new_topic = rng.integers(0, c.topics, size=self.n_users)
        after = start.copy()
        moved = 0.2 * start[drifts]
        moved[np.arange(drifts.sum()), new_topic[drifts]] += 0.8
        after[drifts] = moved
        switch_ms = np.where(drifts, self.day_start_ms(day) + rng.integers(0, DAY_MS, size=self.n_users), np.iinfo(np.int64).max)
        self._interest_by_day[day] = (start, after, switch_ms)
        return self._interest_by_day[day]

    def interest_at(self, user: int, ts_ms: int, day: int) -> np.ndarray:
        start, after, switch_ms = self._day_interests(day)
        return after[user] if ts_ms >= switch_ms[user] else start[user]

    def click_probability(self, interest: np.ndarray, items: np.ndarray, user: int | None = None) -> np.ndarray:
        base = 0.4 * interest[self.item_topic[items]] + 0.005
        if user is not None and self.config.pair_affinity:
            base = base + self.config.pair_affinity * (2.0 * self.pair_uniform(user, items) - 1.0)
        return np.clip(base, 0.0, 0.9)

    def pair_uniform(self, user: int, items: np.ndarray) -> np.ndarray:
        """A uniform [0, 1) number per (user, item), fixed by the seed: a
        splitmix64 hash of (seed, user, item), so it needs no table and is
        the same whichever day or request asks.

        >>> sim = Simulator(SimulatorConfig(users=3, items=5, seed=1))
        >>> bool((sim.pair_uniform(2, np.arange(5)) == sim.pair_uniform(2, np.arange(5))).all())
        True
        """
        with np.errstate(over="ignore"):
            x = np.uint64(self.config.seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(user) * np.uint64(0xBF58476D1CE4E5B9)
            x = x + np.asarray(items, np.uint64) * np.uint64(0x94D049BB133111EB)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
        return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)

    # --- traffic -------------------------------------------------------------

    def _request_times(self, day: int, rng: np.random.Generator) -> np.ndarray:
        """Request times (ms, sorted) with a day/night cycle, by rejection."""
        n = self.config.requests_per_day
        times: list[np.ndarray] = []
        have = 0
        while have < n:
            offsets = rng.random(2 * n) * DAY_MS
            hours = offsets / HOUR_MS
            rate = (1 + 0.8 * np.cos(2 * math.pi * (hours - 20) / 24)) / 1.8
            kept = offsets[rng.random(2 * n) < rate]
            times.append(kept)
            have += len(kept)
        offsets = np.sort(np.concatenate(times)[:n])
        return self.day_start_ms(day) + offsets.astype(np.int64)

    def _candidates(self, interest: np.ndarray, rng: np.random.Generator, day: int = 0, ts_ms: int | None = None) -> np.ndarray:
        c = self.config
        alive, popular_cdf, topic_pool, _ = self._pools(day)
        n_popular = c.candidates_per_request // 2
        popular = alive[np.minimum(np.searchsorted(popular_cdf, rng.random(n_popular) * popular_cdf[-1]), len(alive) - 1)]
        n_personal = c.candidates_per_request - n_popular
        cdf = np.cumsum(interest)
        topics = np.minimum(np.searchsorted(cdf, rng.random(n_personal) * cdf[-1]), c.topics - 1)
        personal = topic_pool[topics, rng.integers(0, topic_pool.shape[1], n_personal)]
        candidates = np.unique(np.minimum(np.concatenate([popular, personal]), self.n_items - 1))
        if ts_ms is not None and c.new_items_per_day:
            candidates = candidates[self.item_birth_ms[candidates] <= ts_ms]  # not born yet: not shown
        return rng.permutation(candidates)

    def requests(self, day: int) -> list[Request]:
        """Every request of ``day`` (0-based), in time order."""
        if day not in self._requests_by_day:
            self._requests_by_day[day] = self._generate_requests(day)
        return self._requests_by_day[day]

    def _generate_requests(self, day: int) -> list[Request]:
        rng = np.random.default_rng([self.config.seed, 2, day])
        return self._requests_at(day, self._request_times(day, rng), rng, f"d{day}")

    def live_requests(self, day: int, start_ms: int, seconds: float, rate: float) -> list[Request]:
        """Requests of ``day``'s world at a steady ``rate`` per second (Poisson
        arrivals) from ``start_ms`` for ``seconds``, for traffic made on the
        wall clock (``benchmarks/bench_live_freshness.py``); their clicks
        follow by ``click_delay_seconds`` as usual. Seeded by the start.

        >>> sim = Simulator(SimulatorConfig(users=50, items=40))
        >>> made = sim.live_requests(0, sim.day_start_ms(0) + 5_000, 2.0, 10.0)
        >>> 5 < len(made) < 40, all(sim.day_start_ms(0) + 5_000 <= r.ts_ms < sim.day_start_ms(0) + 7_000 for r in made)
        (True, True)
        """
        rng = np.random.default_rng([self.config.seed, 6, day, start_ms])
        count = int(rng.poisson(rate * seconds))
        times = start_ms + np.sort((rng.random(count) * seconds * 1000).astype(np.int64))
        return self._requests_at(day, times, rng, f"live{start_ms}")

    def _requests_at(self, day: int, times: np.ndarray, rng: np.random.Generator, prefix: str) -> list[Request]:
        """The requests at ``times`` (sorted ms): users drawn by activity, candidates, ranking, clicks."""
        c = self.config
        activity_cdf = self._pools(day)[3]
        users = np.searchsorted(activity_cdf, rng.random(len(times)) * activity_cdf[-1])
        for _ in range(20):  # a user drawn before their birth that day: drawn again
            unborn = np.flatnonzero(self.user_birth_ms[np.minimum(users, self.n_users - 1)] > times)
            if len(unborn) == 0:
                break
            users[unborn] = np.searchsorted(activity_cdf, rng.random(len(unborn)) * activity_cdf[-1])
        users = np.where(self.user_birth_ms[np.minimum(users, self.n_users - 1)] > times, 0, np.minimum(users, self.n_users - 1))
        requests = []
        for n, (ts, user) in enumerate(zip(times.tolist(), users.tolist())):
            interest = self.interest_at(user, ts, day)
            candidates = self._candidates(interest, rng, day, ts)
            if len(candidates) == 0:
                continue
            truth = self.click_probability(interest, candidates, user)
            scores = np.clip(truth + rng.normal(0, 0.1, len(candidates)), 0.0, 1.0)
            order = np.argsort(-scores, kind="stable")
            shown_n = min(c.items_per_request, len(candidates))
            shown, dropped = candidates[order[:shown_n]], candidates[order[shown_n:]]
            clicked = rng.random(shown_n) < truth[order[:shown_n]]
            delays = rng.exponential(c.click_delay_seconds * 1000, shown_n).astype(np.int64) + 500
            requests.append(
                Request(
                    request_id=f"{prefix}-r{n}",
                    user=user,
                    ts_ms=ts,
                    shown=shown,
                    clicked=clicked,
                    click_ts_ms=ts + delays,
                    dropped=dropped,
                    shown_scores=scores[order[:shown_n]],
                    dropped_scores=scores[order[shown_n:]],
                )
            )
        return requests

    # --- features ------------------------------------------------------------

    def user_features(self, user: int, ts_ms: int) -> dict:
        hour = (ts_ms % DAY_MS) / HOUR_MS
        return {
            "categorical": {
                "age_bucket": AGE_BUCKETS[self.user_age[user]],
                "city": f"city{self.user_city[user]}",
                "device": DEVICES[self.user_device[user]],
            },
            "numeric": {
                "activity_7d": round(math.log1p(7 * float(self.user_activity[user])) / 3, 4),
                "hour_sin": round(math.sin(2 * math.pi * hour / 24), 4),
                "hour_cos": round(math.cos(2 * math.pi * hour / 24), 4),
            },
        }

    # --- outputs: events -----------------------------------------------------

    def events(self, day: int) -> Iterator[tuple[str, dict]]:
        """(topic, event) pairs of ``day`` in event-time order: rank logs just
        before their impression, clicks after it."""
        return self.request_events(self.requests(day))

    def request_events(self, requests: Iterable[Request]) -> Iterator[tuple[str, dict]]:
        """(topic, event) pairs of ``requests`` in event-time order."""
        timed: list[tuple[int, int, str, dict]] = []
        for request in requests:
            ts = request.ts_ms
            features = self.user_features(request.user, ts)
            user_id = self.user_id(request.user)
            candidates = np.concatenate([request.shown, request.dropped])
            timed.append(
                (
                    ts - 50,
                    0,
                    "rank-logs",
                    {
                        "request_id": request.request_id,
                        "user_id": user_id,
                        "ts": ts - 50,
                        "stage": "rank",
                        "item_ids": [self.item_id(i) for i in candidates.tolist()],
                        "scores": [round(float(s), 4) for s in np.concatenate([request.shown_scores, request.dropped_scores])],
                        "kept": [True] * len(request.shown) + [False] * len(request.dropped),
                    },
                )
            )
            timed.append(
                (
                    ts,
                    1,
                    "impressions",
                    {
                        "event_id": f"imp-{request.request_id}",
                        "request_id": request.request_id,
                        "user_id": user_id,
                        "ts": ts,
                        "items": [
                            {"item_id": self.item_id(i), "position": p, "features": {"category": self.item_category(i)}}
                            for p, i in enumerate(request.shown.tolist())
                        ],
                        "user_features": features,
                    },
                )
            )
            for p in np.flatnonzero(request.clicked).tolist():
                item = int(request.shown[p])
                click_ts = int(request.click_ts_ms[p])
                timed.append(
                    (
                        click_ts,
                        2,
                        "clicks",
                        {
                            "event_id": f"clk-{request.request_id}-{item}",
                            "request_id": request.request_id,
                            "user_id": user_id,
                            "item_id": self.item_id(item),
                            "ts": click_ts,
                        },
                    )
                )
        timed.sort(key=lambda t: (t[0], t[1]))
        for _, _, topic, event in timed:
            yield topic, event

    def write_events(self, path: Path | str, days: range | list[int]) -> dict[str, int]:
        """Write days of events as JSONL (``{"topic": ..., "event": ...}``
        per line); returns counts per topic."""
        counts: dict[str, int] = {}
        with open(path, "w") as handle:
            for day in days:
                for topic, event in self.events(day):
                    handle.write(json.dumps({"topic": topic, "event": event}, separators=(",", ":")) + "\n")
                    counts[topic] = counts.get(topic, 0) + 1
        return counts

    # --- outputs: samples and batches (no Kafka) -----------------------------

    def samples(self, day: int) -> list[Sample]:
        """The training samples the streams join makes of ``day``'s events:
        one per shown item, label 1 at click time if clicked, else label 0
        at impression time; hard negatives are the rank-dropped items."""
        samples = []
        for request in self.requests(day):
            features = self.user_features(request.user, request.ts_ms)
            hard = tuple(self.item_id(i) for i in request.dropped.tolist())
            user_id = self.user_id(request.user)
            for p, item in enumerate(request.shown.tolist()):
                clicked = bool(request.clicked[p])
                samples.append(
                    Sample(
                        user_id=user_id,
                        item_id=self.item_id(item),
                        label=int(clicked),
                        event_time_ms=int(request.click_ts_ms[p]) if clicked else request.ts_ms,
                        request_id=request.request_id,
                        position=p,
                        user_categorical=features["categorical"],
                        user_numeric=features["numeric"],
                        item_categorical={"category": self.item_category(item)},
                        hard_negative_ids=hard,
                        teacher_score=float(request.shown_scores[p]),
                    )
                )
        return samples

    def write_batches(self, batches_dir: Path | str, days: int | Iterable[int], window_seconds: float = 60.0) -> list[BatchRef]:
        """Cut the samples of ``days`` (one day or several) into tumbling
        event-time windows and write them as batch files (what the streams
        worker does, minus Kafka). Write consecutive days in one call: a
        window across midnight holds samples of both days (a click just
        after midnight on an impression just before), and a batch file is
        written whole, so day-by-day calls would replace it."""
        window_ms = int(window_seconds * 1000)
        by_window: dict[int, list[Sample]] = {}
        for sample in (s for day in ([days] if isinstance(days, int) else days) for s in self.samples(day)):
            start = sample.event_time_ms - sample.event_time_ms % window_ms
            by_window.setdefault(start, []).append(sample)
        return [write_batch(Path(batches_dir), start, start + window_ms, by_window[start]) for start in sorted(by_window)]


def synthetic_click_samples(
    count: int,
    users: int,
    items: int,
    start_ms: int,
    span_ms: int,
    seed: int = 0,
    hard_negatives: int = 8,
    item_exponent: float | None = 1.3,
) -> list[Sample]:
    """``count`` clicked samples over ``users`` x ``items`` with Zipf-like
    popularity on both sides, in time order: volume for benchmarks, where
    the simulator's per-request realism would cost minutes to generate.
    ``item_exponent`` is the items' Zipf exponent; None draws them uniformly."""
    rng = np.random.default_rng(seed)
    user_draws = np.minimum(rng.zipf(1.2, size=count) - 1, users - 1)
    user_draws = (user_draws * 2654435761 + rng.integers(0, users, size=count) * (rng.random(count) < 0.5)) % users
    if item_exponent is None:
        item_draws = rng.integers(0, items, size=count)
    else:
        item_draws = np.minimum(rng.zipf(item_exponent, size=count) - 1, items - 1)
    hard = rng.integers(0, items, size=(count, hard_negatives))
    times = start_ms + np.sort(rng.integers(0, span_ms, size=count))
    categorical = [
        {"age_bucket": AGE_BUCKETS[a], "city": f"city{c}", "device": DEVICES[d]}
        for a, c, d in zip(rng.integers(0, len(AGE_BUCKETS), 64), rng.integers(0, 30, 64), rng.integers(0, len(DEVICES), 64))
    ]
    numeric = [{"activity_7d": float(a), "hour_sin": 0.5, "hour_cos": 0.5} for a in np.round(rng.random(64), 3)]
    samples = []
    for n in range(count):
        user = int(user_draws[n])
        item = int(item_draws[n])
        samples.append(
            Sample(
                user_id=f"u{user}",
                item_id=f"i{item}",
                label=1,
                event_time_ms=int(times[n]),
                request_id=f"s{seed}-r{n}",
                position=n % 10,
                user_categorical=categorical[user % 64],
                user_numeric=numeric[user % 64],
                item_categorical={"category": f"c{item % 20}"},
                hard_negative_ids=tuple(f"i{h}" for h in hard[n].tolist()),
            )
        )
    return samples
