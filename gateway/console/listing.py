"""A team's tasks as the console lists them (SPEC §16): as GET /videos/generations lists them, newest first,
filtered by status, model and day, a page at a time; and what one task's page shows.

The store filters what it can (a team's tasks by status, newest first; a day's rows by team and model through the
ledger's index); the rest is filtered here over a bounded number of the store's pages, so a rare filter costs at
most MAX_STEPS reads and then offers the next page from where it stopped.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.errors import ValidationError
from gateway.openai.bridge import decode_meta
from gateway.store.base import LIVE, TERMINAL, LedgerFilter, Store, Task
from gateway.store.outbox import ArchivedFile

PAGE = 20
MAX_STEPS = 10  # store pages read for one console page, at most
STATUSES = tuple(sorted(LIVE | TERMINAL))
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_CURSOR = re.compile(r"[A-Za-z0-9_.:+-]{1,200}")
Fetch = Callable[[str | None], Awaitable[tuple[list[Task], str | None]]]


@dataclass(frozen=True, slots=True)
class TaskQuery:
    status: str = ""
    model: str = ""
    day: str = ""  # YYYY-MM-DD (UTC)
    after: str = ""

    def link(self, **changes: str) -> dict[str, str]:
        """The query parameters of this listing with some changed, empty ones left out."""
        values = {"status": self.status, "model": self.model, "day": self.day, "after": self.after, **changes}
        return {name: value for name, value in values.items() if value}


def task_query(params: Mapping[str, str], models: Mapping[str, Any]) -> TaskQuery:
    """The filters asked for, each checked (a 400 page naming it otherwise)."""
    status = params.get("status", "").strip()
    model = params.get("model", "").strip()
    day = params.get("day", "").strip()
    after = params.get("after", "").strip()
    if status and status not in STATUSES:
        raise ValidationError(f"status must be one of {', '.join(STATUSES)}.", param="status")
    if model and model not in models:
        raise ValidationError("model must be a model of the pricing table.", param="model")
    if day and (not _DAY.fullmatch(day) or _day_start(day) is None):
        raise ValidationError("day must be a date, YYYY-MM-DD.", param="day")
    if after and not _CURSOR.fullmatch(after):
        raise ValidationError("after must be the link of an earlier page.", param="after")
    return TaskQuery(status, model, day, after)


async def task_page(store: Store, team: str, query: TaskQuery) -> tuple[list[Task], str | None]:
    """About a page of the team's tasks that match, and the cursor of the next page (None at the end)."""
    status, model = query.status, query.model
    if query.day:
        start = _day_start(query.day) or 0.0
        flt = LedgerFilter(since=start, until=start + 86400, team=team, model=model or None)

        async def fetch(after: str | None) -> tuple[list[Task], str | None]:
            return await store.ledger_page(flt, PAGE, after)

        return await _scan(fetch, lambda t: bool(t.task_id) and (not status or t.status == status), query.after)

    async def newest(after: str | None) -> tuple[list[Task], str | None]:
        tasks, more = await store.list_tasks(team, PAGE, after, status or None)
        return tasks, (tasks[-1].task_id if more and tasks else None)

    return await _scan(newest, lambda t: not model or t.model == model, query.after)


async def _scan(fetch: Fetch, keep: Callable[[Task], bool], after: str) -> tuple[list[Task], str | None]:
    found: list[Task] = []
    cursor: str | None = after or None
    for _ in range(MAX_STEPS):
        batch, cursor = await fetch(cursor)
        found += [task for task in batch if keep(task)]
        if len(found) >= PAGE or cursor is None:
            break
    return found, cursor


async def covers(store: Store, tasks: list[Task], archiving: bool) -> set[str]:
    """The ids of the tasks whose cover is in the archive."""
    if not archiving:
        return set()
    ids = [task.task_id for task in tasks if task.task_id and task.status == "succeeded"]
    found = await asyncio.gather(*(store.archive_files(task_id) for task_id in ids))
    return {task_id for task_id, files in zip(ids, found, strict=True) if any(f.variant == "cover" for f in files)}


def variants(files: list[ArchivedFile]) -> set[str]:
    return {file.variant for file in files}


def prompt_of(task: Task) -> str | None:
    """The prompt a task was created with, where the gateway kept it: the OpenAI shape's record of the create,
    else a prompt in TokenHub's final answer."""
    facts = decode_meta(task.meta)
    if facts is not None and facts.prompt:
        return facts.prompt
    meta = _doc(task.meta)
    if isinstance(meta.get("prompt"), str):
        return str(meta["prompt"])
    answer = _doc(task.final_body)
    if isinstance(answer.get("prompt"), str):
        return str(answer["prompt"])
    items = answer.get("content")
    texts = [item.get("text") for item in items if isinstance(item, dict)] if isinstance(items, list) else []
    return " ".join(text for text in texts if isinstance(text, str)) or None


def timeline(task: Task) -> list[tuple[str, float | None, bool]]:
    """(step, when, reached) for created, running and settled; a resolution by an operator after them."""
    started = task.status in ("running", "succeeded") or bool(task.billed_ms)
    steps = [
        ("created", task.created_at, True),
        ("running", task.updated_at if task.status == "running" else None, started),
        (f"settled: {task.status}", task.settled_at, task.settled),
    ]
    if task.resolved_at is not None:
        steps.append((f"resolved by {task.resolved_by}", task.resolved_at, True))
    return steps


def breakdown(task: Task, price_micros: int | None) -> dict[str, Any]:
    """Seconds and money: input + output seconds × the price per second, and what was recorded."""
    billed_ms = task.billed_ms if task.billed_ms is not None else task.estimate_ms
    input_ms = min(task.input_ms, billed_ms)  # a task that delivered nothing is billed nothing, input included
    return {
        "input_s": input_ms / 1000,
        "output_s": (billed_ms - input_ms) / 1000,
        "total_s": billed_ms / 1000,
        "price_micros": price_micros,
        "cost_micros": task.cost_micros if task.cost_micros is not None else task.estimate_micros,
        "estimate_micros": task.estimate_micros,
        "final": task.cost_micros is not None and not task.cost_estimated,
    }


def _doc(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _day_start(day: str) -> float | None:
    try:
        return datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None
