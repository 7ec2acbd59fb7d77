"""How the console writes figures: dollars, seconds, moments (UTC) and shares. Pure; the templates' filters."""

from __future__ import annotations

from datetime import UTC, datetime

DASH = "—"


def usd(dollars: float | None) -> str:
    """$1,234.50; a figure under a cent keeps its micro-dollars ($0.0042) so that it never reads as nothing."""
    if dollars is None:
        return DASH
    if 0 < abs(dollars) < 0.01:
        return f"${dollars:.6f}".rstrip("0")
    return f"${dollars:,.2f}"


def micros(amount: int | None) -> str:
    return DASH if amount is None else usd(amount / 1_000_000)


def seconds(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:,.1f} s" if value % 1 else f"{value:,.0f} s"


def when(moment: float | None) -> str:
    """A unix time as the minute it falls in, in UTC (every replica and reader agree on it)."""
    if not moment:
        return DASH
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M UTC")


def when_exact(moment: float | None) -> str:
    if not moment:
        return DASH
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def share(part: float | None, whole: float | None) -> int:
    """Part of whole in whole percent (0 when there is no whole), capped at 999 for the display."""
    if not whole or part is None:
        return 0
    return min(999, round(100 * part / whole))


FILTERS = {
    "usd": usd,
    "micros": micros,
    "seconds": seconds,
    "when": when,
    "when_exact": when_exact,
}
