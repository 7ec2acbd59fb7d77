"""The background poller (gateway.flow.poller): checks run continuously as slots free up, within each
upstream key's polls-per-second budget; one failure never stops the others; stop ends it promptly.

The store here is `LeasingStore`, the poller's view of a store (due tasks leased by next_poll_at on the
test's clock); each check is one GET on a FakeUpstream."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from gateway.errors import UpstreamError
from gateway.flow.pacing import BURST_S
from gateway.flow.poller import MAX_BATCH, TICK_S, Poller
from gateway.metrics import Metrics
from gateway.store.base import PENDING, Task
from tests.doubles import MODEL, FakeClock, FakeUpstream, make_settings

KEYS = {"a": "th-poller-key-a-0123456789", "b": "th-poller-key-b-0123456789"}
INTERVAL_S = 15.0


def task(number: int, key: str = "a", *, due: float, status: str = "running", created_at: float | None = None) -> Task:
    return Task(
        rid=f"r{number}",
        team="red",
        user="alice",
        model=MODEL,
        resolution="720p",
        duration_s=5,
        input_ms=0,
        input_estimated=False,
        estimate_ms=5000,
        estimate_micros=1_000_000,
        team_period="2025-06",
        user_period="2025-06",
        created_at=due - INTERVAL_S if created_at is None else created_at,
        status=status,
        task_id=None if status == PENDING else f"cgt-{number}",
        key_name=key,
        next_poll_at=due,
    )


class LeasingStore:
    """Unsettled rows by rid; due_tasks leases the due ones (oldest due first) until now + lease_s."""

    def __init__(self, clock: FakeClock, tasks: list[Task]) -> None:
        self.clock = clock
        self.rows = {t.rid: t for t in tasks}
        self.fetches: list[int] = []  # the limit of each due_tasks call
        self.purges = 0

    async def now(self) -> float:
        return self.clock()

    async def due_tasks(self, now: float, limit: int, lease_s: float) -> list[Task]:
        self.fetches.append(limit)
        due = sorted((t for t in self.rows.values() if t.next_poll_at <= now), key=lambda t: t.next_poll_at)[:limit]
        handed = [replace(t) for t in due]  # as they were before the lease
        for row in due:
            row.next_poll_at = now + lease_s
        return handed

    async def defer_poll(self, rid: str, next_at: float) -> None:
        self.rows[rid].next_poll_at = next_at

    async def backlog(self) -> int:
        return len(self.rows)

    async def purge_idempotency(self, now: float) -> int:
        self.purges += 1
        return 0


class UpstreamPolls:
    """Polls as the poller uses them: one GET on the FakeUpstream per check, `latency_s` long;
    a task in `failing` raises instead."""

    def __init__(self, upstream: FakeUpstream, latency_s: float = 0.0, failing: dict[str, Exception] | None = None):
        self.upstream = upstream
        self.latency_s = latency_s
        self.failing = failing or {}
        self.started: list[tuple[float, str, str]] = []  # (monotonic time, task id, key)
        self.finished = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def poll(self, task: Task, ctx: Any) -> None:
        self.started.append((time.monotonic(), str(task.task_id), str(task.key_name)))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency_s)
            if task.task_id in self.failing:
                raise self.failing[task.task_id]
            await self.upstream.call("GET", f"/videos/generations/{task.task_id}", KEYS[str(task.key_name)])
        finally:
            self.in_flight -= 1
            self.finished += 1


class Counted:
    """catch_up (Tasks) and probe (KeyPool), counted; settle (Settlement) records what it settles."""

    def __init__(self) -> None:
        self.catch_ups = 0
        self.probes = 0
        self.settled: list[tuple[str, str]] = []

    async def catch_up(self) -> None:
        self.catch_ups += 1

    async def probe(self, upstream: Any) -> None:
        self.probes += 1

    async def settle(self, task: Task, status: str, *args: Any, **kw: Any) -> object:
        self.settled.append((task.rid, status))
        return object()


def make_poller(
    tasks: list[Task], clock: FakeClock, polls: UpstreamPolls, ledger: dict[str, Any] | None = None, **poller: Any
) -> tuple[Poller, Any]:
    """A poller over a LeasingStore of `tasks`, `poller` settings added to the interval, and a `ledger` table."""
    settings = make_settings(
        keys=KEYS, poller={"interval_s": INTERVAL_S, **poller}, **({"ledger": ledger} if ledger else {})
    )
    store = LeasingStore(clock, tasks)
    helpers = Counted()
    made = Poller(settings, store, helpers, polls, helpers, helpers, polls.upstream, Metrics(), clock)  # type: ignore[arg-type]
    return made, (store, helpers)


async def run_until(poller: Poller, done: Any, timeout: float) -> float:
    """Run the poller until `done()` holds (or `timeout` passes), stop it; the seconds it ran."""
    started = time.monotonic()
    running = asyncio.ensure_future(poller.run())
    while not done() and time.monotonic() - started < timeout:
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - started
    poller.stop()
    await asyncio.wait_for(running, 5)
    return elapsed


async def test_throughput_follows_the_work_not_a_batch_per_tick():
    clock = FakeClock()
    polls = UpstreamPolls(FakeUpstream())
    tasks = [task(n, due=clock.now - 1) for n in range(3000)]
    poller, (store, _) = make_poller(tasks, clock, polls, concurrency=8, max_polls_per_second=1_000_000)
    elapsed = await run_until(poller, lambda: polls.finished == 3000, timeout=30)
    # A fixed 64 a one-second tick would take 47 s; fetched as slots free up, it is as fast as the checks.
    assert polls.finished == 3000 and elapsed < 10
    assert Counter(task_id for _, task_id, _ in polls.started) == {f"cgt-{n}": 1 for n in range(3000)}
    assert all(limit <= MAX_BATCH for limit in store.fetches)
    assert all(row.next_poll_at == clock.now + INTERVAL_S - TICK_S for row in store.rows.values())
    assert polls.most_in_flight <= 8


async def test_a_slot_that_frees_up_takes_the_next_task_at_once():
    clock = FakeClock()
    polls = UpstreamPolls(FakeUpstream(), latency_s=0.02)
    tasks = [task(n, due=clock.now - 1) for n in range(120)]
    poller, _ = make_poller(tasks, clock, polls, concurrency=4, max_polls_per_second=1_000_000)
    elapsed = await run_until(poller, lambda: polls.finished == 120, timeout=20)
    assert polls.finished == 120 and polls.most_in_flight == 4
    assert elapsed < 120 / 4 * 0.02 * 4  # 0.6 s of checks back to back; a tick per batch would take 3 s


async def test_each_keys_polls_stay_within_its_budget_and_one_key_never_starves_another():
    rate = 40.0
    clock = FakeClock()
    polls = UpstreamPolls(FakeUpstream())
    tasks = [task(n, "a", due=clock.now - 2) for n in range(300)]  # all due before key b's
    tasks += [task(n, "b", due=clock.now - 1) for n in range(300, 600)]
    poller, _ = make_poller(tasks, clock, polls, concurrency=16, max_polls_per_second=rate)
    elapsed = await run_until(poller, lambda: False, timeout=1.5)
    burst = max(1.0, rate * BURST_S)
    for key in KEYS:
        times = [at for at, _, used in polls.started if used == key]
        assert len(times) >= rate * elapsed * 0.5, (key, len(times))  # each key polls at its own rate
        # No span of its polls holds more than its bucket gives (test_pacing proves the bucket exact); a check
        # starts a moment after its token is taken, so one more may seem to fit as the loop schedules them.
        for first in range(len(times)):
            for last in range(first, len(times)):
                assert last - first + 1 <= burst + rate * (times[last] - times[first]) + 1
    assert len(polls.started) <= 2 * (burst + rate * elapsed)


async def test_one_failing_check_never_stops_the_others_and_is_backed_off():
    clock = FakeClock()
    failing: dict[str, Exception] = {"cgt-3": RuntimeError("bug"), "cgt-7": UpstreamError("5xx", code="upstream_x")}
    polls = UpstreamPolls(FakeUpstream(), failing=failing)
    poller, (store, _) = make_poller([task(n, due=clock.now - 1) for n in range(20)], clock, polls)
    await run_until(poller, lambda: polls.finished == 20, timeout=10)
    assert polls.finished == 20
    for rid in ("r3", "r7"):  # deferred by interval_s × 1–3, not leased for ever nor due again now
        assert clock.now + INTERVAL_S <= store.rows[rid].next_poll_at <= clock.now + 3 * INTERVAL_S
    assert all(
        store.rows[f"r{n}"].next_poll_at == clock.now + INTERVAL_S - TICK_S for n in range(20) if n not in (3, 7)
    )


async def test_stop_ends_the_run_promptly_and_gives_back_the_tasks_it_leased_but_never_checked():
    clock = FakeClock()
    polls = UpstreamPolls(FakeUpstream(), latency_s=0.2)
    poller, (store, _) = make_poller([task(n, due=clock.now - 5) for n in range(50)], clock, polls, concurrency=2)
    running = asyncio.ensure_future(poller.run())
    while len(polls.started) < 2:
        await asyncio.sleep(0.005)
    poller.stop()
    started = time.monotonic()
    await asyncio.wait_for(running, 5)
    assert time.monotonic() - started < 1.0  # the two checks under way end; nothing new starts
    assert len(polls.started) == polls.finished == 2
    given_back = [row for row in store.rows.values() if row.next_poll_at == clock.now - 5]
    assert len(given_back) == 48  # due again at once, for any replica, rather than leased until the lease ends


async def test_an_idle_poller_asks_the_store_a_few_times_a_second_and_polls_nothing():
    clock = FakeClock()
    polls = UpstreamPolls(FakeUpstream())
    poller, (store, helpers) = make_poller([task(1, due=clock.now + 60)], clock, polls)
    await run_until(poller, lambda: False, timeout=1.2)
    assert polls.started == [] and 1 <= len(store.fetches) <= 4
    assert helpers.catch_ups >= 1 and helpers.probes >= 1 and store.purges == 1


async def test_upkeep_sets_the_backlog_gauge_and_purges_every_ten_minutes():
    clock = FakeClock()
    polls = UpstreamPolls(FakeUpstream())
    poller, (store, _) = make_poller([task(n, due=clock.now + 60) for n in range(3)], clock, polls)
    await poller.upkeep()
    await poller.upkeep()
    assert poller.metrics.registry.get_sample_value("tokenhub_gateway_poller_backlog") == 3
    assert store.purges == 1
    clock.now += 600
    await poller.upkeep()
    assert store.purges == 2


async def test_an_old_task_is_expired_and_a_pending_one_waits_without_a_poll():
    clock = FakeClock()
    polls = UpstreamPolls(FakeUpstream())
    old = task(1, due=clock.now - 1, created_at=clock.now - 172_800)
    pending = task(2, due=clock.now - 1, status=PENDING)
    poller, (store, helpers) = make_poller([old, pending], clock, polls)
    assert await poller.tick() == 2
    assert helpers.settled == [("r1", "unresolved")] and polls.started == []
    assert store.rows["r2"].next_poll_at == clock.now + INTERVAL_S


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_a_tick_checks_one_batch_of_due_tasks(concurrency: int):
    clock = FakeClock()
    polls = UpstreamPolls(FakeUpstream())
    tasks = [task(n, due=clock.now - 1) for n in range(40)]
    poller, _ = make_poller(tasks, clock, polls, concurrency=concurrency, max_polls_per_second=10_000)
    assert await poller.tick() == min(40, concurrency * 8)
    assert polls.finished == min(40, concurrency * 8) and polls.most_in_flight <= concurrency
