"""Tumbling event-time windows and when they close. Pure functions of
milliseconds; the worker passes time in.

A window ``[start, start + width)`` closes once the watermark (the largest
event time seen) passes ``start + width + allowed_lateness``. Windows close
in order, so the state of the cut is one number, ``open_from``: every
window starting before it is closed, every later one is open. A record
whose own window is already closed goes to the first open window, marked
late; nothing is dropped.
"""

from __future__ import annotations


def window_start(ts_ms: int, width_ms: int) -> int:
    """Start of the tumbling window holding ``ts_ms``.

    >>> window_start(125_000, 60_000)
    120000
    >>> window_start(120_000, 60_000)
    120000
    """
    return ts_ms - ts_ms % width_ms


def assign_window(ts_ms: int, width_ms: int, open_from_ms: int | None) -> tuple[int, bool]:
    """(window start, late) for a record at ``ts_ms``: its own window, or
    the first open one when its own is closed.

    >>> assign_window(125_000, 60_000, None)
    (120000, False)
    >>> assign_window(125_000, 60_000, 180_000)
    (180000, True)
    """
    start = ts_ms - ts_ms % width_ms
    if open_from_ms is not None and start < open_from_ms:
        return open_from_ms, True
    return start, False


def open_from_after(watermark_ms: int, width_ms: int, lateness_ms: int) -> int:
    """Start of the first window still open at ``watermark_ms``: windows
    whose end plus lateness is at or below the watermark are closed.

    >>> open_from_after(190_000, 60_000, 10_000)  # [120 s, 180 s) closes at 190 s
    180000
    >>> open_from_after(189_999, 60_000, 10_000)
    120000
    """
    cut = watermark_ms - lateness_ms
    return cut - cut % width_ms
