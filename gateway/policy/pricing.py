"""Cost estimates and settlement amounts, exact in integer micro-dollars."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

MAX_INPUT_VIDEO_S = 15
Pricing = Mapping[str, Mapping[str, int]]  # model → resolution → micro-dollars per second
MICROS = Decimal(1_000_000)


def usd_to_micros(value: Any) -> int:
    """Exact dollars → integer micro-dollars, rounding half up (floats go through their shortest repr)."""
    d = Decimal(str(value)) * MICROS
    return int(d.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def micros_to_usd(micros: int) -> float:
    return round(micros / 1_000_000, 6)


def cost_micros(seconds: Decimal | int, price_micros: int) -> int:
    """seconds × price, rounded half up to a whole micro-dollar."""
    exact = Decimal(seconds) * price_micros
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def seconds_to_ms(seconds: Decimal | int | float) -> int:
    """Billed seconds are kept as integer milliseconds."""
    if not seconds:
        return 0
    if isinstance(seconds, int):
        return seconds * 1000
    exact = Decimal(str(seconds)) * 1000
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


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
