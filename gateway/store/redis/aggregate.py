"""The Redis store's grouped ledger figures (mixed into RedisStore), and the backfill that counts, once, the
rows settled before the figures existed (rollup.py has the keys and the scripts).

A figure is summed from four parts, each row in exactly one: the whole UTC days inside [since, until) from
the per-day hashes (whole months from the per-month ones, unless grouped by day); the settled rows of the
partial days at either end from the rows themselves; the rows in flight from the `due` zset (every unsettled
row is in it, and they are few); and, until the backfill is done, the settled rows past its progress that no
settlement counted. Each script reads a bounded amount (a few figure hashes, ROWS_PER_CALL rows), so none
holds Redis for long. The parts are read one after another, not in one snapshot: a row that settles while a
figure is read may be missed by that figure, never counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import Awaitable
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from gateway.errors import StoreUnavailable
from gateway.store.base import GROUP_BY, Group, LedgerFilter
from gateway.store.days import DAY_S, day_at_or_after, day_at_or_before

T = TypeVar("T")
EDGE_S = 2e-6  # a row's day is its created_at rounded to the microsecond: at most 0.5 µs before its midnight
KEYS_PER_CALL = 8  # figure hashes summed by one script
ROWS_PER_CALL = 2_000  # rows looked at by one script
LIVE_PER_CALL = 1_000  # rows in flight summed by one script
BACKFILL_BATCH = 500  # rows the backfill looks at per script (a few ms)
BACKFILL_PAUSE_S = 0.005  # between its batches, Redis serves the gateway
BACKFILL_RETRY_S = 5.0
_EPOCH = date(1970, 1, 1)
Sums = dict[str, list[int]]  # group → tasks, succeeded, failed, billed_ms, cost_micros, in flight, reserved
Piece = tuple[int, int, list[str]]  # days [first, stop) and the figure keys (under the prefix) and days that sum them


def day_of(moment: float) -> int:
    """The days since 1970-01-01 of a row created at `moment`: its date as datetime.fromtimestamp gives it."""
    return (datetime.fromtimestamp(moment, UTC).date() - _EPOCH).days


def day_name(day: int) -> str:
    return (_EPOCH + timedelta(days=day)).isoformat()


def _month_start(day: int) -> int:
    """The first day of the month that follows `day`'s."""
    when = _EPOCH + timedelta(days=day)
    following = date(when.year + when.month // 12, when.month % 12 + 1, 1)
    return (following - _EPOCH).days


def pieces(first: int, stop: int, by: str, view: str) -> list[Piece]:
    """The figure keys covering the days [first, stop), KEYS_PER_CALL at a time: days, and whole months
    between them unless grouped by day; of the figures by team alone for view 'team'."""
    suffix = "t" if view == "team" else ""
    keys: list[tuple[int, int, str, str]] = []  # first day, stop day, key, day name (for a day's key)
    day = first
    while day < stop:
        following = _month_start(day)
        name = day_name(day)
        if by != "day" and name.endswith("-01") and following <= stop:
            keys.append((day, following, f"r:m{suffix}:{name[:7]}", ""))
            day = following
        else:
            keys.append((day, day + 1, f"r:d{suffix}:{name}", name))
            day += 1
    out: list[Piece] = []
    for start in range(0, len(keys), KEYS_PER_CALL):
        chunk = keys[start : start + KEYS_PER_CALL]
        out.append((chunk[0][0], chunk[-1][1], [part for _, _, key, name in chunk for part in (key, name)]))
    return out


def _score(moment: float) -> str:
    return "-inf" if moment == -math.inf else "+inf" if moment == math.inf else repr(moment)


def filter_args(flt: LedgerFilter) -> list[str]:
    return ["" if value is None else "=" + value for value in (flt.team, flt.user, flt.model)]


def merge(sums: Sums, flat: list[Any], sign: int = 1) -> None:
    """Add a script's groups (a name and seven sums each) to `sums`."""
    for at in range(0, len(flat), 8):
        into = sums.setdefault(flat[at].decode(), [0] * 7)
        for index in range(7):
            into[index] += sign * int(flat[at + 1 + index])


class RedisAggregates:
    """Mixed into RedisStore (its `_eval`, `_do`, `_k` and connection `_r`)."""

    if TYPE_CHECKING:  # provided by RedisStore
        prefix: str
        _r: Any  # the redis-py client

        def _k(self, *parts: str) -> str: ...
        async def _do(self, aw: Awaitable[T]) -> T: ...
        async def _eval(self, name: str, *args: Any) -> Any: ...

    _backfilling: asyncio.Task[None] | None = None
    backfill_batch = BACKFILL_BATCH  # rows per backfill script (a test may set fewer before open)

    async def aggregate(self, by: str, flt: LedgerFilter) -> list[Group]:
        if by not in GROUP_BY:
            raise ValueError(f"group by one of {', '.join(GROUP_BY)}, not {by!r}")
        low = -math.inf if flt.since is None else float(flt.since)
        high = math.inf if flt.until is None else float(flt.until)
        sums: Sums = {}
        if low < high:
            first, stop = await self._whole_days(low, high)
            if first < stop:
                await self._figures(sums, by, flt, first, stop, low, high)
                await self._edges(sums, by, flt, first, stop, low, high)
            else:
                await self._rows(sums, by, flt, (_score(low), b""), high, "any")
            await self._live(sums, by, flt, low, high)
        groups = [
            Group(name, n, ok, bad, live, ms, micros, reserved)
            for name, (n, ok, bad, ms, micros, live, reserved) in sums.items()
            if n > 0
        ]
        return sorted(groups, key=lambda group: group.key)

    async def _whole_days(self, low: float, high: float) -> tuple[int, int]:
        """The days [first, stop) whose figures are read: every moment of them in [low, high), none before
        the first row or figure nor after the last (an open range, or a wide one, reads no empty day)."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zrange(self._k("r:months"), 0, 0)
            pipe.zrange(self._k("r:months"), -1, -1)
            pipe.zrange(self._k("all"), 0, 0, withscores=True)
            pipe.zrange(self._k("all"), -1, -1, withscores=True)
            months_first, months_last, rows_first, rows_last = await self._do(pipe.execute())
        starts = [_month_day(m) for m in months_first] + [day_of(score) for _, score in rows_first]
        ends = [_month_start(_month_day(m)) for m in months_last] + [day_of(score) + 1 for _, score in rows_last]
        first = min(starts, default=0)
        stop = max(ends, default=0)
        if low > -math.inf:
            first = max(first, day_at_or_after(low))
        if high < math.inf:
            stop = min(stop, day_at_or_before(high))
        return first, stop

    async def _figures(
        self, sums: Sums, by: str, flt: LedgerFilter, first: int, stop: int, low: float, high: float
    ) -> None:
        """The whole days' figures and, while the backfill runs, the rows past its progress it has not counted
        (as the figures were read: a row it counts after that is one of them)."""
        # Grouped by team or day with no user or model filter, the figures by team alone hold all it needs.
        view = "team" if by in ("team", "day") and flt.user is None and flt.model is None else "full"
        for day, end, keys in pieces(first, stop, by, view):
            state, *groups = await self._eval("rollup_sum", by, *filter_args(flt), view, *keys)
            merge(sums, groups)
            if state == b"done":
                continue
            start = max(low, day * DAY_S - EDGE_S)
            behind = float(state) if state else -math.inf
            position = ("(" + repr(behind), b"") if behind >= start else (_score(start), b"")
            await self._rows(sums, by, flt, position, min(high, end * DAY_S), "uncounted", (day, end))

    async def _edges(
        self, sums: Sums, by: str, flt: LedgerFilter, first: int, stop: int, low: float, high: float
    ) -> None:
        """The settled rows in [low, high) of the days before `first` and from `stop` on; and, when `low` is
        within a microsecond before `first`'s midnight, the rows the figures of `first` hold from before `low`."""
        if low < first * DAY_S:
            await self._rows(sums, by, flt, (_score(low), b""), first * DAY_S, "any", (None, first))
        if low > first * DAY_S - EDGE_S:
            position = (_score(first * DAY_S - EDGE_S), b"")
            await self._rows(sums, by, flt, position, low, "counted", (first, None), sign=-1)
        await self._rows(sums, by, flt, (_score(max(low, stop * DAY_S - EDGE_S)), b""), high, "any", (stop, None))

    async def _rows(
        self,
        sums: Sums,
        by: str,
        flt: LedgerFilter,
        position: tuple[str | bytes, bytes],
        end: float,
        which: str,
        days: tuple[int | None, int | None] = (None, None),
        sign: int = 1,
    ) -> None:
        """The settled rows from `position` to `end` whose day is in `days`, ROWS_PER_CALL per script."""
        day_args = ["" if day is None else str(day) for day in days]
        score, rid = position
        while True:
            score, rid, ended, *groups = await self._eval(
                "rollup_rows", score, rid, _score(end), ROWS_PER_CALL, which, *day_args, by, *filter_args(flt)
            )
            merge(sums, groups, sign)
            if ended:
                return

    async def _live(self, sums: Sums, by: str, flt: LedgerFilter, low: float, high: float) -> None:
        rids = await self._do(self._r.zrange(self._k("due"), 0, -1))
        for start in range(0, len(rids), LIVE_PER_CALL):
            chunk = rids[start : start + LIVE_PER_CALL]
            merge(sums, await self._eval("rollup_live", _score(low), _score(high), by, *filter_args(flt), *chunk))

    # the backfill

    async def start_backfill(self) -> None:
        """Count the rows settled before the figures existed: the first batch now (on a store that has
        none, or is done, it is the last), the others in the background."""
        if not await self.backfill_step():
            self._backfilling = asyncio.get_running_loop().create_task(self._backfill(), name="redis-ledger-backfill")

    async def stop_backfill(self) -> None:
        if self._backfilling is not None:
            self._backfilling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._backfilling
            self._backfilling = None

    async def backfill_step(self, batch: int | None = None) -> bool:
        """One batch of the backfill; True once it is done (by this process or another)."""
        _, done = await self._eval("rollup_backfill", batch or self.backfill_batch)
        return bool(done)

    async def _forget_figures(self) -> None:
        """For tests: the store as one written before it kept figures (none, no row counted, no backfill)."""
        keys = [key async for key in self._r.scan_iter(match=self._k("r:*"), count=1_000)]
        for start in range(0, len(keys), 1_000):
            await self._do(self._r.delete(*keys[start : start + 1_000]))
        for start in itertools.count(0, 1_000):
            rids = await self._do(self._r.zrange(self._k("all"), start, start + 999))
            async with self._r.pipeline(transaction=False) as pipe:
                for rid in rids:
                    pipe.hdel(self.prefix.encode() + b"t:" + rid, "rolled")
                await self._do(pipe.execute())
            if len(rids) < 1_000:
                return

    async def _backfill(self) -> None:
        log = structlog.get_logger("gateway.store")
        while True:  # until done; a store that cannot be written now is tried again later
            try:
                if await self.backfill_step():
                    log.info("store.ledger_backfilled")
                    return
                await asyncio.sleep(BACKFILL_PAUSE_S)
            except StoreUnavailable as exc:
                log.warning("store.ledger_backfill_paused", error=str(exc), retry_s=BACKFILL_RETRY_S)
                await asyncio.sleep(BACKFILL_RETRY_S)


def _month_day(member: bytes) -> int:
    """The first day of a month named YYYY-MM."""
    year, month = member.decode().split("-")
    return (date(int(year), int(month), 1) - _EPOCH).days
