from __future__ import annotations

import random

from freshtower.streams.windows import assign_window, open_from_after, window_start


def test_a_record_goes_to_its_own_window_or_the_first_open_one_never_earlier():
    rng = random.Random(0)
    for _ in range(2000):
        width = rng.choice([5_000, 60_000, 600_000])
        ts = rng.randrange(0, 10**13)
        open_from = rng.choice([None, window_start(ts + rng.randrange(-10**7, 10**7), width)])
        start, late = assign_window(ts, width, open_from)
        assert start % width == 0
        own = window_start(ts, width)
        assert late == (open_from is not None and own < open_from)
        assert start == (open_from if late else own)


def test_windows_close_in_order_as_the_watermark_passes_end_plus_lateness():
    width, lateness = 60_000, 10_000
    previous = None
    for watermark in range(10_000, 1_000_000, 7_919):
        open_from = open_from_after(watermark, width, lateness)
        assert open_from % width == 0
        assert open_from + lateness <= watermark  # the window ending at open_from has closed ...
        assert open_from + width + lateness > watermark  # ... the one starting there has not
        assert previous is None or open_from >= previous  # never reopens
        previous = open_from
