"""Settled tasks written through the store's own operations, as the gateway writes them: for bench/ledger.py
and the ledger's scale test (tests/e2e/test_ledger_scale.py).

Each task goes through admit → (acquire_key) → record_created → settle (or mark_unknown for a create whose
outcome was unknown): the row with its stored final body, the team's and user's spent counters of the task's
own period, the in-flight counters and key slots going back to zero, and the per-day figures the settlement
writes are exactly what a real task leaves. Only the clock differs: every step is stamped with the moment the
plan gives it, spread over the last `days` days, so the ledger looks a year old.

On SQLite a settled task can take a faster path (`bulk`, the default there): a thousand rows at a time in one
step of the store's writer, each inserted as the steps above leave it (INSERT_TASK, as admit writes a row; the
store's own trigger on a settled row's insert writes its per-day figures) and spent in the books as settle
spends it. tests/e2e/test_ledger_scale.py checks that both paths leave the same rows, figures and counters.

The plan is deterministic for a seed (the same statuses, models, keys, figures and moments); the ids are new
for each run unless `run` names them, so seeding twice adds rows rather than colliding.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal

import orjson

from gateway.money import seconds_to_ms, usd_to_micros
from gateway.policy import pricing
from gateway.policy.quota import Subject, period_key
from gateway.settings import DEFAULT_PRICING, Limits, Secret, UpstreamKey
from gateway.store.base import Admission, Store, Task

DAY_S = 86400
BULK_ROWS = 1000  # settled rows per step of the SQLite writer on the bulk path
MODELS = tuple(DEFAULT_PRICING)
RESOLUTIONS = ("720p", "480p")
# (status, weight): most tasks succeed; the rest fail, are cancelled, expire, or end `unknown`.
OUTCOMES = (("succeeded", 850), ("failed", 90), ("cancelled", 30), ("expired", 25), ("unknown", 5))
KEYS = (
    UpstreamKey("seed-a", Secret("th-seed-a"), max_concurrent_tasks=10**9),
    UpstreamKey("seed-b", Secret("th-seed-b"), max_concurrent_tasks=10**9),
)
UNLIMITED = Limits()
PRICES = {
    model: {res: usd_to_micros(price) for res, price in table.items()} for model, table in DEFAULT_PRICING.items()
}


@dataclass(frozen=True, slots=True)
class Plan:
    tasks: int
    days: int = 365
    teams: int = 50
    users_per_team: int = 4
    seed: int = 1
    end: float = field(default_factory=time.time)  # the newest task is created just before this
    unsettled: int = 0  # of the tasks, this many (the newest) are left in flight
    run: str = field(default_factory=lambda: os.urandom(4).hex())  # in every id: a new run adds new rows


@dataclass(frozen=True, slots=True)
class Planned:
    task: Task  # as admitted (pending), with the task id TokenHub answers in task_id
    status: str  # the terminal status, or "" for a task left in flight
    output_s: int
    settled_at: float
    key: UpstreamKey


def team_name(index: int) -> str:
    return f"team-{index:03d}"


def user_name(team: int, index: int) -> str:
    return f"user-{team:03d}-{index}"


def _final_body(task_id: str, task: Task, status: str, output_s: int, at: float) -> bytes:
    """What TokenHub's last answer looks like: the gateway stores it with the settlement."""
    body: dict[str, object] = {
        "id": task_id,
        "object": "video.generation.task",
        "model": task.model,
        "status": status,
        "created": int(task.created_at),
        "updated": int(at),
    }
    if status == "succeeded":
        body["data"] = [
            {
                "video_url": f"https://cdn.tokenhub.example/videos/{task_id}.mp4?Expires={int(at) + DAY_S}&Sig=0f3a",
                "cover_image_url": f"https://cdn.tokenhub.example/covers/{task_id}.jpg?Expires={int(at) + DAY_S}",
            }
        ]
        body["usage"] = {"video_duration": output_s}
    else:
        body["error"] = {"message": f"The task ended {status}.", "code": status}
    return orjson.dumps(body)


def planned(plan: Plan) -> Iterator[Planned]:
    """The plan's tasks, oldest first."""
    rng = random.Random(plan.seed)
    run = plan.run
    span = plan.days * DAY_S
    start = plan.end - span
    statuses = [status for status, _ in OUTCOMES]
    weights = [weight for _, weight in OUTCOMES]
    for index in range(plan.tasks):
        created = start + (index + rng.random()) * span / plan.tasks
        team = rng.randrange(plan.teams)
        model = rng.choice(MODELS)
        resolution = rng.choice(RESOLUTIONS)
        duration = rng.randint(4, 15)
        input_s = Decimal(rng.choice((0, 0, 0, 3, 5))) if model == MODELS[0] else Decimal(0)
        est_ms, est_micros = pricing.estimate(PRICES, model, resolution, input_s, duration)
        task = Task(
            rid=f"seed{run}{index:012x}",
            team=team_name(team),
            user=user_name(team, rng.randrange(plan.users_per_team)),
            model=model,
            resolution=resolution,
            duration_s=duration,
            input_ms=seconds_to_ms(input_s),
            input_estimated=False,
            estimate_ms=est_ms,
            estimate_micros=est_micros,
            team_period=period_key(UNLIMITED.period, created),
            user_period=period_key(UNLIMITED.period, created),
            created_at=created,
            updated_at=created,
            next_poll_at=plan.end + 30 * DAY_S,  # nothing of the plan is the poller's to check
        )
        task.task_id = f"cgt-seed-{run}-{index:09d}"
        status = rng.choices(statuses, weights)[0] if index < plan.tasks - plan.unsettled else ""
        output_s = duration if status == "succeeded" and rng.random() < 0.9 else rng.randint(1, duration)
        yield Planned(task, status, output_s, created + rng.uniform(20, 600), rng.choice(KEYS))


