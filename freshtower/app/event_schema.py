"""An events file (the ``freshtower replay`` JSONL format) against the configured feature schema.

The schema is the configuration's ``model`` section: ``user_categorical``
and ``user_numeric`` (the names in each impression's ``user_features``
``categorical`` and ``numeric`` groups) and ``item_categorical`` (the
names in each shown item's ``features``). ``check_schema`` reads the file
once and refuses it, naming the feature and the first line where it was
expected, when a configured feature never appears or a numeric one is
not a number; features in the file that are not configured are listed
(the model ignores them). ``first_days`` keeps the file's first days.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import orjson

from freshtower.core.eventtime import DAY_MS, floor_ms
from freshtower.core.settings import Settings


class SchemaMismatch(ValueError):
    """The events do not carry the configured features."""


@dataclass
class SchemaReport:
    impressions: int = 0
    seen: dict[str, set[str]] = field(default_factory=lambda: {"categorical": set(), "numeric": set(), "item": set()})
    ignored: dict[str, set[str]] = field(default_factory=lambda: {"categorical": set(), "numeric": set(), "item": set()})

    def describe(self) -> str:
        extra = {k: sorted(v) for k, v in self.ignored.items() if v}
        return f"features as configured in {self.impressions:,} impressions" + (f", not configured (ignored): {extra}" if extra else "")


@dataclass(frozen=True)
class KeptDays:
    events: int
    days: int
    counts: dict[str, int]


def check_schema(path: Path, settings: Settings) -> SchemaReport:
    """Check every impression of ``path`` against ``settings.model``'s features (see the module docstring)."""
    m = settings.model
    wanted = {"categorical": set(m.user_categorical), "numeric": set(m.user_numeric), "item": set(m.item_categorical)}
    report = SchemaReport()
    first_line = None
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = orjson.loads(line)
            if record.get("topic") not in ("impressions", settings.topics.impressions):
                continue
            event = record.get("event") or {}
            first_line = first_line or line_number
            report.impressions += 1
            features = event.get("user_features") or {}
            for group in ("categorical", "numeric"):
                for name, value in (features.get(group) or {}).items():
                    if name in wanted[group]:
                        report.seen[group].add(name)
                        if group == "numeric" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                            raise SchemaMismatch(f"{path}:{line_number}: user feature {name!r} is configured numeric, got {value!r}")
                    else:
                        report.ignored[group].add(name)
            for item in event.get("items") or []:
                for name in (item.get("features") or {}):
                    (report.seen if name in wanted["item"] else report.ignored)["item"].add(name)
    if report.impressions == 0:
        raise SchemaMismatch(f"{path}: no impressions events")
    kinds = {"categorical": "model.user_categorical", "numeric": "model.user_numeric", "item": "model.item_categorical"}
    for group, names in wanted.items():
        missing = sorted(names - report.seen[group])
        if missing:
            raise SchemaMismatch(
                f"{path}: configured feature(s) {missing} ({kinds[group]}) never appear in its impressions (first at line {first_line}); "
                f"set the model's features to the log's: {kinds[group]} = {sorted(report.seen[group] | report.ignored[group])}"
            )
    return report


def first_days(source: Path, target: Path, days: int | None) -> KeptDays:
    """Copy the events of ``source``'s first ``days`` UTC days (from its earliest event's day; all when None) to ``target``."""
    lines = [line for line in source.read_bytes().splitlines() if line.strip()]
    times = [orjson.loads(line)["event"]["ts"] for line in lines]
    if not times:
        raise SchemaMismatch(f"{source}: no events")
    start = floor_ms(min(times), DAY_MS)
    end = None if days is None else start + days * DAY_MS
    counts: dict[str, int] = {}
    kept = 0
    with open(target, "wb") as handle:
        for line, ts in zip(lines, times):
            if end is None or ts < end:
                handle.write(line + b"\n")
                topic = orjson.loads(line)["topic"]
                counts[topic] = counts.get(topic, 0) + 1
                kept += 1
    last = max(t for t in times if end is None or t < end)
    return KeptDays(kept, (floor_ms(last, DAY_MS) - start) // DAY_MS + 1, counts)
