"""Money and billed time as exact integers: micro-dollars and milliseconds, rounded half up."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

MICROS = Decimal(1_000_000)


def usd_to_micros(value: Any) -> int:
    """Exact dollars → integer micro-dollars, rounding half up (floats go through their shortest repr)."""
    exact = Decimal(str(value)) * MICROS
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


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
