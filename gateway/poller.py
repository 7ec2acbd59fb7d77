"""Background settlement: polls tasks that clients stopped polling, expires the ones that never end."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import structlog

from .errors import GatewayError
from .store.base import PENDING, TERMINAL, Task

TICK_S = 1.0
PURGE_EVERY_S = 600


class Poller:
    def __init__(self, gateway: Any) -> None:
        self.g = gateway
        self.log = structlog.get_logger("gateway.poller")
        self._stop = asyncio.Event()
        self._rng = random.Random()
        self._next_purge = 0.0

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.tick()
            except GatewayError as exc:
                self.log.warning("poller.tick_failed", error_code=exc.code)
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad tick
                self.log.exception("poller.tick_crashed")
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=TICK_S)
            except TimeoutError:
                pass

    async def tick(self) -> int:
        g = self.g
        cfg = g.settings.poller
        lease = max(30.0, g.settings.upstream.timeout_s + 5)
        await g.tasks.catch_up()
        due = await g.store.due_tasks(await g.store.now(), cfg.concurrency * 8, lease)
        gate = asyncio.Semaphore(cfg.concurrency)

        async def one(task: Task) -> None:
            async with gate:
                await self.check(task)

        await asyncio.gather(*(one(t) for t in due))
        await g.pool.probe(g.upstream)
        g.metrics.poller_backlog.set(await g.store.backlog())
        if g.clock() >= self._next_purge:
            self._next_purge = g.clock() + PURGE_EVERY_S
            await g.store.purge_idempotency(await g.store.now())
        return len(due)

    async def check(self, task: Task) -> None:
        g = self.g
        cfg = g.settings.poller
        now = g.clock()
        if now - task.created_at >= cfg.expire_after_s:
            await self.expire(task)
            return
        if task.status == PENDING or not task.task_id:
            await g.store.defer_poll(task.rid, now + cfg.interval_s)
            return
        try:
            await g.tasks.poll(task, None)
        except GatewayError as exc:
            backoff = cfg.interval_s * self._rng.uniform(1.0, 3.0)
            self.log.info("poller.poll_failed", task_id=task.task_id, error_code=exc.code)
            await g.store.defer_poll(task.rid, now + backoff)
            return
        if task.status not in TERMINAL:
            await g.store.defer_poll(task.rid, now + cfg.interval_s)

    async def expire(self, task: Task) -> None:
        """Never terminal, or a create whose outcome was never recorded: the reservation becomes the cost."""
        done = await self.g.tasks.settle(task, "unresolved", None, None, estimated=True)
        if done is not None:
            self.log.warning("task.unresolved", task_id=task.task_id or task.rid, team=task.team,
                             user=task.user, status_before=task.status,
                             age_s=round(self.g.clock() - task.created_at))
