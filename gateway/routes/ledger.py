"""The usage ledger as rows: filters, grouped figures, pages of rows, and JSON / CSV / table rendering,
the exports streamed from the store's cursor a page at a time (the admin route and the `usage` command)."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.errors import ValidationError
from gateway.money import micros_to_usd
from gateway.store.base import GROUP_BY, Group, LedgerFilter, Store, Task

GROUPS = GROUP_BY
PAGE_MAX = 1000  # rows in one page of the listing (its default too)
EXPORT_PAGE = 1000  # rows read from the store per step of an export: its memory, whatever the ledger's size
FORMAT_SLICE = 250  # rows formatted between two turns of the event loop
CURSOR_MAX = 200  # characters of an `after` cursor; the store's own are far shorter
FILTERS = ("team", "user", "model")
FIELDS = (
    "task_id",
    "team",
    "user",
    "model",
    "resolution",
    "status",
    "duration_s",
    "input_seconds",
    "billed_seconds",
    "estimate_usd",
    "cost_usd",
    "cost_estimated",
    "created_at",
    "settled_at",
    "resolved_by",
    "resolved_at",
)
GROUP_FIELDS = ("tasks", "succeeded", "failed", "in_flight", "billed_seconds", "cost_usd", "reserved_usd")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def parse_time(value: str) -> float:
    """An ISO date or date-time (UTC unless it says otherwise) → epoch seconds."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def ledger_filter(values: Mapping[str, str | None]) -> LedgerFilter:
    """The rows a query asks for: `since`/`until` (ISO dates or date-times), `team`, `user`, `model`.
    ValidationError (with the parameter) for a time that is not one."""
    moments: dict[str, float | None] = {}
    for name in ("since", "until"):
        value = values.get(name)
        try:
            moments[name] = parse_time(value) if value else None
        except ValueError:
            raise ValidationError(f"{name} must be an ISO date or date-time.", param=name) from None
    return LedgerFilter(
        since=moments["since"], until=moments["until"], **{name: values.get(name) or None for name in FILTERS}
    )


def cursor(value: str | None) -> str | None:
    """An `after` cursor as given (opaque: the store's), None when absent; ValidationError when it cannot be one."""
    if not value:
        return None
    if len(value) > CURSOR_MAX or not value.isascii() or not value.isprintable():
        raise ValidationError("after must be the next_after of an earlier page.", param="after")
    return value


async def page(store: Store, flt: LedgerFilter, limit: int, after: str | None) -> tuple[list[Task], str | None]:
    """One page of rows and the cursor after it; a cursor the store cannot read is the caller's error."""
    try:
        return await store.ledger_page(flt, limit, after)
    except ValueError:
        raise ValidationError("after must be the next_after of an earlier page.", param="after") from None


async def pages(
    store: Store, flt: LedgerFilter, after: str | None, first: tuple[list[Task], str | None] | None = None
) -> AsyncIterator[list[Task]]:
    """Every row from `after` on, a page of EXPORT_PAGE at a time (`first`: that page, already read)."""
    tasks, after = first if first is not None else await page(store, flt, EXPORT_PAGE, after)
    while True:
        if tasks:
            yield tasks
        if after is None:
            return
        tasks, after = await page(store, flt, EXPORT_PAGE, after)


async def csv_stream(chunks: AsyncIterator[list[Task]]) -> AsyncIterator[bytes]:
    """The rows as CSV: the header once, then the rows a slice at a time."""
    yield csv_text([FIELDS])
    async for part in _slices(chunks):
        yield csv_text(tuple(values[name] for name in FIELDS) for values in map(row, part))


async def json_stream(chunks: AsyncIterator[list[Task]]) -> AsyncIterator[bytes]:
    """The rows as the listing's JSON document with every row in it, written a slice at a time."""
    yield b'{"object":"list","group_by":null,"data":['
    separator = b""
    async for part in _slices(chunks):
        yield separator + b",".join(orjson.dumps(row(task)) for task in part)
        separator = b","
    yield b'],"has_more":false,"next_after":null}'


