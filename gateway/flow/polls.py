"""Polls and cancels of a task: answered from the gateway's cache once terminal, coalesced to one
upstream call per task per second while running, and settled at the first terminal status seen.
TokenHub's answer is stored and used as it was sent; clients get it scrubbed of key values (SPEC §4)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
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
# What a process keeps of its recent tasks, bounded by bytes (an entry bound would let large answers grow it):
TASK_RECORDS_BYTES = 8 * 1024 * 1024  # tasks by id (owner, key, status): ~16,000 of a typical create
TASK_RECORD_BYTES = 512  # a Task's fields and its entry beyond its meta (tracemalloc: ~480 bytes)
FINAL_ANSWERS_BYTES = 8 * 1024 * 1024  # terminal answers, scrubbed once and served to every later poll
FINAL_ENTRY_BYTES = 256


@dataclass(frozen=True, slots=True)
class Polled:
    """A poll's answer twice over: `outcome` for the client, scrubbed of key values; `raw` TokenHub's
    200 body exactly as sent, for the gateway's own use (result URLs), None on an error answer.
    The two are one object when there was nothing to scrub."""

    outcome: Outcome
    raw: bytes | None


def task_records(max_bytes: int = TASK_RECORDS_BYTES) -> LRUCache[str, Task]:
    """The tasks a process has seen recently, by TokenHub id, shared by creates and polls. They never keep a
    stored final body (`Polls.owned` drops it): terminal answers have their own cache."""
    return LRUCache(maxsize=max_bytes, getsizeof=_task_bytes)


def _task_bytes(task: Task) -> int:
    return TASK_RECORD_BYTES + len(task.meta or b"") + len(task.final_body or b"")


def _polled_bytes(polled: Polled) -> int:
    body = polled.outcome.body
    raw = polled.raw or b""
    return FINAL_ENTRY_BYTES + len(raw) + (len(body) if body is not raw else 0)


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
        self._final: LRUCache[str, Polled] = LRUCache(maxsize=FINAL_ANSWERS_BYTES, getsizeof=_polled_bytes)
        self._recent: TTLCache[str, Polled] = TTLCache(maxsize=50_000, ttl=POLL_COALESCE_S)
        self._polling: dict[str, asyncio.Future[Polled]] = {}

    async def owned(self, task_id: str, team: str) -> Task:
        task = self.records.get(task_id)
        if task is None:
            task = await self.store.get_task(task_id)
            if task is not None and task.task_id:
                self.records[task_id] = replace(task, final_body=None) if task.final_body else task
        if task is None or task.team != team or task.status == PENDING or task.task_id != task_id:
            raise NotFound(f"No task {task_id!r} for this team.", param="task_id")
        return task

    async def poll(self, task: Task, ctx: RequestContext | None) -> Outcome:
        """A client's poll: its answer, scrubbed of key values."""
        return (await self.latest(task, ctx)).outcome

    async def latest(self, task: Task, ctx: RequestContext | None) -> Polled:
        """TokenHub's latest answer on a task: from memory once terminal, else fetched (one call per
        task per second however many ask) and settled at the first terminal status."""
        task_id = cast(str, task.task_id)  # polled tasks are TokenHub's: owned() and the poller check it
        final = self._final.get(task_id)
        if final is None and task.status in tokenhub.TERMINAL:
            stored = task if task.settled and task.final_body else await self.store.get_task(task_id)
            if stored is not None and stored.settled and stored.final_body is not None:
                final = self._polled(stored.final_body)
                self._final[task_id] = final
        if final is not None:
            return final
        recent = self._recent.get(task_id)
        if recent is not None:
            return recent
        running = self._polling.get(task_id)
        if running is None:
            running = asyncio.ensure_future(self._poll_upstream(task, ctx))
            self._polling[task_id] = running
            running.add_done_callback(lambda _done: self._polling.pop(task_id, None))
        return await asyncio.shield(running)

    async def _poll_upstream(self, task: Task, ctx: RequestContext | None) -> Polled:
        reply = await self._task_call(task, "GET", ctx)
        polled = await self._after_reply(task, reply)
        if reply.status == 200:
            self._recent[cast(str, task.task_id)] = polled
        return polled

    async def cancel(self, task: Task, ctx: RequestContext) -> Outcome:
        reply = await self._task_call(task, "DELETE", ctx)
        polled = await self._after_reply(task, reply)
        if reply.status == 200:
            self._recent[cast(str, task.task_id)] = polled
        return polled.outcome

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

    async def _after_reply(self, task: Task, reply: Reply) -> Polled:
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
        if reply.status != 200:
            return Polled(Outcome(reply.status, self.pool.scrub(reply.body)), None)
        data = _json(reply.body)
        if not isinstance(data, dict) or not isinstance(data.get("status"), str):
            raise UpstreamError("TokenHub's answer had no task status.", code="upstream_bad_response")
        try:
            return await self.observe(task, data, reply.body)
        except StoreUnavailable:
            # Not settled yet: the poller settles it once the store is back.
            self.log.warning("task.observe_deferred", task_id=task.task_id, reason="store_unavailable")
        return self._polled(reply.body)

    async def observe(self, task: Task, data: dict[str, Any], raw: bytes) -> Polled:
        """Record what TokenHub said of a task (`raw`, stored as it was sent): a new status, or its
        settlement at the first terminal one. The answer is cached as final only once the store holds
        the settlement."""
        task_id = cast(str, task.task_id)
        status = data["status"]
        if status in tokenhub.TERMINAL:
            await self.settlement.settle(task, status, data, raw)
            final = self._polled(raw)
            self._final[task_id] = final
            return final
        if status != task.status and status in ("queued", "running"):
            task.status = status
            await self.store.set_status(task_id, status, self.clock())
        return self._polled(raw)

    def _polled(self, raw: bytes) -> Polled:
        return Polled(Outcome(200, self.pool.scrub(raw)), raw)


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
