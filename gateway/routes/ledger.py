"""The usage ledger as rows: filters, grouping, and JSON / CSV / table rendering."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from gateway.money import micros_to_usd
from gateway.store.base import Task

GROUPS = ("team", "user", "model", "day")
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


def group(tasks: Iterable[Task], by: str) -> list[dict[str, Any]]:
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
    cols = list(rows[0])
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines) + "\n"
