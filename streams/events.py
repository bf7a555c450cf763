"""The three input event streams and their validation.

All events are JSON objects, produced keyed by ``user_id`` (UTF-8) so that
one user's impressions, clicks and rank logs share a partition number on
the three topics. Timestamps ``ts`` are integer milliseconds since the Unix
epoch, UTC (event time).

``impressions`` (one per recommendation request)::

    {"event_id": "imp-d0-r7", "request_id": "d0-r7", "user_id": "u12",
     "ts": 1763596812345,
     "items": [{"item_id": "i3", "position": 0, "features": {"category": "c4"}}, ...],
     "user_features": {"categorical": {"age_bucket": "25-34", "city": "city7", "device": "ios"},
                       "numeric": {"activity_7d": 0.52, "hour_sin": 0.1, "hour_cos": 0.99}}}

``clicks``::

    {"event_id": "clk-d0-r7-3", "request_id": "d0-r7", "user_id": "u12",
     "item_id": "i3", "ts": 1763596831000}

``rank-logs`` (what a ranking stage did with the retrieved candidates)::

    {"request_id": "d0-r7", "user_id": "u12", "ts": 1763596812295, "stage": "rank",
     "item_ids": ["i3", "i9", "i40"], "scores": [0.31, 0.22, 0.05],
     "kept": [true, true, false]}

Item ``features`` and ``user_features`` are optional, unknown fields are
ignored (producers may add fields), everything else is required and typed
strictly (no "5" for 5, no true for 1, no 5.0 for a timestamp).

Validation is pure: bytes in, a typed event or ``InvalidEvent`` (a stable
``code`` for metrics and a message naming the field) out. msgspec decodes
and checks types and bounds in one pass, ~10x faster than checking the
parsed JSON in Python (which capped the worker). IDs become dict keys and
values in batch files, never paths, but they must be non-empty, bounded,
and free of control characters (the batch reader joins IDs with NUL).
Timestamps relative to the watermark are checked by the join
(``streams/join.py``), which knows the watermark.
"""

# No "from __future__ import annotations": msgspec reads the field types of
# the classes built inside _event_types at runtime.

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

import msgspec

IMPRESSION = "impression"
CLICK = "click"
RANK_LOG = "rank_log"
KINDS = (IMPRESSION, CLICK, RANK_LOG)

MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z; the JSON integer must fit an int64 anyway

# C0 and C1 control characters and DEL; IDs end up NUL-joined in the batch
# reader, so NUL in particular must never get through.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# In JSON text a C0 control can only hide in an escape (raw ones are
# invalid JSON), DEL is the byte 7f and a C1 control is UTF-8 C2 80-9F or
# an escape: a payload with none of these cannot hold one, so most events
# skip the per-string search (three byte scans first: a regex with an
# alternation costs ~7 us on a typical impression).
_MAYBE_CONTROL = re.compile(rb"[\\\x7f]|\xc2[\x80-\x9f]")


class InvalidEvent(ValueError):
    """An event that cannot be used, with a stable ``code`` (a metric label)
    and a message saying what and where."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Bounds on untrusted input (from ``StreamsConfig``)."""

    max_event_bytes: int = 256 * 1024
    max_id_length: int = 256
    max_items: int = 1000
    max_features: int = 64


def _event_types(limits: Limits) -> tuple[type, ...]:
    """The event classes, with ``limits`` in their field types: msgspec
    checks bounds while it decodes. Built once for the default limits (the
    module's classes below) and again for other limits (same fields)."""
    Id = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.max_id_length)]
    Ts = Annotated[int, msgspec.Meta(ge=0, le=MAX_TS_MS)]
    Position = Annotated[int, msgspec.Meta(ge=0, lt=1_000_000)]
    Score = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]  # batch files keep teacher scores in [0, 1]
    Categorical = Annotated[dict[Id, Id], msgspec.Meta(max_length=limits.max_features)]
    Numeric = Annotated[dict[Id, float], msgspec.Meta(max_length=limits.max_features)]
    n_items = msgspec.Meta(max_length=limits.max_items)

    # gc=False: no reference cycles, and skipping the cycle collector's
    # bookkeeping matters at tens of thousands of events a second.
    class ShownItem(msgspec.Struct, frozen=True, gc=False):
        item_id: Id
        position: Position
        features: Categorical = {}  # item categorical features

    class UserFeatures(msgspec.Struct, frozen=True, gc=False):
        categorical: Categorical = {}
        numeric: Numeric = {}

    class Impression(msgspec.Struct, frozen=True, gc=False):
        event_id: Id
        request_id: Id
        user_id: Id
        ts: Ts  # ms since epoch, event time
        items: Annotated[list[ShownItem], msgspec.Meta(min_length=1, max_length=limits.max_items)]
        user_features: UserFeatures = msgspec.field(default_factory=UserFeatures)

    class Click(msgspec.Struct, frozen=True, gc=False):
        event_id: Id
        request_id: Id
        user_id: Id
        item_id: Id
        ts: Ts

    class RankLog(msgspec.Struct, frozen=True, gc=False):
        request_id: Id
        user_id: Id
        ts: Ts
        stage: Id
        item_ids: Annotated[list[Id], n_items]
        scores: Annotated[list[Score], n_items]
        kept: Annotated[list[bool], n_items]

        @property
        def event_id(self) -> str:
            """Rank logs carry no event ID: one per (request, stage)."""
            return f"{self.request_id}/{self.stage}"

    return ShownItem, UserFeatures, Impression, Click, RankLog


