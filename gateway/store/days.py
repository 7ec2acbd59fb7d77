"""Whole UTC days as day numbers since the epoch: the bounds both stores' per-day figures are read by."""

from __future__ import annotations

import math

DAY_S = 86_400


def day_at_or_after(moment: float) -> int:
    """The first day that starts at or after `moment`."""
    day = math.floor(moment / DAY_S)
    while day * DAY_S < moment:  # int against float: Python compares them exactly
        day += 1
    while (day - 1) * DAY_S >= moment:
        day -= 1
    return day


def day_at_or_before(moment: float) -> int:
    """The last day that starts at or before `moment`."""
    day = math.floor(moment / DAY_S)
    while day * DAY_S > moment:
        day -= 1
    while (day + 1) * DAY_S <= moment:
        day += 1
    return day
