"""Background settlement: polls tasks that clients stopped polling, expires the ones that never end.
Each task is handled on its own: one that fails, for any reason, never stops the others."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import structlog

from gateway.errors import GatewayError
from gateway.flow.creates import Tasks
from gateway.flow.polls import Polls
from gateway.flow.settlement import Settlement
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.store.base import PENDING, TERMINAL, Store, Task
from gateway.upstream.client import Upstream
from gateway.upstream.keypool import KeyPool

TICK_S = 1.0
PURGE_EVERY_S = 600


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
        self.log = structlog.get_logger("gateway.poller")
        self._stop = asyncio.Event()
        self._rng = random.Random()
        self._next_purge = 0.0

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            await self._guarded("tick", self.tick())
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=TICK_S)
            except TimeoutError:
                pass

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

    async def tick(self) -> int:
        cfg = self.settings.poller
        lease = max(30.0, self.settings.upstream.timeout_s + 5)
        await self._guarded("catch_up", self.tasks.catch_up())
        due = await self.store.due_tasks(await self.store.now(), cfg.concurrency * 8, lease)
        gate = asyncio.Semaphore(cfg.concurrency)

        async def one(task: Task) -> None:
            async with gate:
                if not await self._guarded("check", self.check(task)):
                    await self._guarded("defer", self._back_off(task))

        await asyncio.gather(*(one(t) for t in due))
        await self._guarded("probe", self.pool.probe(self.upstream))
        self.metrics.poller_backlog.set(await self.store.backlog())
        if self.clock() >= self._next_purge:
            self._next_purge = self.clock() + PURGE_EVERY_S
            await self._guarded("purge", self.store.purge_idempotency(await self.store.now()))
        return len(due)

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
            # Due a tick early, so that the tick it waits for still checks it within interval_s.
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
