"""Budget alerts in the store (store/budget.py): checked by the step that settles, once per threshold per period,
across replicas; the same contract on SQLite and a real Redis."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.errors import RecordRejected, TaskNotUnknown
from gateway.store.base import MAX_COUNTER
from gateway.store.budget import SPENT_S, SPENT_USD, AlertWatch, BudgetCheck, Threshold
from gateway.store.outbox import Item, webhook_topic
from tests.store.helpers import DOLLAR, EST_MICROS, EST_MS, admitted, created, preload_spent

TOPIC = webhook_topic("finance")


def template(scope: str, value: float, tag: str, now: float) -> Item:
    payload = {"id": f"evt_{tag}", "data": {"threshold": value, "spent_usd": SPENT_USD, "video_seconds_spent": SPENT_S}}
    return Item(f"evt_{tag}", TOPIC, orjson.dumps(payload), now)


def check(
    now: float,
    period: str,
    budget: int | None = 10 * DOLLAR,
    budget_ms: int | None = None,
    thresholds: tuple[float, ...] = (0.5, 1.0),
    tag: str = "",
    scope: str = "team",
    name: str = "marketing",
) -> BudgetCheck:
    """A check of one subject (the team of tests.store.helpers' tasks by default), one event per threshold."""
    made = tuple(Threshold(t, (template(scope, t, f"{tag}{scope}{t}", now),)) for t in thresholds)
    return BudgetCheck((AlertWatch(scope, name, "marketing", period, budget, budget_ms, made),))


async def settle(store, now: float, cost: int, alerts: BudgetCheck | None, billed_ms: int = 1000):
    task = await created(store, now)
    return await store.settle(task.task_id, "succeeded", billed_ms, cost, False, None, now, (), alerts), task


async def outbox(store, now: float) -> dict[str, dict]:
    return {i.id: orjson.loads(i.payload) for i in await store.outbox_claim(TOPIC, 100, now, 60)}


async def test_the_settlement_that_reaches_a_threshold_sends_it_once(store):
    now = await store.now()
    period = (await created(store, now)).team_period
    checks = [check(now, period, tag=tag) for tag in "abcd"]
    for cost, alerts in zip((3, 3, 3, 1), checks, strict=True):
        done, _ = await settle(store, now, cost * DOLLAR, alerts)
        assert done is not None
    # $3, $6, $9, $10 of $10: 0.5 reached by the second, 1.0 by the fourth
    assert [[(r.watch.scope, r.threshold, r.spent_micros) for r in c.reached] for c in checks] == [
        [],
        [("team", 0.5, 6 * DOLLAR)],
        [],
        [("team", 1.0, 10 * DOLLAR)],
    ]
    events = await outbox(store, now)
    assert set(events) == {"evt_bteam0.5", "evt_dteam1.0"}
    assert events["evt_bteam0.5"]["data"] == {"threshold": 0.5, "spent_usd": 6.0, "video_seconds_spent": 2.0}
    assert events["evt_dteam1.0"]["data"]["spent_usd"] == 10.0


async def test_a_settlement_already_made_checks_nothing(store):
    now = await store.now()
    task = await created(store, now)
    assert await store.settle(task.task_id, "succeeded", 1000, 20 * DOLLAR, False, None, now, ())
    late = check(now, task.team_period, tag="late")
    assert await store.settle(task.task_id, "succeeded", 1000, 20 * DOLLAR, False, None, now, (), late) is None
    assert late.reached == [] and await outbox(store, now) == {}


async def test_each_period_and_each_subject_has_its_own_marks(store):
    now = await store.now()
    task = await created(store, now)
    both = BudgetCheck(
        check(now, task.team_period, tag="t").watches
        + check(now, task.user_period, budget=4 * DOLLAR, scope="user", name="alice", tag="u").watches
    )
    await store.settle(task.task_id, "succeeded", 1000, 5 * DOLLAR, False, None, now, (), both)
    assert sorted((r.watch.scope, r.threshold) for r in both.reached) == [("team", 0.5), ("user", 0.5), ("user", 1.0)]
    other = check(now, "1999-01", tag="old")  # no spend in that period: nothing reached
    await store.check_budget(other, now)
    assert other.reached == []


async def test_video_seconds_budgets_are_watched_too(store):
    now = await store.now()
    task = await created(store, now)
    seconds = check(now, task.team_period, budget=None, budget_ms=20_000, thresholds=(0.8,), tag="s")
    await store.settle(task.task_id, "succeeded", 16_000, 0, False, None, now, (), seconds)
    assert [(r.threshold, r.spent_ms) for r in seconds.reached] == [(0.8, 16_000)]
    assert (await outbox(store, now))["evt_steam0.8"]["data"]["video_seconds_spent"] == 16.0


async def test_a_budget_lowered_below_the_spend_sends_what_it_now_passes_once(store):
    now = await store.now()
    _, task = await settle(store, now, 6 * DOLLAR, None)
    lowered = check(now, task.team_period, budget=5 * DOLLAR, thresholds=(0.8, 1.0, 2.0), tag="low")
    await store.check_budget(lowered, now)
    assert sorted(r.threshold for r in lowered.reached) == [0.8, 1.0]
    again = check(now, task.team_period, budget=1 * DOLLAR, thresholds=(0.8, 1.0), tag="again")
    await store.check_budget(again, now)
    assert again.reached == []  # once per period, whatever the budget became
    assert set(await outbox(store, now)) == {"evt_lowteam0.8", "evt_lowteam1.0"}


async def test_a_refused_settlement_marks_nothing(store):
    now = await store.now()
    task = await created(store, now)
    await preload_spent(store, "team", "marketing", task.team_period, MAX_COUNTER - 10)
    refused = check(now, task.team_period, tag="r")
    with pytest.raises(RecordRejected):
        await store.settle(task.task_id, "succeeded", 1000, 11, False, None, now, (), refused)
    assert await outbox(store, now) == {}
    after = check(now, task.team_period, tag="after")  # the marks were not taken: the next step sends them
    await store.check_budget(after, now)
    assert sorted(r.threshold for r in after.reached) == [0.5, 1.0]


async def test_replicas_settling_at_once_send_each_threshold_once(replicas):
    one, other = replicas
    now = await one.now()
    tasks = [await created(one, now) for _ in range(12)]
    checks = [check(now, tasks[0].team_period, tag=f"{i}-") for i in range(12)]

    async def settle_on(store, task, alerts):
        await store.settle(task.task_id, "succeeded", 1000, DOLLAR, False, None, now, (), alerts)

    await asyncio.gather(
        *(settle_on((one, other)[i % 2], t, c) for i, (t, c) in enumerate(zip(tasks, checks, strict=True)))
    )
    reached = sorted(r.threshold for c in checks for r in c.reached)
    assert reached == [0.5, 1.0]
    assert len(await outbox(one, now)) == 2


async def test_an_unknown_create_charged_its_estimate_sends_what_it_reaches_once(store):
    now = await store.now()
    task = await admitted(store, now)  # pending, estimated at $3
    first = check(now, task.team_period, budget=6 * DOLLAR, tag="u")
    marked = await store.mark_unknown(task.rid, now, None, (), first)
    assert marked.status == "unknown" and marked.cost_micros == EST_MICROS
    assert [(r.threshold, r.spent_micros, r.spent_ms) for r in first.reached] == [(0.5, 3 * DOLLAR, EST_MS)]
    again = check(now, task.team_period, budget=6 * DOLLAR, tag="again")  # no longer pending: nothing changes
    assert (await store.mark_unknown(task.rid, now, None, (), again)).status == "unknown"
    assert again.reached == []
    events = await outbox(store, now)
    assert set(events) == {"evt_uteam0.5"}
    assert events["evt_uteam0.5"]["data"] == {"threshold": 0.5, "spent_usd": 3.0, "video_seconds_spent": 15.0}


async def test_a_resolution_that_moves_the_spend_sends_what_it_reaches(store):
    now = await store.now()
    task = await admitted(store, now)
    await store.mark_unknown(task.rid, now, None, ())  # $3 of $10: nothing reached yet
    billed = check(now, task.team_period, tag="b")
    done = await store.resolve_unknown(task.rid, "succeeded", 40_000, 8 * DOLLAR, "ops", now, billed)
    assert done.status == "succeeded" and done.cost_micros == 8 * DOLLAR
    assert [(r.threshold, r.spent_micros, r.spent_ms) for r in billed.reached] == [(0.5, 8 * DOLLAR, 40_000)]
    late = check(now, task.team_period, tag="late")
    with pytest.raises(TaskNotUnknown):  # refused: marks nothing
        await store.resolve_unknown(task.rid, "succeeded", 60_000, 12 * DOLLAR, "ops", now, late)
    assert late.reached == []
    assert set(await outbox(store, now)) == {"evt_bteam0.5"}


async def test_a_voided_unknown_create_lowers_the_spend_and_reaches_nothing(store):
    now = await store.now()
    task = await admitted(store, now)
    await store.mark_unknown(task.rid, now, None, ())
    voided = check(now, task.team_period, budget=4 * DOLLAR, thresholds=(0.5,), tag="v")  # $3 was 0.75 of it
    await store.resolve_unknown(task.rid, "voided", 0, 0, "ops", now, voided)
    assert voided.reached == [] and await outbox(store, now) == {}


async def test_a_threshold_an_unknown_create_reached_is_not_sent_again_by_a_settlement(store):
    now = await store.now()
    task = await admitted(store, now)
    first = check(now, task.team_period, budget=6 * DOLLAR, tag="m")
    await store.mark_unknown(task.rid, now, None, (), first)  # $3: 0.5 of $6
    assert [r.threshold for r in first.reached] == [0.5]
    later = check(now, task.team_period, budget=6 * DOLLAR, tag="s")
    await settle(store, now, 3 * DOLLAR, later)  # $6: 1.0 only
    assert [r.threshold for r in later.reached] == [1.0]


async def test_replicas_marking_unknown_creates_at_once_send_each_threshold_once(replicas):
    one, other = replicas
    now = await one.now()
    tasks = [await admitted(one, now) for _ in range(4)]  # $3 each: $12 of $10
    checks = [check(now, tasks[0].team_period, tag=f"{i}-") for i in range(4)]
    await asyncio.gather(
        *(
            (one, other)[i % 2].mark_unknown(task.rid, now, None, (), alerts)
            for i, (task, alerts) in enumerate(zip(tasks, checks, strict=True))
        )
    )
    assert sorted(r.threshold for c in checks for r in c.reached) == [0.5, 1.0]
    assert len(await outbox(one, now)) == 2
