"""Budget alerts as the stores see them (SPEC §15): the thresholds a settlement checks, in the same atomic step
that moves the spent counters, and the ones it reached first.

A threshold t of a subject (a team or user in one period) is reached when its spent dollars reach t × its dollar
budget, or its spent milliseconds t × its video-seconds budget. Each is sent once per period across every
replica: the step that finds it reached sets a marker (scope, name, period, threshold) and, only when the
marker was not set before, writes the event's outbox items. The items' payloads are built before the step
with placeholders for the spent figures, which only the step knows; both stores put them in as the same text.
The condition is a level, not an edge: a threshold a step missed (a crash, a budget lowered) is sent by the
next step that checks it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from gateway.store.outbox import Item

ALERT_EVENT = "budget.threshold_reached"
SPENT_USD = "\x01spent_usd"  # placeholders in a payload, replaced (quotes and all) by the figures
SPENT_S = "\x01spent_s"
SPENT_USD_JSON = orjson.dumps(SPENT_USD)
SPENT_S_JSON = orjson.dumps(SPENT_S)
MARKER_TTL_S = 40 * 86400  # longer than any calendar period; a "total" period's marker is kept


@dataclass(frozen=True, slots=True)
class Threshold:
    value: float  # a fraction of the budget
    items: tuple[Item, ...] = ()  # its event, one item per endpoint that wants it, payloads with placeholders


@dataclass(frozen=True, slots=True)
class AlertWatch:
    """One subject's thresholds for a step to check: its counters are (scope, name, period)."""

    scope: str
    name: str
    team: str
    period: str
    budget_micros: int | None
    budget_ms: int | None
    thresholds: tuple[Threshold, ...]


@dataclass(frozen=True, slots=True)
class Reached:
    """A threshold a step reached first, with the subject's spent figures right after the step."""

    watch: AlertWatch
    threshold: float
    spent_micros: int
    spent_ms: int


@dataclass(slots=True)
class BudgetCheck:
    """What a settlement (or a budget change) checks: `watches` in; `reached` filled in by the store with the
    thresholds the step reached first, once the step has been written."""

    watches: tuple[AlertWatch, ...]
    reached: list[Reached] = field(default_factory=list)


def is_reached(watch: AlertWatch, threshold: float, spent_micros: int, spent_ms: int) -> bool:
    """spent ≥ threshold × budget, in doubles (as the Redis script compares them too)."""
    dollars = watch.budget_micros is not None and spent_micros >= threshold * watch.budget_micros
    seconds = watch.budget_ms is not None and spent_ms >= threshold * watch.budget_ms
    return dollars or seconds


def marker(watch: AlertWatch, threshold: float) -> str:
    """The once-per-period marker's name (a name's length first: any name reads back whole)."""
    return f"{watch.scope}:{len(watch.name)}:{watch.name}:{watch.period}:{threshold!r}"


def marker_ttl_s(watch: AlertWatch) -> int:
    return 0 if watch.period == "total" else MARKER_TTL_S


def usd_text(micros: int) -> str:
    """Exact dollars as a JSON number: 12.5 dollars is 12.500000."""
    return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"


def seconds_text(ms: int) -> str:
    return f"{ms // 1000}.{ms % 1000:03d}"


def filled(payload: bytes, spent_micros: int, spent_ms: int) -> bytes:
    """A payload with its placeholders replaced by the spent figures."""
    return payload.replace(SPENT_USD_JSON, usd_text(spent_micros).encode(), 1).replace(
        SPENT_S_JSON, seconds_text(spent_ms).encode(), 1
    )


def filled_items(items: tuple[Item, ...], spent_micros: int, spent_ms: int) -> list[Item]:
    return [replace(item, payload=filled(item.payload, spent_micros, spent_ms)) for item in items]


def script_arg(check: BudgetCheck | None) -> str:
    """A check as the Redis scripts read it (JSON, figures as strings); '' for none."""
    if check is None or not check.watches:
        return ""
    watches: list[Any] = [
        [
            w.scope,
            w.name,
            w.period,
            "" if w.budget_micros is None else str(w.budget_micros),
            "" if w.budget_ms is None else str(w.budget_ms),
            marker_ttl_s(w),
            [
                [repr(t.value), marker(w, t.value), [[i.id, i.topic, i.payload.decode()] for i in t.items]]
                for t in w.thresholds
            ],
        ]
        for w in check.watches
    ]
    return orjson.dumps(watches).decode()


def take_reached(check: BudgetCheck, rows: list[Any]) -> None:
    """A script's answer: (watch index, threshold index, spent micros, spent ms) per threshold reached, 1-based."""
    check.reached = [
        Reached(check.watches[int(i) - 1], check.watches[int(i) - 1].thresholds[int(j) - 1].value, int(m), int(s))
        for i, j, m, s in rows
    ]
