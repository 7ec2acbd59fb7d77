"""Cost estimates and settlement amounts, exact in integer micro-dollars."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from gateway.money import cost_micros, seconds_to_ms

MAX_INPUT_VIDEO_S = 15
Pricing = Mapping[str, Mapping[str, int]]  # model → resolution → micro-dollars per second


def estimate(pricing: Pricing, model: str, resolution: str, input_s: Decimal, duration_s: int) -> tuple[int, int]:
    """(billed milliseconds, micro-dollars) reserved at create."""
    if not input_s:  # the common case, no input videos: whole seconds, exact in integers
        return duration_s * 1000, duration_s * pricing[model][resolution]
    seconds = Decimal(input_s) + duration_s
    return seconds_to_ms(seconds), cost_micros(seconds, pricing[model][resolution])


def actual(
    pricing: Pricing,
    model: str,
    resolution: str,
    input_s: Decimal,
    status: str,
    video_duration: Decimal | int | float | None,
) -> tuple[int, int]:
    """(billed milliseconds, micro-dollars) at the first terminal status; only delivered videos cost."""
    if status != "succeeded":
        return 0, 0
    seconds = Decimal(input_s) + Decimal(str(video_duration or 0))
    return seconds_to_ms(seconds), cost_micros(seconds, pricing[model][resolution])
