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
)
GROUP_FIELDS = ("tasks", "succeeded", "failed", "in_flight", "billed_seconds", "cost_usd", "reserved_usd")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def parse_time(value: str) -> float:
    """An ISO date or date-time (UTC unless it says otherwise) → epoch seconds."""
    d = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()


def row(t: Task) -> dict[str, Any]:
    return {
        "task_id": t.task_id or t.rid,
        "team": t.team,
        "user": t.user,
        "model": t.model,
        "resolution": t.resolution,
        "status": t.status,
        "duration_s": t.duration_s,
        "input_seconds": t.input_ms / 1000,
        "billed_seconds": None if t.billed_ms is None else t.billed_ms / 1000,
        "estimate_usd": micros_to_usd(t.estimate_micros),
        "cost_usd": None if t.cost_micros is None else micros_to_usd(t.cost_micros),
        "cost_estimated": t.cost_estimated,
        "created_at": _iso(t.created_at),
        "settled_at": _iso(t.settled_at),
    }


def group(tasks: Iterable[Task], by: str) -> list[dict[str, Any]]:
    sums: dict[str, dict[str, int]] = {}
    for t in tasks:
        name = _iso(t.created_at)[:10] if by == "day" else getattr(t, by)
        s = sums.setdefault(
            name, dict.fromkeys(("tasks", "succeeded", "failed", "in_flight", "billed_ms", "cost", "reserved"), 0)
        )
        s["tasks"] += 1
        s["succeeded"] += t.status == "succeeded"
        s["failed"] += t.status in ("failed", "cancelled", "expired")
        if t.settled_at is None:
            s["in_flight"] += 1
            s["reserved"] += t.estimate_micros
        s["billed_ms"] += t.billed_ms or 0
        s["cost"] += t.cost_micros or 0
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
