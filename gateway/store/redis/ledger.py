"""The Redis store's ledger: task listings, the ledger's rows, an operator's resolution of an unknown row,
pruning (mixed into RedisStore)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from gateway.store.base import Task, check_figures, check_resolution
from gateway.store.redis.codec import decode_task

T = TypeVar("T")
LIST_SCAN_MAX = 10_000  # list_tasks with a filter looks at most this many tasks for one page


PAGE = 500


class RedisLedger:
    """Mixed into RedisStore (its `_eval`, `_do`, `_k` and connection `_r`)."""

    if TYPE_CHECKING:  # provided by RedisStore
        prefix: str
        _r: Any  # the redis-py client

        def _k(self, *parts: str) -> str: ...
        async def _do(self, aw: Awaitable[T]) -> T: ...
        async def _eval(self, name: str, *args: Any) -> Any: ...

    async def list_tasks(
        self,
        team: str,
        limit: int,
        after: str | None,
        status: str | None,
        order: str = "desc",
        include_deleted: bool = True,
    ) -> tuple[list[Task], bool]:
        """With a status filter or deleted tasks left out, at most LIST_SCAN_MAX tasks past the cursor
        are looked at for one page."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        found = await self._eval(
            "list", team, after or "", status or "", limit, LIST_SCAN_MAX, order, "" if include_deleted else "1"
        )
        tasks = cast(list[Task], [decode_task(pairs) for pairs in found])  # the script sends stored rows only
        return tasks[:limit], len(tasks) > limit

    async def mark_deleted(self, task_id: str, now: float) -> Task | None:
        return decode_task(await self._eval("mark_deleted", task_id, repr(float(now))))

    async def resolve_unknown(
        self, ref: str, status: str, billed_ms: int, cost_micros: int, resolved_by: str, now: float
    ) -> Task:
        check_resolution(status, resolved_by)
        check_figures(billed_ms=billed_ms, cost_micros=cost_micros)
        row = await self._eval("resolve", ref, status, billed_ms, cost_micros, resolved_by, repr(float(now)))
        return cast(Task, decode_task(row))  # the script answers NOTFOUND rather than nothing

    async def ledger(
        self, since: float | None, until: float | None, team: str | None, user: str | None, model: str | None
    ) -> list[Task]:
        rids = await self._do(
            self._r.zrangebyscore(
                self._k("all"),
                "-inf" if since is None else repr(float(since)),
                "+inf" if until is None else f"({float(until)!r}",
            )
        )
        tasks: list[Task] = []
        for start in range(0, len(rids), PAGE):
            async with self._r.pipeline(transaction=False) as pipe:
                for rid in rids[start : start + PAGE]:
                    pipe.hgetall(self.prefix.encode() + b"t:" + rid)
                replies = await self._do(pipe.execute())
            for raw in replies:
                task = decode_task([x for kv in raw.items() for x in kv])
                if (
                    task
                    and task.status != "create_failed"
                    and all(
                        want is None or got == want
                        for got, want in ((task.team, team), (task.user, user), (task.model, model))
                    )
                ):
                    tasks.append(task)
        return tasks

    async def prune(self, before: float) -> int:
        deleted = offset = 0
        while True:
            reply: list[int] = await self._eval("prune", f"({float(before)!r}", offset, PAGE)
            done, scanned = reply
            deleted += done
            offset += scanned - done
            if scanned < PAGE:
                return deleted

    async def purge_idempotency(self, now: float) -> int:
        """Nothing to do: every idempotency record carries a 24 h TTL and Redis removes it."""
        return 0
