"""The shared store: one Redis (a server, a Sentinel-watched master, or a Cluster) for every gateway replica.

Each operation that decides something is one Lua script, so it is atomic across replicas, and
the scripts read the time from Redis (`TIME`): the one clock all replicas share for rate windows,
idempotency records and poll leases. The `now` that admit and due_tasks receive is therefore not
used; now() gives callers the same clock. The scripts derive their keys from the prefix (most depend
on a stored task's fields), so every key shares the prefix's hash tag: on a Cluster all of them live
in one slot, where every script runs. Every script is safe to run twice: redis-py retries once after a
lost connection or a timeout.

A create costs two round trips: the admission, which also takes an upstream key's slot and brings back
the key health and rate windows that the create's other steps read, and the record of the task.

Keys, under the prefix (default "{thg}:"):
    t:{rid}                        hash  a task's fields (an absent field is None)
    tid                            hash  task_id → rid
    all, team:{team}               zset  rids by created_at (every task; a team's recorded tasks)
    due                            zset  unsettled rids by next poll time (a lease pushes it on)
    c:{scope}:{name}:{period}      hash  spent_micros, reserved_micros, spent_ms, reserved_ms
    f:{scope}                      hash  name → tasks in flight (scope team, user or key)
    w:{scope}:{name}               zset  rate window: rid by admission time (expires when idle)
    i:{len(team)}:{team}:{key}     hash  idempotency record, expires after 24 h
    kh                             hash  upstream key name → KeyHealth as JSON
    x:{rid}                        str   an abandoned admission's tombstone (1 h)
    r:…                                  the ledger's per-day and per-month figures: rollup.py
    tn:…                                 the roster (teams, users, gateway keys) and the audit log: tenancy.py
    cs:{id sha256}                 str   a console session, expiring with it: sessions.py
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar, cast

import orjson
from cachetools import TTLCache

from gateway.errors import IdempotencyConflict, StoreUnavailable
from gateway.policy.keyhealth import KeyHealth
from gateway.policy.quota import WINDOW_S, Counters, RateState, Rejection, Subject, check, state_of
from gateway.store.base import IDEM_TTL_S, Admission, IdemRecord, Task, Usage, check_figures, check_status
from gateway.store.budget import BudgetCheck, script_arg
from gateway.store.outbox import Item
from gateway.store.redis.budget import settled_row
from gateway.store.redis.calls import RedisCalls, RedisLink
from gateway.store.redis.codec import admitted_fields, decode_task
from gateway.store.redis.ledger import RedisLedger
from gateway.store.redis.outbox import RedisOutbox, item_args
from gateway.store.redis.prelude import PRELUDE
from gateway.store.redis.rollup import ROLLUP_READS
from gateway.store.redis.scripts import SCRIPTS
from gateway.store.redis.sessions import RedisSessions
from gateway.store.redis.tenancy import TENANCY_READS, TENANCY_SCRIPTS, RedisTenancy
from gateway.store.redis.url import CLUSTER, parse_url

T = TypeVar("T")
CLOCK_REFRESH_S = 5.0
HEALTH_CACHE_S = 0.2  # key health is read with every admission, else at most this often
RATE_CACHE_S = 1.0  # a rate window seen this recently answers the x-ratelimit headers of a poll
READS = frozenset({"clock", "get", "get_record", "list"}) | TENANCY_READS | ROLLUP_READS  # every other writes
_HASH_TAG = re.compile(r"\{[^{}]+\}")


def _limits(subject: Subject) -> list[Any]:
    limits = subject.limits
    video_ms = None if limits.video_seconds is None else limits.video_seconds * 1000
    return [
        subject.scope,
        subject.name,
        subject.period,
        limits.requests_per_minute,
        limits.max_concurrent_tasks,
        limits.budget_micros,
        video_ms,
    ]


class RedisStore(RedisLedger, RedisOutbox, RedisTenancy, RedisSessions):
    """`wait_replica`: acknowledge writes only once a replica has them (WAIT 1); None: as the URL says
    (`?wait_replica=`, else yes for a Sentinel deployment, whose master has replicas to fail over to).
    `connection_class` (a server URL only) lets a test see every round trip."""

    def __init__(
        self,
        url: str,
        prefix: str = "{thg}:",
        *,
        timeout_s: float = 2.0,
        max_connections: int = 64,
        wait_replica: bool | None = None,
        rate_cache_s: float = RATE_CACHE_S,
        connection_class: type | None = None,
    ) -> None:
        self.url, self.prefix = url, prefix
        self.target = parse_url(url)
        if self.target.mode == CLUSTER and not _HASH_TAG.search(prefix):
            raise ValueError(f"On a Redis Cluster the key prefix needs a hash tag ({{...}}), not {prefix!r}.")
        if self.target.mode == CLUSTER and wait_replica:
            raise ValueError("Waiting for a replica is for a server or a Sentinel's master, not a Cluster.")
        self.wait_replica = self.target.wait_replica if wait_replica is None else wait_replica
        self._timeout, self._max_connections = timeout_s, max_connections
        self._connection_class = connection_class
        self._link: RedisLink | None = None
        self._r: Any = None
        self._calls: RedisCalls | None = None
        self._offset, self._clock_due = 0.0, 0.0
        self._health: dict[str, KeyHealth] = {}
        self._health_raw: list[bytes] = []
        self._health_due = 0.0
        self._rates: TTLCache[tuple[str, str], tuple[int, int, float | None]] = TTLCache(10_000, rate_cache_s)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # open() sets _calls before any call
    async def _do(self, aw: Awaitable[T]) -> T:
        return await cast(RedisCalls, self._calls).do(aw)

    async def _eval(self, name: str, *args: Any) -> Any:
        return await cast(RedisCalls, self._calls).run(name, *args, write=name not in READS)

    async def open(self) -> None:
        self._link = RedisLink(
            self.target,
            timeout_s=self._timeout,
            max_connections=self._max_connections,
            wait_replica=self.wait_replica,
            connection_class=self._connection_class,
        )
        self._r = self._link.client
        self._calls = RedisCalls(
            self._link,
            self.prefix,
            {name: PRELUDE + body for name, body in {**SCRIPTS, **TENANCY_SCRIPTS}.items()},
            timeout_s=self._timeout,
            max_connections=self._max_connections,
        )
        await self._calls.load()
        await self._sync_clock()
        await self.start_backfill()

    async def close(self) -> None:
        await self.stop_backfill()
        if self._link is not None:
            await self._link.aclose()
            self._link = self._r = None

    async def ping(self) -> None:
        await self._do(self._r.set(self._k("ping"), b"1", px=10_000))  # a write: read-only Redis fails too

    async def now(self) -> float:
        """Redis's clock, from this process's clock and an offset refreshed every few seconds."""
        if time.monotonic() >= self._clock_due:
            self._clock_due = time.monotonic() + CLOCK_REFRESH_S
            try:
                await self._sync_clock()
            except StoreUnavailable:
                self._clock_due = time.monotonic() + 1  # keep the last offset; the next call retries
        return time.time() + self._offset

    async def _sync_clock(self) -> None:
        before = time.time()
        seconds, micros = await self._eval("clock")
        after = time.time()
        self._offset = seconds + micros / 1e6 - (before + after) / 2
        self._clock_due = time.monotonic() + CLOCK_REFRESH_S

    # creates

    async def idem_get(self, team: str, key: str) -> IdemRecord | None:
        raw = await self._do(self._r.hgetall(self._idem_key(team, key)))
        if not raw:
            return None
        return IdemRecord(
            raw[b"body_hash"].decode(),
            raw[b"done"] == b"1",
            int(raw[b"status"]),
            raw.get(b"body", b""),
            float(raw[b"created_at"]),
        )

    def _idem_key(self, team: str, key: str) -> str:
        return f"{self.prefix}i:{len(team.encode())}:{team}:{key}"

    async def admit(self, adm: Admission, now: float) -> Rejection | None:
        """`now` is not used: the rate window and the idempotency record take Redis's time. With
        `adm.keys`, the admission also takes a slot on one of them (task.key_name)."""
        task = adm.task
        check_figures(estimate_micros=task.estimate_micros, estimate_ms=task.estimate_ms, input_ms=task.input_ms)
        fields, raw = admitted_fields(task)
        reply = await self._eval(
            "admit",
            orjson.dumps(
                {
                    "rid": task.rid,
                    "team": task.team,
                    "idem": task.idem_key or "",
                    "hash": adm.body_hash or "",
                    "ttl": IDEM_TTL_S,
                    "micros": str(task.estimate_micros),
                    "ms": str(task.estimate_ms),
                    "created": repr(task.created_at),
                    "next": repr(task.next_poll_at),
                    "task": fields,
                    "subjects": [_limits(subject) for subject in adm.subjects],
                    "draw": adm.key_draw,
                    "keys": [[k.name, k.weight, k.max_concurrent_tasks] for k in adm.keys],
                }
            ),
            *raw,
        )
        if reply[0] == b"ok":
            self._learn(adm.subjects, *reply[2:])
            task.key_name = reply[1].decode() or None
            return None
        if reply[0] == b"gone":
            raise StoreUnavailable("This create was abandoned after a store failure; retry it.")
        if reply[0] == b"busy":
            raise IdempotencyConflict(
                "A request with this Idempotency-Key is still in flight.", code="idempotency_key_in_progress"
            )
        # Rebuild the rejection with the same rule on the figures the script decided on.
        _, server_now, index, spent, reserved, spent_ms, reserved_ms, in_flight, *window = reply
        return check(
            adm.subjects[index],
            Counters(spent, reserved, spent_ms, reserved_ms),
            in_flight,
            [float(w) for w in window],
            float(server_now),
            task.estimate_micros,
            task.estimate_ms,
        )

    def _learn(
        self, subjects: tuple[Subject, ...], server_now: bytes, health: list[bytes], windows: list[list[Any]]
    ) -> None:
        """What an admission brought back: the key health and the rate windows just after it."""
        if health != self._health_raw:
            it = iter(health)
            self._health = {k.decode(): KeyHealth(**orjson.loads(v)) for k, v in zip(it, it, strict=True)}
            self._health_raw = health
        self._health_due = time.monotonic() + HEALTH_CACHE_S
        for subject, (live, boundary) in zip(subjects, windows, strict=True):
            if subject.limits.requests_per_minute:
                self._rates[subject.scope, subject.name] = (
                    subject.limits.requests_per_minute,
                    live,
                    float(boundary) if boundary else None,
                )

    async def cancel_admission(self, rid: str) -> None:
        await self._eval("cancel", rid)
        self._rates.clear()  # its rate event is gone (cancels are rare: all are read again)

    async def acquire_key(self, rid: str, key_name: str, limit: int) -> bool:
        return bool(await self._eval("acquire_key", rid, key_name, limit))

    async def release_key(self, rid: str) -> None:
        await self._eval("release_key", rid)

    async def record_created(self, rid: str, task_id: str, status: str, now: float, reply: tuple[int, bytes]) -> None:
        await self._eval("record_created", rid, task_id, status, repr(now), *reply)

    async def fail_create(self, rid: str, now: float, reply: tuple[int, bytes] | None) -> None:
        await self._eval("fail_create", rid, repr(now), *(("1", *reply) if reply is not None else ("", 0, b"")))

    async def mark_unknown(
        self,
        rid: str,
        now: float,
        reply: tuple[int, bytes] | None,
        items: Sequence[Item] = (),
        alerts: BudgetCheck | None = None,
    ) -> Task:
        answer = ("1", *reply) if reply is not None else ("", 0, b"")
        row = await self._eval("mark_unknown", rid, repr(float(now)), *answer, script_arg(alerts), *item_args(items))
        return cast(Task, decode_task(settled_row(row, alerts)))  # the script answers NOTFOUND rather than nothing

    # tasks

    async def get_task(self, task_id: str) -> Task | None:
        return decode_task(await self._eval("get", task_id))

    async def get_record(self, ref: str) -> Task | None:
        return decode_task(await self._eval("get_record", ref))

    async def set_status(self, task_id: str, status: str, now: float) -> None:
        await self._eval("set_status", task_id, status, repr(now))

    async def settle(
        self,
        task_id: str,
        status: str,
        billed_ms: int,
        cost_micros: int,
        estimated: bool,
        final_body: bytes | None,
        now: float,
        items: Sequence[Item] = (),
        alerts: BudgetCheck | None = None,
    ) -> Task | None:
        check_status(status)
        check_figures(billed_ms=billed_ms, cost_micros=cost_micros)
        body = ("1", final_body) if final_body is not None else ("", b"")
        reply = await self._eval(
            "settle",
            task_id,
            status,
            billed_ms,
            cost_micros,
            int(estimated),
            repr(float(now)),
            *body,
            script_arg(alerts),
            *item_args(items),
        )
        return decode_task(settled_row(reply, alerts))

    async def due_tasks(self, now: float, limit: int, lease_s: float) -> list[Task]:
        """Due and lease end are judged by Redis's clock (`now` is not used), the same for every replica."""
        rows = await self._eval("due", limit, repr(float(lease_s)))
        return cast(list[Task], [decode_task(pairs) for pairs in rows])  # the script skips vanished rows

    async def defer_poll(self, rid: str, next_at: float) -> None:
        await self._eval("defer", rid, repr(float(next_at)))

    async def backlog(self) -> int:
        return sum(int(n) for n in await self._do(self._r.hvals(self._k("f:team"))))

    # figures

    async def usage(self, subjects: tuple[Subject, ...]) -> list[Usage]:
        async with self._r.pipeline(transaction=False) as pipe:
            for subject in subjects:
                pipe.hmget(
                    self._k("c", subject.scope, subject.name, subject.period),
                    "spent_micros",
                    "reserved_micros",
                    "spent_ms",
                    "reserved_ms",
                )
                pipe.hget(self._k("f", subject.scope), subject.name)
            replies = await self._do(pipe.execute())
        return [
            Usage(Counters(*(int(v or 0) for v in counters)), int(n or 0))
            for counters, n in zip(replies[::2], replies[1::2], strict=True)
        ]

    async def rate_state(self, scope: str, name: str, limit: int, now: float) -> RateState:
        """The window as this process's last admission (or read) left it, when that was under RATE_CACHE_S
        ago: another replica's creates since then are not counted yet. Else one round trip."""
        seen = self._rates.get((scope, name))
        if seen is not None and seen[0] == limit:
            return state_of(limit, seen[1], seen[2], now)
        now = await self.now()
        key = self._k("w", scope, name)
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zcount(key, f"({now - WINDOW_S!r}", "+inf")
            pipe.zrange(key, -limit, -limit, withscores=True)
            live, boundary = await self._do(pipe.execute())
        boundary = boundary[0][1] if boundary else None
        self._rates[scope, name] = (limit, int(live), boundary)
        return state_of(limit, int(live), boundary, now)

    # key pool

    async def key_health(self, fresh: bool = False) -> dict[str, KeyHealth]:
        """Shared by all replicas. Every admission brings it back; otherwise read at most every HEALTH_CACHE_S
        (always when `fresh`). This process's own saves show at once, another replica's with the next
        admission (or within HEALTH_CACHE_S)."""
        if fresh or time.monotonic() >= self._health_due:
            raw = await self._do(self._r.hgetall(self._k("kh")))
            self._health = {k.decode(): KeyHealth(**orjson.loads(v)) for k, v in raw.items()}
            self._health_raw = []
            self._health_due = time.monotonic() + HEALTH_CACHE_S
        return dict(self._health)

    async def save_key_health(self, name: str, health: KeyHealth) -> None:
        await self._do(self._r.hset(self._k("kh"), name, orjson.dumps(asdict(health))))
        self._health[name] = health
        self._health_raw = []  # the next admission's copy is taken as it is

    async def key_in_flight(self) -> dict[str, int]:
        raw = await self._do(self._r.hgetall(self._k("f:key")))
        return {k.decode(): int(v) for k, v in raw.items()}
