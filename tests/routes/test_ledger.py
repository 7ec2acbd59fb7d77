"""The ledger's rendering (gateway/routes/ledger.py): filters and cursors from a query, a store's grouped
figure as the listing shows it, and the exports written a slice at a time from pages of rows."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from gateway.errors import ValidationError
from gateway.routes import ledger
from gateway.store.base import Group, LedgerFilter, Task

DAY = 86400.0
START = datetime(2026, 3, 1, tzinfo=UTC).timestamp()


def task(n: int, status: str = "succeeded", **fields: Any) -> Task:
    settled = status not in ("queued", "running")
    values: dict[str, Any] = {
        "rid": f"rid-{n}",
        "team": ("red", "blue")[n % 2],
        "user": ("alice", "bob", "carol")[n % 3],
        "model": "doubao-seedance-2.0",
        "resolution": "720p",
        "duration_s": 5,
        "input_ms": 0,
        "input_estimated": False,
        "estimate_ms": 5000,
        "estimate_micros": 1_000_000 + n,
        "team_period": "2026-03",
        "user_period": "2026-03",
        "created_at": START + n * DAY / 3,
        "status": status,
        "task_id": f"cgt-{n}",
        "billed_ms": (5000 + n) if status == "succeeded" else 0 if settled else None,
        "cost_micros": (1_000_000 + 7 * n) if status == "succeeded" else 0 if settled else None,
        "settled_at": START + n * DAY / 3 + 60 if settled else None,
    }
    return Task(**(values | fields))


TASKS = [task(n, ("succeeded", "failed", "cancelled", "running", "expired", "unknown")[n % 6]) for n in range(18)]


def test_a_filter_reads_times_and_names_from_the_query():
    flt = ledger.ledger_filter({"since": "2026-03-01", "until": "2026-03-02T12:00:00Z", "team": "red", "user": ""})
    assert flt == LedgerFilter(since=START, until=START + 1.5 * DAY, team="red", user=None, model=None)
    assert ledger.ledger_filter({}) == LedgerFilter()
    assert ledger.ledger_filter({"since": "2026-03-01T01:00:00+01:00"}).since == START


@pytest.mark.parametrize("name", ["since", "until"])
@pytest.mark.parametrize("value", ["yesterday", "2026-02-30", "12:00"])
def test_a_time_that_is_not_one_names_its_parameter(name, value):
    with pytest.raises(ValidationError) as caught:
        ledger.ledger_filter({name: value})
    assert caught.value.param == name


@pytest.mark.parametrize("value", ["x" * 201, "1.5:ab\n", "1.5:é"])
def test_a_cursor_that_cannot_be_one_is_refused(value):
    with pytest.raises(ValidationError) as caught:
        ledger.cursor(value)
    assert caught.value.param == "after"
    assert ledger.cursor("") is None and ledger.cursor(None) is None
    assert ledger.cursor("1772323200.0:rid-1") == "1772323200.0:rid-1"


@pytest.mark.parametrize("by", ledger.GROUPS)
def test_a_grouped_figure_shows_as_the_rows_grouped(by):
    """What the store sums (a Group) is shown exactly as grouping the same rows in the process shows it."""
    expected = ledger.group(TASKS, by)
    figures: dict[str, Group] = {}
    for t in TASKS:
        key = datetime.fromtimestamp(t.created_at, UTC).date().isoformat() if by == "day" else getattr(t, by)
        g = figures.setdefault(key, Group(key))
        g.tasks += 1
        g.succeeded += t.status == "succeeded"
        g.failed += t.status in ("failed", "cancelled", "expired")
        g.in_flight += t.settled_at is None
        g.reserved_micros += t.estimate_micros if t.settled_at is None else 0
        g.billed_ms += t.billed_ms or 0
        g.cost_micros += t.cost_micros or 0
    assert [ledger.group_row(by, figures[key]) for key in sorted(figures)] == expected
    assert list(expected[0]) == [by, *ledger.GROUP_FIELDS]


class PagedStore:
    """ledger_page over a list, its cursor the index of the next row; every call recorded."""

    def __init__(self, tasks: list[Task]) -> None:
        self.tasks = tasks
        self.calls: list[tuple[int, str | None]] = []

    async def ledger_page(self, flt: LedgerFilter, limit: int, after: str | None) -> tuple[list[Task], str | None]:
        self.calls.append((limit, after))
        if after is not None and not after.isdigit():
            raise ValueError("not a cursor of this store")
        start = int(after or 0)
        end = start + limit
        return self.tasks[start:end], str(end) if end < len(self.tasks) else None


def collect(chunks: AsyncIterator[Any]) -> list[Any]:
    async def run() -> list[Any]:
        return [chunk async for chunk in chunks]

    return asyncio.run(run())


def test_pages_follow_the_cursor_to_the_end_a_page_at_a_time(monkeypatch):
    monkeypatch.setattr(ledger, "EXPORT_PAGE", 4)
    store = PagedStore(TASKS)
    pages = collect(ledger.pages(store, LedgerFilter(), None))  # type: ignore[arg-type]
    assert [len(p) for p in pages] == [4, 4, 4, 4, 2] and sum(pages, []) == TASKS
    assert store.calls == [(4, None), (4, "4"), (4, "8"), (4, "12"), (4, "16")]
    assert collect(ledger.pages(PagedStore([]), LedgerFilter(), None)) == []  # type: ignore[arg-type]


def test_a_cursor_the_store_cannot_read_is_an_invalid_after():
    with pytest.raises(ValidationError) as caught:
        collect(ledger.pages(PagedStore(TASKS), LedgerFilter(), "nope"))  # type: ignore[arg-type]
    assert caught.value.param == "after"


async def paged(tasks: list[Task], size: int) -> AsyncIterator[list[Task]]:
    for start in range(0, len(tasks), size):
        yield tasks[start : start + size]


def test_the_csv_export_writes_its_header_once_then_a_chunk_per_slice(monkeypatch):
    monkeypatch.setattr(ledger, "FORMAT_SLICE", 3)
    chunks = collect(ledger.csv_stream(paged(TASKS, 5)))
    assert chunks[0] == (",".join(ledger.FIELDS) + "\n").encode()
    assert [len(c.splitlines()) for c in chunks[1:]] == [3, 2, 3, 2, 3, 2, 3]  # pages of 5, 5, 5, 3 in slices of 3
    text = b"".join(chunks).decode()
    assert len(text.splitlines()) == len(TASKS) + 1
    parsed = list(csv.DictReader(io.StringIO(text)))
    as_text = [{k: "" if v is None else str(v) for k, v in ledger.row(t).items()} for t in TASKS]
    assert parsed == as_text
    assert collect(ledger.csv_stream(paged([], 5))) == [chunks[0]]  # no rows: the header alone


def test_the_json_export_is_the_listing_with_every_row(monkeypatch):
    monkeypatch.setattr(ledger, "FORMAT_SLICE", 4)
    body = b"".join(collect(ledger.json_stream(paged(TASKS, 7))))
    listing = {"object": "list", "group_by": None, "has_more": False, "next_after": None}
    assert orjson.loads(body) == listing | {"data": [orjson.loads(orjson.dumps(ledger.row(t))) for t in TASKS]}
    assert orjson.loads(b"".join(collect(ledger.json_stream(paged([], 7))))) == listing | {"data": []}


def test_a_table_written_in_pages_lines_up_with_its_first_page():
    rows = [ledger.row(t) for t in TASKS]
    widths = ledger.table_widths(rows[:6])
    text = ledger.table_lines(rows[:6], widths, header=True) + ledger.table_lines(rows[6:], widths, header=False)
    lines = text.splitlines()
    assert len(lines) == len(rows) + 1 and lines[0].split() == list(ledger.FIELDS)
    assert ledger.to_table(rows) == ledger.table_lines(rows, ledger.table_widths(rows), header=True)
    assert ledger.to_table([]) == "(no usage)\n"
