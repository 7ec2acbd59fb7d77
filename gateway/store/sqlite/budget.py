"""Budget alerts in the SQLite store (store/budget.py): the thresholds a step reached first, checked on the
counters that step has just moved, each marked once per period, its event's items written with the mark."""

from __future__ import annotations

import sqlite3

from gateway.store.budget import BudgetCheck, Reached, filled_items, is_reached, marker
from gateway.store.sqlite.books import Books
from gateway.store.sqlite.outbox import add_items

SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_alerts (marker TEXT PRIMARY KEY, at REAL NOT NULL)
"""


def check_budgets(conn: sqlite3.Connection, books: Books, check: BudgetCheck | None, now: float) -> None:
    """Inside the step: mark and write what it reached first, into check.reached (set whole, so that a step
    run again after a rolled back batch reports what its last run did)."""
    if check is None:
        return
    reached: list[Reached] = []
    for watch in check.watches:
        counters = books.counters(conn, watch.scope, watch.name, watch.period)
        for threshold in watch.thresholds:
            if not is_reached(watch, threshold.value, counters.spent_micros, counters.spent_ms):
                continue
            mark = marker(watch, threshold.value)
            if conn.execute("INSERT OR IGNORE INTO budget_alerts VALUES (?, ?)", (mark, now)).rowcount:
                add_items(conn, filled_items(threshold.items, counters.spent_micros, counters.spent_ms))
                reached.append(Reached(watch, threshold.value, counters.spent_micros, counters.spent_ms))
    check.reached = reached
