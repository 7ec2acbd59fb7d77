"""The Redis store's ledger: task listings, the ledger's rows and pages of them, an operator's resolution of an
unknown row, pruning (mixed into RedisStore; the grouped figures: aggregate.py)."""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from gateway.errors import ValidationError
from gateway.store.base import TASK_FIELDS, LedgerFilter, Task, check_figures, check_resolution
from gateway.store.budget import BudgetCheck, script_arg
from gateway.store.redis.aggregate import RedisAggregates, filter_args
from gateway.store.redis.budget import settled_row
from gateway.store.redis.codec import decode_task

T = TypeVar("T")
LIST_SCAN_MAX = 10_000  # list_tasks with a filter looks at most this many tasks for one page
PAGE = 500  # rows ledger() reads per round trip
PAGE_SCAN = 2_000  # rows one ledger_page script looks at (a filter may skip most of them)
PAGE_FIELDS = tuple(name for name in TASK_FIELDS if name not in ("final_body", "meta"))


class RedisLedger(RedisAggregates):
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
        self,
        ref: str,
        status: str,
        billed_ms: int,
        cost_micros: int,
        resolved_by: str,
        now: float,
        alerts: BudgetCheck | None = None,
    ) -> Task:
        check_resolution(status, resolved_by)
        check_figures(billed_ms=billed_ms, cost_micros=cost_micros)
        row = await self._eval(
            "resolve", ref, status, billed_ms, cost_micros, resolved_by, repr(float(now)), script_arg(alerts)
        )
        return cast(Task, decode_task(settled_row(row, alerts)))  # the script answers NOTFOUND rather than nothing

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
                raw.pop(b"rolled", None)  # the scripts' own flag (rollup.py)
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

    async def ledger_page(self, flt: LedgerFilter, limit: int, after: str | None) -> tuple[list[Task], str | None]:
        """Rows in (created_at, rid) order, the cursor being the last row's; a script looks at PAGE_SCAN rows
        at most, so a filter that skips many rows costs more scripts, never a long one."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        low = "-inf" if flt.since is None else repr(float(flt.since))
        high = "+inf" if flt.until is None else repr(float(flt.until))
        score, rid = _position(after) if after else (low, "")
        rows: list[Task] = []
        while True:
            score, rid, ended, *found = await self._eval(
                "ledger_page", score, rid, low, high, *filter_args(flt), limit + 1 - len(rows), PAGE_SCAN, *PAGE_FIELDS
            )
            rows += cast(list[Task], [decode_task(pairs) for pairs in found])
            if len(rows) > limit:
                last = rows[limit - 1]
                return rows[:limit], f"{last.created_at!r}:{last.rid}"
            if ended:
                return rows, None

    async def prune(self, before: float, batch: int = 500) -> int:
        """Every settled row but `unknown` ones created before `before`, oldest first, `batch` rows looked at
        per script."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        deleted = 0
        score, rid = "-inf", ""
        while True:
            done, score, rid, ended = await self._eval("prune", repr(float(before)), score, rid, batch)
            deleted += int(done)
            if ended:
                return deleted

    async def purge_idempotency(self, now: float) -> int:
        """Nothing to do: every idempotency record carries a 24 h TTL and Redis removes it."""
        return 0


def _position(after: str) -> tuple[str, str]:
    """A ledger_page cursor, "{created_at}:{rid}", as a position in `all`."""
    created_at, _, rid = after.partition(":")
    try:
        moment = float(created_at)
    except ValueError:
        moment = math.nan
    if not rid or not math.isfinite(moment):
        raise ValidationError("The cursor `after` is not one this listing gave.", param="after")
    return repr(moment), rid