async def _slices(chunks: AsyncIterator[list[Task]]) -> AsyncIterator[list[Task]]:
    """Pages cut in slices of FORMAT_SLICE rows, the event loop free to serve others between two: a slice
    is formatted in a few ms, a whole page would hold the loop for tens."""
    async for tasks in chunks:
        for start in range(0, len(tasks), FORMAT_SLICE):
            await asyncio.sleep(0)
            yield tasks[start : start + FORMAT_SLICE]


def csv_text(lines: Iterable[Iterable[Any]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(lines)
    return out.getvalue().encode()


def row(task: Task) -> dict[str, Any]:
    return {
        "task_id": task.task_id or task.rid,
        "team": task.team,
        "user": task.user,
        "model": task.model,
        "resolution": task.resolution,
        "status": task.status,
        "duration_s": task.duration_s,
        "input_seconds": task.input_ms / 1000,
        "billed_seconds": None if task.billed_ms is None else task.billed_ms / 1000,
        "estimate_usd": micros_to_usd(task.estimate_micros),
        "cost_usd": None if task.cost_micros is None else micros_to_usd(task.cost_micros),
        "cost_estimated": task.cost_estimated,
        "created_at": _iso(task.created_at),
        "settled_at": None if task.settled_at is None else _iso(task.settled_at),
        "resolved_by": task.resolved_by,
        "resolved_at": None if task.resolved_at is None else _iso(task.resolved_at),
    }


def group_row(by: str, figures: Group) -> dict[str, Any]:
    """One grouped figure, as `group` writes it."""
    return {
        by: figures.key,
        "tasks": figures.tasks,
        "succeeded": figures.succeeded,
        "failed": figures.failed,
        "in_flight": figures.in_flight,
        "billed_seconds": figures.billed_ms / 1000,
        "cost_usd": micros_to_usd(figures.cost_micros),
        "reserved_usd": micros_to_usd(figures.reserved_micros),
    }


def group(tasks: Iterable[Task], by: str) -> list[dict[str, Any]]:
    """The rows grouped in the process: what the store's aggregate must equal (tests and small tools)."""
    sums: dict[str, dict[str, int]] = {}
    for task in tasks:
        name = _iso(task.created_at)[:10] if by == "day" else getattr(task, by)
        totals = sums.setdefault(
            name, dict.fromkeys(("tasks", "succeeded", "failed", "in_flight", "billed_ms", "cost", "reserved"), 0)
        )
        totals["tasks"] += 1
        totals["succeeded"] += task.status == "succeeded"
        totals["failed"] += task.status in ("failed", "cancelled", "expired")
        if task.settled_at is None:
            totals["in_flight"] += 1
            totals["reserved"] += task.estimate_micros
        totals["billed_ms"] += task.billed_ms or 0
        totals["cost"] += task.cost_micros or 0
    return [
        {
            by: name,
            "tasks": s["tasks"],
            "succeeded": s["succeeded"],
            "failed": s["failed"],
            "in_flight": s["in_flight"],
            "billed_seconds": s["billed_ms"] / 1000,
            "cost_usd": micros_to_usd(s["cost"]),
            "reserved_usd": micros_to_usd(s["reserved"]),
        }
        for name, s in sorted(sums.items())
    ]


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no usage)\n"
    return table_lines(rows, table_widths(rows), header=True)


def table_widths(rows: list[dict[str, Any]]) -> list[int]:
    """Each column as wide as its name and its widest value among `rows`."""
    return [max(len(col), *(len(_cell(r[col])) for r in rows)) for col in rows[0]]


def table_lines(rows: list[dict[str, Any]], widths: list[int], header: bool) -> str:
    cols = list(rows[0])
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))] if header else []
    lines += ["  ".join(_cell(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)) for r in rows]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return "" if value is None else str(value)
