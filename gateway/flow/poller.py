"""Background settlement: polls tasks that clients stopped polling, expires the ones that never end.

Checks run continuously, `poller.concurrency` at once: due tasks are leased from the store in batches as
slots free up (another batch as soon as few are left), so throughput follows the work, up to
`poller.max_polls_per_second` per upstream key (pacing.py). When nothing is due the poller looks again every
IDLE_S. Each task is handled on its own: one that fails, for any reason, never stops the others."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable

import structlog

from gateway.errors import GatewayError
from gateway.flow.creates import Tasks
from gateway.flow.pacing import DueQueue, KeyBudgets
from gateway.flow.polls import Polls
from gateway.flow.retention import Retention
from gateway.flow.settlement import Settlement
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.store.base import PENDING, TERMINAL, Store, Task
from gateway.upstream.client import Upstream
from gateway.upstream.keypool import KeyPool

TICK_S = 1.0  # catch-up, probe, backlog gauge; and how early a task is made due again
IDLE_S = 0.5  # after a fetch that found fewer tasks due than asked for: the next look
HANDED_BACK_S = 0.05  # after a fetch that handed tasks back: the next look, soon, to reach other keys' tasks
PURGE_EVERY_S = 600
FETCH_AHEAD_S = 1.0  # a batch is about a second of polls at the configured rate
MAX_BATCH = 500


class Poller:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        tasks: Tasks,
        polls: Polls,
        settlement: Settlement,
        pool: KeyPool,
        upstream: Upstream,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.store = store
        self.tasks = tasks
        self.polls = polls
        self.settlement = settlement
        self.pool = pool
        self.upstream = upstream
        self.metrics = metrics
        self.clock = clock
        self.monotonic = time.monotonic  # paces polls and leases held; `clock` may be a test's frozen one
        self.log = structlog.get_logger("gateway.poller")
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # a check ended (a slot is free), or stop
        self._rng = random.Random()
        self._next_purge = 0.0
        self._next_fetch = 0.0
        self._held_back = False  # slots are free, yet every queued task waits for its key's budget
        self._budgets = KeyBudgets()
        self._queue = DueQueue()
        self.retention = Retention(store, self._stop)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        checks = asyncio.ensure_future(self._check_continuously())
        try:
            while not self._stop.is_set():
                await self._guarded("catch_up", self.tasks.catch_up())
                await self.upkeep()
                await self._rest(self._stop, TICK_S)
        finally:
            self.stop()
            await checks
            await self.retention.finish()

    async def tick(self) -> int:
        """One round for tests and tools: catch up, check the tasks due now (one batch), then upkeep."""
        await self._guarded("catch_up", self.tasks.catch_up())
        due = await self._fetch(self.settings.poller.concurrency * 8)
        gate = asyncio.Semaphore(self.settings.poller.concurrency)

        async def paced(task: Task) -> None:
            async with gate:
                await self._budget_for(task)
                await self._one(task)

        await asyncio.gather(*(paced(t) for t in due))
        await self.upkeep()
        return len(due)

    async def upkeep(self) -> None:
        await self._guarded("probe", self.pool.probe(self.upstream))
        await self._guarded("backlog", self._backlog())
        if self.clock() >= self._next_purge:
            self._next_purge = self.clock() + PURGE_EVERY_S
            await self._guarded("purge", self._purge())
        self.retention.start_if_due(self.settings.ledger.retention_days, self.clock())

    async def _backlog(self) -> None:
        self.metrics.poller_backlog.set(await self.store.backlog())

    async def _purge(self) -> None:
        await self.store.purge_idempotency(await self.store.now())

    # the checks

    async def _check_continuously(self) -> None:
        running: set[asyncio.Task[None]] = set()
        try:
            while not self._stop.is_set():
                self._wake.clear()
                wait = await self._dispatch(running)
                if wait > 0:
                    await self._rest(self._wake, wait)
        finally:
            await self._guarded("give_back", self._give_back(self._queue.drain()))
            await asyncio.gather(*running)

    async def _dispatch(self, running: set[asyncio.Task[None]]) -> float:
        """Start checks while slots and budgets allow; how long to rest before trying again."""
        cfg = self.settings.poller
        now = self.monotonic()
        self._budgets.apply(self.settings, now)
        if lapsed := self._queue.drop_fetched_before(now - self._lease_s() / 2):
            self.log.warning("poller.leases_lapsed", tasks=lapsed, reason="checks slower than the lease")
        if now >= self._next_fetch and (len(self._queue) <= cfg.concurrency or self._held_back):
            await self._refill()
        while len(running) < cfg.concurrency:
            task, wait = self._queue.take(self._budgets, self.monotonic())
            self._held_back = task is None and wait > 0  # other keys' tasks may be due: fetch again
            if task is None:
                return wait or max(0.0, self._next_fetch - self.monotonic())
            job = asyncio.ensure_future(self._one(task))
            running.add(job)
            job.add_done_callback(self._check_done(running))
        return TICK_S  # every slot busy: the first to free up wakes the loop

    def _check_done(self, running: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
        def done(job: asyncio.Task[None]) -> None:
            running.discard(job)
            self._wake.set()

        return done

    async def _refill(self) -> None:
        batch = self._batch_size()
        due = await self._fetch(batch)
        over = self._queue.add(due, self.monotonic(), self._budgets)
        if over:  # due again when their key's budget reaches them (on the store's clock, that judges due)
            now = await self.store.now()
            await asyncio.gather(*(self._guarded("defer", self.store.defer_poll(t.rid, now + s)) for t, s in over))
            self._next_fetch = self.monotonic() + HANDED_BACK_S
        if len(due) < batch:  # everything due now is in hand: look again shortly
            self._next_fetch = self.monotonic() + IDLE_S

    def _batch_size(self) -> int:
        cfg = self.settings.poller
        per_second = cfg.max_polls_per_second * max(1, self._budgets.keys)
        return min(MAX_BATCH, max(2 * cfg.concurrency, math.ceil(per_second * FETCH_AHEAD_S)))

    async def _fetch(self, limit: int) -> list[Task]:
        """Due tasks, leased to this process; none while the store fails (it is asked again a tick later)."""
        try:
            return await self.store.due_tasks(await self.store.now(), limit, self._lease_s())
        except Exception as exc:  # noqa: BLE001 - the poller must outlive a store outage
            code = exc.code if isinstance(exc, GatewayError) else type(exc).__name__
            self.log.warning("poller.fetch_failed", error_code=code)
            self._next_fetch = self.monotonic() + TICK_S
            return []

    def _lease_s(self) -> float:
        return max(30.0, self.settings.upstream.timeout_s + 5)

    async def _give_back(self, tasks: list[Task]) -> None:
        """Leased but never checked (the poller stops): due again at once, for any replica."""
        await asyncio.gather(*(self.store.defer_poll(task.rid, task.next_poll_at) for task in tasks))

    async def _budget_for(self, task: Task) -> None:
        self._budgets.apply(self.settings, self.monotonic())
        bucket = self._budgets.bucket(task)
        while bucket is not None and (wait := bucket.take(self.monotonic())) > 0:
            await asyncio.sleep(wait)

    async def _rest(self, event: asyncio.Event, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):  # no task made per rest, unlike wait_for
                await event.wait()
        except TimeoutError:
            pass

    async def _one(self, task: Task) -> None:
        if not await self._guarded("check", self.check(task)):
            await self._guarded("defer", self._back_off(task))

    async def _guarded(self, step: str, work: Awaitable[object]) -> bool:
        """Run one step; a failure is logged and stays local to that step."""
        try:
            await work
            return True
        except GatewayError as exc:
            self.log.warning(f"poller.{step}_failed", error_code=exc.code)
        except Exception:  # noqa: BLE001 - the loop must outlive any one bad step
            self.log.exception(f"poller.{step}_crashed")
        return False

    async def check(self, task: Task) -> None:
        cfg = self.settings.poller
        now = self.clock()
        if now - task.created_at >= cfg.expire_after_s:
            await self.expire(task)
            return
        if task.status == PENDING or not task.task_id:
            await self.store.defer_poll(task.rid, now + cfg.interval_s)
            return
        try:
            await self.polls.poll(task, None)
        except GatewayError as exc:
            self.log.info("poller.poll_failed", task_id=task.task_id, error_code=exc.code)
            await self._back_off(task)
            return
        if task.status not in TERMINAL:
            # Due a tick early: found within IDLE_S of that, it is checked within interval_s even when busy.
            await self.store.defer_poll(task.rid, now + max(TICK_S, cfg.interval_s - TICK_S))

    async def _back_off(self, task: Task) -> None:
        backoff = self.settings.poller.interval_s * self._rng.uniform(1.0, 3.0)
        await self.store.defer_poll(task.rid, self.clock() + backoff)

    async def expire(self, task: Task) -> None:
        """Never terminal, or a create whose outcome was never recorded: the reservation becomes the cost."""
        done = await self.settlement.settle(task, "unresolved", None, None, estimated=True)
        if done is not None:
            self.log.warning(
                "task.unresolved",
                task_id=task.task_id or task.rid,
                team=task.team,
                user=task.user,
                status_before=task.status,
                age_s=round(self.clock() - task.created_at),
            )