ShownItem, UserFeatures, Impression, Click, RankLog = _event_types(Limits())
Event = Impression | Click | RankLog


@lru_cache(maxsize=8)
def _decoders(limits: Limits) -> dict[str, msgspec.json.Decoder]:
    if limits == Limits():
        types = (Impression, Click, RankLog)
    else:
        types = _event_types(limits)[2:]
    return {kind: msgspec.json.Decoder(t) for kind, t in zip((IMPRESSION, CLICK, RANK_LOG), types)}


def _code_for(message: str) -> str:
    if "missing required field" in message:
        return "missing_field"
    if ", got `" in message:
        return "wrong_type"
    if message.endswith("`$.ts`"):
        return "bad_timestamp"
    if "length" in message and ("_id" in message or "stage" in message) and "$.items`" not in message:
        return "bad_id"
    return "bad_value"


def _strings(kind: str, event) -> list[tuple[str, str]]:
    """(field path, string) of every string in an event, for the rare check."""
    if kind == CLICK:
        return [("event_id", event.event_id), ("request_id", event.request_id), ("user_id", event.user_id), ("item_id", event.item_id)]
    if kind == RANK_LOG:
        return [("request_id", event.request_id), ("user_id", event.user_id), ("stage", event.stage)] + [
            (f"item_ids[{n}]", i) for n, i in enumerate(event.item_ids)
        ]
    out = [("event_id", event.event_id), ("request_id", event.request_id), ("user_id", event.user_id)]
    for n, item in enumerate(event.items):
        out.append((f"items[{n}].item_id", item.item_id))
        out.extend((f"items[{n}].features", s) for kv in item.features.items() for s in kv)
    for group in ("categorical", "numeric"):
        features = getattr(event.user_features, group)
        out.extend((f"user_features.{group}", s) for k, v in features.items() for s in ((k, v) if group == "categorical" else (k,)))
    return out


def parse_event(kind: str, key: bytes | None, value: bytes | None, limits: Limits = Limits()) -> Event:
    """Validate one Kafka message of ``kind`` (``IMPRESSION``, ``CLICK`` or
    ``RANK_LOG``) and return the typed event; raise ``InvalidEvent``.

    >>> parse_event(CLICK, b"u1", b'{"event_id":"c1","request_id":"r1","user_id":"u1","item_id":"i9","ts":5}')
    Click(event_id='c1', request_id='r1', user_id='u1', item_id='i9', ts=5)
    >>> parse_event(CLICK, b"u1", b'{"event_id":"c1","request_id":"r1","user_id":"u1","ts":5}')
    Traceback (most recent call last):
    ...
    freshtower.streams.events.InvalidEvent: click: Object missing required field `item_id`
    """
    if value is None:
        raise InvalidEvent("empty_message", f"{kind}: empty message (no value: a tombstone or a producer that sent none)")
    if not value.strip():
        raise InvalidEvent("empty_message", f"{kind}: empty message ({len(value)} bytes{', whitespace only' if value else ''})")
    if len(value) > limits.max_event_bytes:
        raise InvalidEvent("oversized", f"{kind}: payload is {len(value):,} bytes (limit {limits.max_event_bytes:,})")
    try:
        event = _decoders(limits)[kind].decode(value)
    except msgspec.ValidationError as error:
        raise InvalidEvent(_code_for(str(error)), f"{kind}: {error}") from None
    except msgspec.DecodeError as error:
        raise InvalidEvent("invalid_json", f"{kind}: not valid JSON ({error})") from None
    if (b"\\" in value or b"\x7f" in value or b"\xc2" in value) and _MAYBE_CONTROL.search(value) is not None:
        for where, text in _strings(kind, event):
            if _CONTROL.search(text):
                raise InvalidEvent("bad_id", f"{kind}: {where} contains a control character: {text[:40]!r}")
    if kind == IMPRESSION:
        item_ids = [i.item_id for i in event.items]
        if len(set(item_ids)) != len(item_ids):
            raise InvalidEvent("bad_value", f"impression: request {event.request_id!r} shows an item twice")
    elif kind == RANK_LOG:
        if not len(event.item_ids) == len(event.scores) == len(event.kept):
            raise InvalidEvent(
                "bad_value",
                f"rank_log: item_ids, scores and kept differ in length ({len(event.item_ids)}, {len(event.scores)}, {len(event.kept)})",
            )
        if len(set(event.item_ids)) != len(event.item_ids):
            raise InvalidEvent("bad_value", f"rank_log: stage {event.stage!r} of request {event.request_id!r} lists an item twice")
    if key != event.user_id.encode():
        shown = repr(key) if key is None or len(key) <= 60 else repr(key[:57]) + "..."
        raise InvalidEvent("key_mismatch", f"{kind}: message key {shown} is not the event's user_id {event.user_id!r}")
    return event


def event_to_json(event: Event) -> bytes:
    """The JSON of an event (inverse of ``parse_event``), for producers and tests."""
    return msgspec.json.encode(event)
