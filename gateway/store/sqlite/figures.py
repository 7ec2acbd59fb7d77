"""The ledger's grouped figures in the SQLite store, read in one snapshot (on the reader's connection).

The rows a filter covers are split so that each is summed exactly once: the whole UTC days inside
[since, until) come from ledger_days (and whole months from ledger_months, unless grouped by day); the rows
of the partial days at either end, the rows in flight and the settled rows the backfill has not counted
yet come from the tasks table. A row's day is rounded to the microsecond (rollup.day_of), so a row up to
0.5 µs before the first whole day's midnight is in that day's figures: when `since` is that midnight, the
few such rows are taken back out."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field, replace
from datetime import date

from gateway.store.base import GROUP_BY, Group, LedgerFilter
from gateway.store.days import day_at_or_after, day_at_or_before
from gateway.store.sqlite.rollup import COUNTED, DAY_S, FAILED, day_of

_EPOCH = date(1970, 1, 1).toordinal()
_LAST_DAY = date(9999, 12, 1).toordinal() - _EPOCH  # a month's first day: the month after it is a date too
_ROW_SUMS = (
    f"COUNT(*), SUM(status = 'succeeded'), SUM(status IN {FAILED}), SUM(settled_at IS NULL), "
    "SUM(COALESCE(billed_ms, 0)), SUM(COALESCE(cost_micros, 0)), "
    "SUM(CASE WHEN settled_at IS NULL THEN estimate_micros ELSE 0 END)"
)
_FIGURE_SUMS = "SUM(tasks), SUM(succeeded), SUM(failed), 0, SUM(billed_ms), SUM(cost_micros), 0"
_COUNTED = f"settled_at IS NOT NULL AND {COUNTED}"  # the rows the figures hold
Totals = dict[int | str, list[int]]  # group key (a day number or a name) → Group's figures in field order


@dataclass
class Query:
    """Conditions on rows and their arguments, ANDed, and the sign the rows' sums are added with."""

    where: list[str] = field(default_factory=list)
    args: list[object] = field(default_factory=list)
    sign: int = 1
    source: str = "tasks"

    def add(self, clause: str, *values: object) -> Query:
        self.where.append(clause)
        self.args.extend(values)
        return self

    def sql(self) -> str:
        return " AND ".join(self.where) or "1"


def aggregate(conn: sqlite3.Connection, by: str, flt: LedgerFilter) -> list[Group]:
    if by not in GROUP_BY:
        raise ValueError(f"group by one of {', '.join(GROUP_BY)}, not {by!r}")
    totals: Totals = {}
    whole = whole_days(flt)
    if whole is not None:
        for table, period, first, stop in figure_spans(whole, by):
            _figures(conn, totals, by, flt, table, period, first, stop)
    for query in _row_parts(conn, flt, whole):
        _rows(conn, totals, by, query)
    groups = [Group(_name(key, by), *sums) for key, sums in totals.items() if sums[0]]
    return sorted(groups, key=lambda group: group.key)


def whole_days(flt: LedgerFilter) -> tuple[int | None, int | None] | None:
    """The days [first, stop) whose every moment is inside [since, until) (None: unbounded), or None.
    They stay between 1970 and 9999 (dates' range): the rows beyond, if any, are read as partial days."""
    first = None if flt.since is None else day_at_or_after(_dated(flt.since))
    stop = None if flt.until is None else day_at_or_before(_dated(flt.until))
    if first is not None and stop is not None and first >= stop:
        return None
    return first, stop


Span = tuple[str, str, int | None, int | None]  # table, period column, first, stop (None: unbounded)


def figure_spans(whole: tuple[int | None, int | None], by: str) -> list[Span]:
    """The tables and periods that cover the whole days: whole months from ledger_months, unless by day."""
    first, stop = whole
    month_lo = None if first is None else _month(first) if _first_day(_month(first)) == first else _month_after(first)
    month_hi = None if stop is None else _month(stop)
    if by == "day" or (month_lo is not None and month_hi is not None and month_lo >= month_hi):
        return [("ledger_days", "day", first, stop)]
    spans: list[Span] = [("ledger_months", "month", month_lo, month_hi)]
    if first is not None and month_lo is not None:
        spans.append(("ledger_days", "day", first, _first_day(month_lo)))
    if stop is not None and month_hi is not None:
        spans.append(("ledger_days", "day", _first_day(month_hi), stop))
    return spans


