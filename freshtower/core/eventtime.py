"""Event time: the units and the UTC calendar every stage counts in.

Event times are integer milliseconds since the epoch (UTC), as the events
carry them and the batch files store them. Days are UTC days: a daily
full model covers ``[day_start_ms(day), day_start_ms(day) + DAY_MS)``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
DAY_SECONDS = DAY_MS // SECOND_MS


def floor_ms(ms: int, unit_ms: int) -> int:
    """The start of the ``unit_ms`` period holding ``ms`` (hour, day, window).

    >>> floor_ms(1_700_000_040_000, HOUR_MS), floor_ms(1_700_000_040_000, DAY_MS)
    (1699999200000, 1699920000000)
    """
    return ms - ms % unit_ms


def day_of(ms: int) -> date:
    """The UTC day holding ``ms``.

    >>> day_of(1_700_000_040_000)
    datetime.date(2023, 11, 14)
    """
    return datetime.fromtimestamp(ms / 1000, tz=UTC).date()


def day_name(ms: int) -> str:
    """``YYYY-MM-DD`` of the UTC day holding ``ms`` (how models and batch folders name days).

    >>> day_name(1_700_000_040_000)
    '2023-11-14'
    """
    return day_of(ms).isoformat()


def day_start_ms(day: date) -> int:
    """00:00 UTC of ``day``, in ms.

    >>> day_start_ms(date(2023, 11, 14)) == floor_ms(1_700_000_040_000, DAY_MS)
    True
    """
    return int(datetime.combine(day, datetime.min.time(), tzinfo=UTC).timestamp() * 1000)
