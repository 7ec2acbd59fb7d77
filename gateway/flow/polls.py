"""Polls and cancels of a task: answered from the gateway's cache once terminal, coalesced to one
upstream call per task per second while running, and settled at the first terminal status seen."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import orjson
import structlog
from cachetools import LRUCache, TTLCache

from gateway import tokenhub
from gateway.context import Outcome, RequestContext
from gateway.errors import NotFound, RateLimited, StoreUnavailable, UpstreamError
from gateway.flow.settlement import Settlement
from gateway.store.base import PENDING, Store, Task
from gateway.upstream.calls import UpstreamCalls
from gateway.upstream.client import Reply
from gateway.upstream.keypool import KeyPool

POLL_COALESCE_S = 1.0


class Polls:
    def __init__(
        self,
        store: Store,
        calls: UpstreamCalls,
        pool: KeyPool,
        settlement: Settlement,
        records: LRUCache[str, Task],
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.calls = calls
        self.pool = pool
        self.settlement = settlement
        self.records = records  # owner and key of a task never change
        self.clock = clock
        self.log = structlog.get_logger("gateway.tasks")
        self._final: LRUCache[str, bytes] = LRUCache(maxsize=20_000)
        self._recent: TTLCache[str, Outcome] = TTLCache(maxsize=50_000, ttl=POLL_COALESCE_S)
        self._polling: dict[str, asyncio.Future[Outcome]] = {}

    async def owned(self, task_id: str, team: str) -> Task:
        task = self.records.get(task_id)
        if task is None:
            task = await self.store.get_task(task_id)
            if task is not None and task.task_id:
                self.records[task_id] = task
        if task is None or task.team != team or task.status == PENDING or task.task_id != task_id:
            raise NotFound(f"No task {task_id!r} for this team.", param="task_id")
        return task

    async def poll(self, task: Task, ctx: RequestContext | None) -> Outcome:
        task_id = cast(str, task.task_id)  # polled tasks are TokenHub's: owned() and the poller check it
        final = self._final.get(task_id)
        if final is None and task.status in tokenhub.TERMINAL:
            stored = task if task.settled else await self.store.get_task(task_id)
            final = stored.final_body if stored is not None and stored.settled else None
            if final is not None:
                self._final[task_id] = final
        if final is not None:
            return Outcome(200, final)
        recent = self._recent.get(task_id)
        if recent is not None:
            return recent
        running = self._polling.get(task_id)
        if running is None:
            running = asyncio.ensure_future(self._poll_upstream(task, ctx))
            self._polling[task_id] = running
            running.add_done_callback(lambda _done: self._polling.pop(task_id, None))
        return await asyncio.shield(running)

    async def _poll_upstream(self, task: Task, ctx: RequestContext | None) -> Outcome:
        reply = await self._task_call(task, "GET", ctx)
        outcome = await self._after_reply(task, reply)
        if reply.status == 200:
            self._recent[cast(str, task.task_id)] = outcome
        return outcome

    async def cancel(self, task: Task, ctx: RequestContext) -> Outcome:
        reply = await self._task_call(task, "DELETE", ctx)
        outcome = await self._after_reply(task, reply)
        if reply.status == 200:
            self._recent[cast(str, task.task_id)] = outcome
        return outcome

    async def _task_call(self, task: Task, method: str, ctx: RequestContext | None) -> Reply:
        key = self.pool.key_for(task.key_name)
        if ctx is not None:
            ctx.upstream_key = task.key_name
        if key is None:
            raise UpstreamError(
                f"The upstream key {task.key_name!r} that created this task is no "
                "longer configured, so TokenHub cannot be asked about it.",
                code="upstream_key_unknown",
            )
        return await self.calls.call(
            key, tokenhub.TASK_ROUTE, method, tokenhub.task_path(cast(str, task.task_id)), None, ctx
        )

    async def _after_reply(self, task: Task, reply: Reply) -> Outcome:
        outcome = tokenhub.outcome_of(reply.status)
        if outcome == tokenhub.THROTTLED:
            raise RateLimited(
                "TokenHub is rate-limiting polls of this task; retry later.",
                retry_after=tokenhub.retry_after_s(reply.retry_after, self.clock()),
            )
        if outcome == tokenhub.KEY_REJECTED:
            raise UpstreamError(
                "TokenHub rejected the gateway's key for this task; it will be retried.", code="upstream_key_rejected"
            )
        if outcome == tokenhub.FAILED:
            raise UpstreamError(f"TokenHub answered {reply.status}.", code="upstream_server_error")
        body = self.pool.scrub(reply.body)
        if reply.status != 200:
            return Outcome(reply.status, body)
        data = _json(body)
        if not isinstance(data, dict) or not isinstance(data.get("status"), str):
            raise UpstreamError("TokenHub's answer had no task status.", code="upstream_bad_response")
        try:
            await self.observe(task, data, body)
        except StoreUnavailable:
            # Not settled yet: the poller settles it once the store is back.
            self.log.warning("task.observe_deferred", task_id=task.task_id, reason="store_unavailable")
        return Outcome(200, body)

    async def observe(self, task: Task, data: dict[str, Any], raw: bytes) -> None:
        """Record what TokenHub said of a task: a new status, or its settlement at the first terminal one.
        The answer is cached as final only once the store holds the settlement."""
        task_id = cast(str, task.task_id)
        status = data["status"]
        if status in tokenhub.TERMINAL:
            await self.settlement.settle(task, status, data, raw)
            self._final[task_id] = raw
        elif status != task.status and status in ("queued", "running"):
            task.status = status
            await self.store.set_status(task_id, status, self.clock())


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