def _row_parts(conn: sqlite3.Connection, flt: LedgerFilter, whole: tuple[int | None, int | None] | None) -> list[Query]:
    """The row queries that complete the figures."""
    # Rows in flight are few; their partial index keeps a wide time range from scanning the table.
    parts = [filtered(flt, Query(source="tasks INDEXED BY tasks_due").add("settled_at IS NULL"))]
    done, upto = conn.execute("SELECT done, upto FROM ledger_backfill").fetchone()
    if done < upto:  # settled rows that predate the figures, not counted yet
        behind = Query().add("rowid > ? AND rowid <= ? AND rolled = 0 AND settled_at IS NOT NULL", done, upto)
        parts.append(filtered(flt, behind))
    if whole is None:
        return [*parts, filtered(flt, Query().add(_COUNTED))]
    first, stop = whole
    day = day_of("created_at")
    # Inside whole days, since <= first's midnight and stop's midnight <= until: each part has one range.
    if first is not None:  # the partial day before the first whole one, and what the first one holds too early
        parts.append(_counted(flt, flt.since, first * DAY_S).add(f"{day} < ?", first))
        parts.append(_counted(flt, first * DAY_S - 1, flt.since, sign=-1).add(f"{day} >= ?", first))
    if stop is not None:  # the partial day after the last whole one
        parts.append(_counted(flt, stop * DAY_S - 1, flt.until).add(f"{day} >= ?", stop))
    return parts


def _counted(flt: LedgerFilter, since: float | None, until: float | None, sign: int = 1) -> Query:
    """The counted rows created in [since, until) of the filter's team, user and model."""
    return filtered(replace(flt, since=since, until=until), Query(sign=sign).add(_COUNTED))


def filtered(flt: LedgerFilter, query: Query) -> Query:
    if flt.since is not None:
        query.add("created_at >= ?", flt.since)
    if flt.until is not None:
        query.add("created_at < ?", flt.until)
    return _subjects(query, flt)


def _subjects(query: Query, flt: LedgerFilter) -> Query:
    for column in ("team", "user", "model"):
        value = getattr(flt, column)
        if value is not None:
            query.add(f"{column} = ?", value)
    return query


def _figures(
    conn: sqlite3.Connection,
    totals: Totals,
    by: str,
    flt: LedgerFilter,
    table: str,
    period: str,
    first: int | None,
    stop: int | None,
) -> None:
    query = _subjects(Query(), flt)
    if first is not None:
        query.add(f"{period} >= ?", first)
    if stop is not None:
        query.add(f"{period} < ?", stop)
    sql = f"SELECT {by}, {_FIGURE_SUMS} FROM {table} WHERE {query.sql()} GROUP BY 1"
    _add(totals, conn.execute(sql, query.args), 1)


def _rows(conn: sqlite3.Connection, totals: Totals, by: str, query: Query) -> None:
    key = day_of("created_at") if by == "day" else by
    sql = f"SELECT {key}, {_ROW_SUMS} FROM {query.source} WHERE status != 'create_failed' AND {query.sql()} GROUP BY 1"
    _add(totals, conn.execute(sql, query.args), query.sign)


def _add(totals: Totals, rows: sqlite3.Cursor, sign: int) -> None:
    for key, *sums in rows:
        into = totals.setdefault(key, [0] * 7)
        for i, value in enumerate(sums):
            into[i] += sign * (value or 0)


def _name(key: int | str, by: str) -> str:
    return date.fromordinal(_EPOCH + int(key)).isoformat() if by == "day" else str(key)


def _dated(moment: float) -> float:
    return min(max(moment, 0.0), _LAST_DAY * DAY_S)


def _month(day: int) -> int:
    """The month of a day number as yyyymm, as ledger_months keys it."""
    at = date.fromordinal(_EPOCH + day)
    return at.year * 100 + at.month


def _month_after(day: int) -> int:
    at = date.fromordinal(_EPOCH + day)
    return (at.year + 1) * 100 + 1 if at.month == 12 else at.year * 100 + at.month + 1


def _first_day(month: int) -> int:
    return date(month // 100, month % 100, 1).toordinal() - _EPOCH
