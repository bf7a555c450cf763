"""MovieLens-100k as a replayable event stream.

The data (100,000 timestamped ratings, 943 users with age/gender/occupation,
1,682 items with genres) ships inside the PyPI wheel ``recbole==1.2.1``
under ``recbole/dataset_example/ml-100k/``. Its terms forbid
redistribution, so it is never committed: install it as an optional extra
with ``pip install --no-deps recbole==1.2.1`` (``make setup`` does) and this
module reads the files by path, without importing recbole.

The mapping to our events, and its limits:

- A *request* is one user's ratings that share a timestamp (MovieLens
  records a rating session in bursts): an ``impressions`` event at that
  time showing those movies, in file order.
- A rating >= 4 is a *click* on that impression, one second later; a
  rating <= 3 is an item shown and not clicked. So every impression is of
  a movie the user chose to rate: there is no record of movies shown and
  ignored, and 55% of impressions are clicked, far above any real CTR.
- There is no ranking stage: no ``rank-logs``, so no hard negatives and no
  teacher scores (the 50/50 easy/hard mix degrades to easy only).
- User features: ``age_bucket``, ``gender``, ``occupation``; item feature
  ``category`` = the first listed genre. Continuous: hour of day.
- Time: the ratings span 215 days (1997-09-20 to 1998-04-22) and most users
  rate everything in one session (median span 49 minutes). ``time_scale``
  compresses time (2.0 makes 215 days into 107.5) if a run must be shorter;
  1.0 keeps real time.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from freshtower.core.eventtime import DAY_MS, HOUR_MS, floor_ms
from freshtower.core.settings import Settings

AGE_BUCKETS = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (55, "45-54"), (200, "55+"))
USER_CATEGORICAL = ("age_bucket", "gender", "occupation")
USER_NUMERIC = ("hour_sin", "hour_cos")
ITEM_CATEGORICAL = ("category",)
# The model's features for this data (fields of the settings' ``model`` section).
MODEL_FEATURES = {"user_categorical": USER_CATEGORICAL, "user_numeric": USER_NUMERIC, "item_categorical": ITEM_CATEGORICAL}


def with_features(settings: Settings) -> Settings:
    """``settings`` with the model's features set to this data's (``MODEL_FEATURES``)."""
    return settings.model_copy(update={"model": settings.model.model_copy(update=MODEL_FEATURES)})


class DatasetMissing(FileNotFoundError):
    """MovieLens-100k is not installed."""


def dataset_dir() -> Path:
    """Where the recbole wheel put ml-100k (raises with the install command)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissing("MovieLens-100k needs the recbole wheel: pip install --no-deps recbole==1.2.1 (or make movielens)")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").is_file():
        raise DatasetMissing(f"{path}/ml-100k.inter is missing: reinstall recbole==1.2.1")
    return path


def _rows(path: Path) -> Iterator[list[str]]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        next(handle)  # header: name:type columns
        for line in handle:
            yield line.rstrip("\n").split("\t")


def _age_bucket(age: int) -> str:
    for bound, name in AGE_BUCKETS:
        if age < bound:
            return name
    return AGE_BUCKETS[-1][1]


@dataclass(frozen=True)
class MovieLensStream:
    events: list[tuple[str, dict]]  # (topic, event) in event-time order
    first_ms: int
    last_ms: int
    ratings: int
    clicks: int