def figures(item: Planned) -> tuple[int, int]:
    """What the settlement bills: (billed ms, micro-dollars); only a delivered video costs."""
    task = item.task
    if item.status != "succeeded":
        return 0, 0
    input_s = Decimal(task.input_ms) / 1000
    return pricing.actual(PRICES, task.model, task.resolution, input_s, "succeeded", item.output_s)


UNKNOWN_AFTER_S = 30  # when a create whose outcome is unknown is recorded so
RECORDED_AFTER_S = 0.5  # when TokenHub's answer to a create is recorded


def settled_row(item: Planned) -> Task:
    """The row the steps of `write` leave for a task the plan settles (made from the planned task itself)."""
    task = item.task
    task.key_name = item.key.name
    if item.status == "unknown":  # a pending create: no task id (nor, on SQLite, key), charged its estimate
        task.task_id = task.key_name = None
        task.billed_ms, task.cost_micros, task.cost_estimated = task.estimate_ms, task.estimate_micros, True
        task.settled_at = task.updated_at = task.created_at + UNKNOWN_AFTER_S
    else:
        assert task.task_id is not None
        task.billed_ms, task.cost_micros = figures(item)
        task.settled_at = task.updated_at = item.settled_at
        task.final_body = _final_body(task.task_id, task, item.status, item.output_s, item.settled_at)
    task.status = item.status
    return task


async def write(store: Store, item: Planned) -> None:
    """One task, through the steps the gateway takes for it."""
    task = replace(item.task, task_id=None)  # admitted as a pending create: its id comes with the answer
    task_id = item.task.task_id
    assert task_id is not None
    subjects = (
        Subject("user", task.user, task.user_period, UNLIMITED),
        Subject("team", task.team, task.team_period, UNLIMITED),
    )
    rejection = await store.admit(Admission(task, subjects, None, (item.key,), 0.0), task.created_at)
    if rejection is not None:
        raise RuntimeError(f"the store refused a seeded task: {rejection.reason}")
    if task.key_name is None:  # a store that leaves the key to the flow (SQLite)
        if not await store.acquire_key(task.rid, item.key.name, item.key.max_concurrent_tasks):
            raise RuntimeError("no key slot for a seeded task")
    if item.status == "unknown":
        await store.mark_unknown(task.rid, task.created_at + UNKNOWN_AFTER_S, None)
        return
    created = orjson.dumps({"id": task_id, "object": "video.generation.task", "status": "queued"})
    await store.record_created(task.rid, task_id, "queued", task.created_at + RECORDED_AFTER_S, (200, created))
    if not item.status:
        return
    row = settled_row(item)
    assert row.billed_ms is not None and row.cost_micros is not None
    done = await store.settle(
        task_id, item.status, row.billed_ms, row.cost_micros, False, row.final_body, item.settled_at
    )
    if done is None:
        raise RuntimeError(f"a seeded task was already settled: {task_id}")


async def write_settled(store: Store, items: list[Planned]) -> None:
    """Settled tasks of the plan in one step of the SQLite store's writer, as `write` leaves them."""
    from gateway.store.sqlite.schema import INSERT_TASK, task_values
    from gateway.store.sqlite.store import SQLiteStore

    if not isinstance(store, SQLiteStore):
        raise TypeError("the bulk path writes a SQLite store only")
    rows = [settled_row(item) for item in items]
    books = store._books  # noqa: SLF001 - the store's own figures, spent as settle spends them

    def op(conn: sqlite3.Connection) -> None:
        conn.executemany(INSERT_TASK, [task_values(row) for row in rows])
        for row in rows:
            assert row.cost_micros is not None and row.billed_ms is not None
            books.spend(conn, row, row.cost_micros, row.billed_ms)

    await store._do(op)  # noqa: SLF001 - one transaction of the store's writer


async def seed(
    store: Store, plan: Plan, concurrency: int = 64, progress: float = 0.0, bulk: bool | None = None
) -> dict[str, float]:
    """Write the plan through `store` (opened by the caller), `concurrency` tasks at once. `bulk` (default:
    on a SQLite store) writes the settled tasks by the faster path. `progress`: a line to stderr every this
    many seconds (0: never)."""
    from gateway.store.sqlite.store import SQLiteStore

    bulk = isinstance(store, SQLiteStore) if bulk is None else bulk
    tasks = planned(plan)
    done = 0
    began = last = time.perf_counter()

    def tell() -> None:
        nonlocal last
        if progress and time.perf_counter() - last >= progress:
            last = time.perf_counter()
            print(f"seeded {done:,} of {plan.tasks:,} ({done / (last - began):,.0f}/s)", file=sys.stderr)

    async def worker() -> None:
        nonlocal done
        for item in tasks:  # one generator shared by the workers: each takes the next task(s)
            chunk = [item, *itertools.islice(tasks, BULK_ROWS - 1)] if bulk else [item]
            if bulk and (settled := [i for i in chunk if i.status]):
                await write_settled(store, settled)
            for one in chunk:
                if not (bulk and one.status):
                    await write(store, one)
            done += len(chunk)
            tell()

    await asyncio.gather(*(worker() for _ in range(2 if bulk else concurrency)))
    seconds = time.perf_counter() - began
    return {"tasks": done, "seconds": round(seconds, 1), "tasks_per_s": round(done / seconds, 1) if seconds else 0.0}
