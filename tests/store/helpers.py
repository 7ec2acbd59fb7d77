"""Builders of the store contract suite (tests/store/test_store.py), shared with every test that needs a task
in a store: admissions, admitted and created tasks, a subject's figures, a counter preloaded out of reach."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from gateway.policy.quota import Subject, period_key
from gateway.settings import Limits
from gateway.store.base import Admission, Task
from gateway.store.sqlite.store import SQLiteStore

DOLLAR = 1_000_000
EST_MICROS = 3 * DOLLAR  # 15 s at $0.20/s
EST_MS = 15_000


def subjects(
    now: float, team: Limits = Limits(), user: Limits = Limits(), team_name: str = "marketing", user_name: str = "alice"
) -> tuple[Subject, Subject]:
    return (
        Subject("user", user_name, period_key(user.period, now), user),
        Subject("team", team_name, period_key(team.period, now), team),
    )


def admission(
    now: float,
    team: Limits = Limits(),
    user: Limits = Limits(),
    *,
    team_name: str = "marketing",
    user_name: str = "alice",
    idem: str | None = None,
    body_hash: str | None = None,
    created_at: float | None = None,
    **task_fields: Any,
) -> Admission:
    """An admission of a 10 s 720p task (estimated at 15 s, $3) for alice of marketing, by default."""
    user_subject, team_subject = subjects(now, team, user, team_name, user_name)
    task = Task(
        rid=uuid.uuid4().hex,
        team=team_name,
        user=user_name,
        model="doubao-seedance-2.0",
        resolution="720p",
        duration_s=10,
        input_ms=5000,
        input_estimated=False,
        estimate_ms=EST_MS,
        estimate_micros=EST_MICROS,
        team_period=team_subject.period,
        user_period=user_subject.period,
        created_at=created_at or now,
        updated_at=now,
        idem_key=idem,
        next_poll_at=now + 15,
    )
    return Admission(replace(task, **task_fields), (user_subject, team_subject), body_hash or ("h" if idem else None))


async def admitted(store: Any, now: float, **kw: Any) -> Task:
    """A task admitted (its reservation made), not yet sent upstream."""
    adm = admission(now, **kw)
    assert await store.admit(adm, now) is None
    return adm.task


async def created(store: Any, now: float, task_id: str | None = None, **kw: Any) -> Task:
    """A task admitted, given a key and recorded as created upstream."""
    task = await admitted(store, now, **kw)
    assert await store.acquire_key(task.rid, "primary", 100)
    task_id = task_id or "cgt-" + task.rid[:12]
    await store.record_created(task.rid, task_id, "queued", now, (200, b'{"id": "%s"}' % task_id.encode()))
    return await store.get_task(task_id)


async def figures(store: Any, now: float, **kw: Any) -> tuple[Any, Any]:
    """The user's and the team's figures, as admission() makes its subjects."""
    user, team = await store.usage(subjects(now, **kw))
    return user, team


async def books(store: Any, now: float, rid: str | None = None) -> tuple[Any, ...]:
    """Everything a settlement may change: both subjects' figures, key slots, backlog and the row."""
    row = await store.get_record(rid) if rid else None
    return (await figures(store, now), dict(await store.key_in_flight()), await store.backlog(), row)


async def preload_spent(store: Any, scope: str, name: str, period: str, micros: int) -> None:
    """Put a subject's spent counter where no test could settle its way to."""
    if isinstance(store, SQLiteStore):
        await store._do(
            lambda conn: conn.execute(
                "INSERT INTO counters (scope, name, period, spent_micros) VALUES (?, ?, ?, ?) ON CONFLICT "
                "(scope, name, period) DO UPDATE SET spent_micros=excluded.spent_micros",
                (scope, name, period, micros),
            )
        )
        store._books.clear()
    else:
        await store._r.hset(f"{store.prefix}c:{scope}:{name}:{period}", "spent_micros", micros)