def load_events(directory: Path | None = None, time_scale: float = 1.0) -> MovieLensStream:
    """The ratings as impression and click events, in event-time order."""
    if time_scale <= 0:
        raise ValueError(f"time_scale must be positive, got {time_scale}")
    directory = directory or dataset_dir()
    users = {r[0]: {"age_bucket": _age_bucket(int(r[1])), "gender": r[2], "occupation": r[3]} for r in _rows(directory / "ml-100k.user")}
    genres = {r[0]: (r[3].split(" ")[0] if len(r) > 3 and r[3] else "unknown") for r in _rows(directory / "ml-100k.item")}
    ratings = sorted(
        ((int(float(r[3])), r[0], r[1], float(r[2])) for r in _rows(directory / "ml-100k.inter")),
        key=lambda t: (t[0], t[1]),
    )
    origin = ratings[0][0]
    requests: dict[tuple[str, int], list[tuple[str, float]]] = {}
    for ts, user, item, rating in ratings:
        requests.setdefault((user, ts), []).append((item, rating))
    timed: list[tuple[int, int, str, dict]] = []
    clicks = 0
    for (user, ts), shown in requests.items():
        ts_ms = int((origin + (ts - origin) / time_scale) * 1000)
        request_id = f"ml-{user}-{ts}"
        hour = (ts_ms % DAY_MS) / HOUR_MS
        timed.append(
            (
                ts_ms,
                0,
                "impressions",
                {
                    "event_id": f"imp-{request_id}",
                    "request_id": request_id,
                    "user_id": f"u{user}",
                    "ts": ts_ms,
                    "items": [
                        {"item_id": f"m{item}", "position": p, "features": {"category": genres.get(item, "unknown")}}
                        for p, (item, _) in enumerate(shown)
                    ],
                    "user_features": {
                        "categorical": users.get(user, {}),
                        "numeric": {
                            "hour_sin": round(math.sin(2 * math.pi * hour / 24), 4),
                            "hour_cos": round(math.cos(2 * math.pi * hour / 24), 4),
                        },
                    },
                },
            )
        )
        for item, rating in shown:
            if rating >= 4:
                clicks += 1
                timed.append(
                    (
                        ts_ms + 1000,
                        1,
                        "clicks",
                        {
                            "event_id": f"clk-{request_id}-{item}",
                            "request_id": request_id,
                            "user_id": f"u{user}",
                            "item_id": f"m{item}",
                            "ts": ts_ms + 1000,
                        },
                    )
                )
    timed.sort(key=lambda t: (t[0], t[1]))
    return MovieLensStream(
        events=[(topic, event) for _, _, topic, event in timed],
        first_ms=timed[0][0],
        last_ms=timed[-1][0],
        ratings=len(ratings),
        clicks=clicks,
    )


def write_events(path: Path | str, stream: MovieLensStream) -> dict[str, int]:
    """JSONL in the replay format (``{"topic": ..., "event": ...}`` lines)."""
    counts: dict[str, int] = {}
    with open(path, "w") as handle:
        for topic, event in stream.events:
            handle.write(json.dumps({"topic": topic, "event": event}, separators=(",", ":")) + "\n")
            counts[topic] = counts.get(topic, 0) + 1
    return counts


def first_days(stream: MovieLensStream, days: int) -> MovieLensStream:
    """The requests of the first ``days`` UTC days (from the first rating's
    day) and their clicks."""
    end_ms = floor_ms(stream.first_ms, DAY_MS) + days * DAY_MS
    kept = {e["request_id"] for topic, e in stream.events if topic == "impressions" and e["ts"] < end_ms}
    events = [(topic, e) for topic, e in stream.events if e["request_id"] in kept]
    return MovieLensStream(events, stream.first_ms, events[-1][1]["ts"], stream.ratings, sum(t == "clicks" for t, _ in events))


def write_first_days(path: Path, days: int | None = None) -> dict[str, int]:
    """The first ``days`` days (real time; all when None) as a replay-format
    event log, for ``freshtower.app.streamed_batches``: the same impressions
    and clicks ``write_batches`` joins offline."""
    stream = load_events()
    return write_events(path, stream if days is None else first_days(stream, days))


def write_batches(batches_dir: Path, window_seconds: float, time_scale: float = 1.0, max_days: int | None = None) -> int:
    """The ratings as batch files, without Kafka: each rating an impression
    record, label 1 at the click time for ratings >= 4. The join is the
    trivial one the data allows (every click's impression is in the same
    request); the Kafka path is ``write_first_days`` + a streams worker.
    Returns the number of batch windows written."""
    from freshtower.core.batches import Sample, write_batch

    stream = load_events(time_scale=time_scale)
    end_ms = None if max_days is None else floor_ms(stream.first_ms, DAY_MS) + max_days * DAY_MS
    click_ms: dict[tuple[str, str], int] = {}
    for topic, event in stream.events:
        if topic == "clicks":
            click_ms[(event["request_id"], event["item_id"])] = event["ts"]
    window_ms = int(window_seconds * 1000)
    by_window: dict[int, list[Sample]] = {}
    for topic, event in stream.events:
        if topic != "impressions" or (end_ms is not None and event["ts"] >= end_ms):
            continue
        features = event["user_features"]
        for shown in event["items"]:
            key = (event["request_id"], shown["item_id"])
            ts = click_ms.get(key, event["ts"])
            sample = Sample(
                user_id=event["user_id"],
                item_id=shown["item_id"],
                label=int(key in click_ms),
                event_time_ms=ts,
                request_id=event["request_id"],
                position=shown["position"],
                user_categorical=dict(features["categorical"]),
                user_numeric=dict(features["numeric"]),
                item_categorical=dict(shown.get("features", {})),
                hard_negative_ids=(),
                teacher_score=None,
            )
            by_window.setdefault(floor_ms(ts, window_ms), []).append(sample)
    for start in sorted(by_window):
        write_batch(batches_dir, start, start + window_ms, by_window[start])
    return len(by_window)
