"""The ``dead-letters`` topic: events the join could not use, with why and
where they came from, so they can be inspected and replayed.

One JSON object per dead letter, keyed by the original message key::

    {"code": "missing_field", "reason": "click: missing field 'item_id'",
     "source": {"topic": "clicks", "partition": 2, "offset": 1234},
     "key_base64": "dTEy", "value_base64": "eyJldmVudF9pZCI6...",
     "value_bytes": 97, "value_sha256": "...", "value_truncated": false}

The original bytes travel base64-encoded, exactly. A payload larger than
``keep_bytes`` (an oversized event, which would also overflow Kafka's
default 1 MB message limit) keeps its first ``keep_bytes`` bytes and says
so, with the full length and SHA-256.
"""

from __future__ import annotations

import base64

import orjson
from freshtower.streams.join import DeadLetter

from freshtower.core.storage import sha256_bytes


def encode_dead_letter(letter: DeadLetter, keep_bytes: int) -> bytes:
    value = letter.value or b""
    kept = value[:keep_bytes]
    return orjson.dumps(
        {
            "code": letter.code,
            "reason": letter.reason,
            "source": {"topic": letter.topic, "partition": letter.partition, "offset": letter.offset},
            "key_base64": None if letter.key is None else base64.b64encode(letter.key).decode(),
            "value_base64": None if letter.value is None else base64.b64encode(kept).decode(),
            "value_bytes": len(value),
            "value_sha256": sha256_bytes(value),
            "value_truncated": len(kept) < len(value),
        }
    )


def decode_dead_letter(payload: bytes) -> dict:
    """The envelope with ``key`` and ``value`` decoded back to bytes."""
    envelope = orjson.loads(payload)
    envelope["key"] = None if envelope["key_base64"] is None else base64.b64decode(envelope["key_base64"])
    envelope["value"] = None if envelope["value_base64"] is None else base64.b64decode(envelope["value_base64"])
    return envelope
