"""The shared store: one Redis for every gateway replica.

Each operation that decides something is one Lua script, so it is atomic across replicas, and
the scripts read the time from Redis (`TIME`): the one clock all replicas share for rate windows,
idempotency records and poll leases. The `now` that admit and due_tasks receive is therefore not
used; now() gives callers the same clock. The scripts derive their keys from the prefix (most depend
on a stored task's fields), so this needs a standalone Redis (or Sentinel), not a Cluster.
Every script is safe to run twice: redis-py retries once after a lost connection or a timeout.

Keys, under the prefix (default "thg:"):
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
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar, get_args, get_type_hints

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import RedisError, ResponseError

from ..errors import (
    DuplicateTaskId,
    GatewayError,
    IdempotencyConflict,
    NotFound,
    RecordRejected,
    StoreUnavailable,
    TaskNotUnknown,
)
from ..keypool import KeyHealth
from ..quota import WINDOW_S, Counters, RateState, Rejection, Subject, check, state_of
from .base import IDEM_TTL_S, TASK_FIELDS, Admission, IdemRecord, Task, Usage, check_figures, check_status
from .outbox import Item
from .outbox_redis import RedisOutbox, item_args
from .redis_scripts import PRELUDE, SCRIPTS

T = TypeVar("T")
CLOCK_REFRESH_S = 5.0
HEALTH_CACHE_S = 0.2  # key health is read on every create; replicas see a change within this
LIST_SCAN_MAX = 10_000  # list_tasks with a filter looks at most this many tasks for one page
PAGE = 500


def _decoder(hint: Any) -> Any:
    base = next((a for a in get_args(hint) if a is not type(None)), hint)
    return {bool: lambda b: b == b"1", int: int, float: float, bytes: bytes}.get(base, bytes.decode)


_DECODE = {name: _decoder(hint) for name, hint in get_type_hints(Task).items()}


def _encode(t: Task) -> list[Any]:
    """A task as hash field/value pairs; None fields are left out, booleans are 0/1."""
    pairs: list[Any] = []
    for name in TASK_FIELDS:
        value = getattr(t, name)
        if value is not None:
            pairs += [name, int(value) if isinstance(value, bool) else value]
    return pairs


def _task(pairs: list[bytes] | None) -> Task | None:
    if not pairs:
        return None
    it = iter(pairs)
    return Task(**{(name := k.decode()): _DECODE[name](v) for k, v in zip(it, it, strict=True)})


def _opt(value: int | None) -> int | str:
    return "" if value is None else value


_BUSY_REPLIES = frozenset({"MISCONF", "BUSY", "NOREPLICAS"})  # the server cannot write now


def _store_error(exc: Exception) -> GatewayError:
    """A script's refusal (its error reply's first word), a record the server refused, or unavailability."""
    if type(exc) is not ResponseError:
        return StoreUnavailable(f"The gateway's store failed: {exc.__class__.__name__}.")
    word, _, rest = str(exc).partition(" ")
    if word == "DUPLICATE":
        return DuplicateTaskId("TokenHub answered the create with a task id already in use.")
    if word == "NOTFOUND":
        return NotFound("No such task in the ledger.", param="task_id")
    if word == "NOTUNKNOWN":
        return TaskNotUnknown(f"The task is {rest}, not unknown: there is nothing to resolve.")
    if word in _BUSY_REPLIES:
        return StoreUnavailable(f"The gateway's store cannot write now: {word}.")
    reason = rest if word == "REJECTED" else "a script error"
    return RecordRejected(f"The store refused this record ({reason}).")


class RedisStore(RedisOutbox):
    def __init__(self, url: str, prefix: str = "thg:", *, timeout_s: float = 2.0,
                 max_connections: int = 64) -> None:
        self.url, self.prefix = url, prefix
        self._timeout, self._max_connections = timeout_s, max_connections
        self._r: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._offset, self._clock_due = 0.0, 0.0
        self._health: dict[str, KeyHealth] = {}
        self._health_due = 0.0

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _do(self, aw: Awaitable[T]) -> T:
        try:
            return await aw
        except (RedisError, OSError, TimeoutError) as exc:
            raise _store_error(exc) from None

    async def _eval(self, name: str, *args: Any) -> Any:
        return await self._do(self._scripts[name](keys=[], args=[self.prefix, *args]))

    async def open(self) -> None:
        # One retry after a dropped connection or a timeout: a restarted Redis is reconnected to.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=self._max_connections, timeout=self._timeout,
            socket_timeout=self._timeout, socket_connect_timeout=self._timeout,
            retry=Retry(EqualJitterBackoff(cap=0.5, base=0.05), 1))
        self._r = aioredis.Redis.from_pool(pool)
        self._scripts = {name: self._r.register_script(PRELUDE + body) for name, body in SCRIPTS.items()}
        async with self._r.pipeline(transaction=False) as pipe:
            for script in self._scripts.values():  # a restarted Redis gets them again on first use
                pipe.script_load(script.script)
            await self._do(pipe.execute())
        await self._sync_clock()

    async def close(self) -> None:
        if self._r is not None:
            await self._r.aclose()
            self._r = None

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
        seconds, micros = await self._do(self._r.time())
        after = time.time()
        self._offset = seconds + micros / 1e6 - (before + after) / 2
        self._clock_due = time.monotonic() + CLOCK_REFRESH_S

    # creates

    async def idem_get(self, team: str, key: str) -> IdemRecord | None:
        raw = await self._do(self._r.hgetall(self._idem_key(team, key)))
        if not raw:
            return None
        return IdemRecord(raw[b"body_hash"].decode(), raw[b"done"] == b"1", int(raw[b"status"]),
                          raw.get(b"body", b""), float(raw[b"created_at"]))

    def _idem_key(self, team: str, key: str) -> str:
        return f"{self.prefix}i:{len(team.encode())}:{team}:{key}"

    async def admit(self, adm: Admission, now: float) -> Rejection | None:
        """`now` is not used: the rate window and the idempotency record take Redis's time."""
        t = adm.task
        check_figures(estimate_micros=t.estimate_micros, estimate_ms=t.estimate_ms, input_ms=t.input_ms)
        args: list[Any] = [t.rid, t.team, t.idem_key or "", adm.body_hash or "", IDEM_TTL_S,
                           t.estimate_micros, t.estimate_ms, repr(t.created_at), repr(t.next_poll_at),
                           len(adm.subjects)]
        for s in adm.subjects:
            lim = s.limits
            video_ms = None if lim.video_seconds is None else lim.video_seconds * 1000
            args += [s.scope, s.name, s.period, *map(_opt, (lim.requests_per_minute,
                     lim.max_concurrent_tasks, lim.budget_micros, video_ms))]
        reply = await self._eval("admit", *args, *_encode(t))
        if reply[0] == b"ok":
            return None
        if reply[0] == b"gone":
            raise StoreUnavailable("This create was abandoned after a store failure; retry it.")
        if reply[0] == b"busy":
            raise IdempotencyConflict("A request with this Idempotency-Key is still in flight.",
                                      code="idempotency_key_in_progress")
        # Rebuild the rejection with the same rule on the figures the script decided on.
        _, server_now, i, spent, reserved, spent_ms, reserved_ms, in_flight, *window = reply
        return check(adm.subjects[i], Counters(spent, reserved, spent_ms, reserved_ms), in_flight,
                     [float(w) for w in window], float(server_now), t.estimate_micros, t.estimate_ms)

    async def cancel_admission(self, rid: str) -> None:
        await self._eval("cancel", rid)

    async def acquire_key(self, rid: str, key_name: str, limit: int) -> bool:
        return bool(await self._eval("acquire_key", rid, key_name, limit))

    async def release_key(self, rid: str) -> None:
        await self._eval("release_key", rid)

    async def record_created(self, rid: str, task_id: str, status: str, now: float,
                             reply: tuple[int, bytes]) -> None:
        await self._eval("record_created", rid, task_id, status, repr(now), *reply)

    async def fail_create(self, rid: str, now: float, reply: tuple[int, bytes] | None) -> None:
        await self._eval("fail_create", rid, repr(now), *(("1", *reply) if reply is not None else ("", 0, b"")))

    async def mark_unknown(self, rid: str, now: float, reply: tuple[int, bytes] | None,
                           items: Sequence[Item] = ()) -> Task:
        answer = ("1", *reply) if reply is not None else ("", 0, b"")
        return _task(await self._eval("mark_unknown", rid, repr(float(now)), *answer, *item_args(items)))

    # tasks

    async def get_task(self, task_id: str) -> Task | None:
        return _task(await self._eval("get", task_id))

    async def get_record(self, ref: str) -> Task | None:
        return _task(await self._eval("get_record", ref))

    async def set_status(self, task_id: str, status: str, now: float) -> None:
        await self._eval("set_status", task_id, status, repr(now))

    async def settle(self, task_id: str, status: str, billed_ms: int, cost_micros: int,
                     estimated: bool, final_body: bytes | None, now: float,
                     items: Sequence[Item] = ()) -> Task | None:
        check_status(status)
        check_figures(billed_ms=billed_ms, cost_micros=cost_micros)
        body = ("1", final_body) if final_body is not None else ("", b"")
        return _task(await self._eval("settle", task_id, status, billed_ms, cost_micros, int(estimated),
                                      repr(float(now)), *body, *item_args(items)))

    async def resolve_unknown(self, ref: str, billed_ms: int, cost_micros: int, now: float) -> Task:
        check_figures(billed_ms=billed_ms, cost_micros=cost_micros)
        return _task(await self._eval("resolve", ref, billed_ms, cost_micros, repr(float(now))))

    async def list_tasks(self, team: str, limit: int, after: str | None, status: str | None,
                         order: str = "desc", include_deleted: bool = True) -> tuple[list[Task], bool]:
        """With a status filter or deleted tasks left out, at most LIST_SCAN_MAX tasks past the cursor
        are looked at for one page."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        found = await self._eval("list", team, after or "", status or "", limit, LIST_SCAN_MAX, order,
                                 "" if include_deleted else "1")
        tasks = [_task(pairs) for pairs in found]
        return tasks[:limit], len(tasks) > limit

    async def mark_deleted(self, task_id: str, now: float) -> Task | None:
        return _task(await self._eval("mark_deleted", task_id, repr(float(now))))

    async def due_tasks(self, now: float, limit: int, lease_s: float) -> list[Task]:
        """Due and lease end are judged by Redis's clock (`now` is not used), the same for every replica."""
        return [_task(pairs) for pairs in await self._eval("due", limit, repr(float(lease_s)))]

    async def defer_poll(self, rid: str, next_at: float) -> None:
        await self._eval("defer", rid, repr(float(next_at)))

    async def backlog(self) -> int:
        return sum(int(n) for n in await self._do(self._r.hvals(self._k("f:team"))))

    # figures

    async def usage(self, subjects: tuple[Subject, ...]) -> list[Usage]:
        async with self._r.pipeline(transaction=False) as pipe:
            for s in subjects:
                pipe.hmget(self._k("c", s.scope, s.name, s.period),
                           "spent_micros", "reserved_micros", "spent_ms", "reserved_ms")
                pipe.hget(self._k("f", s.scope), s.name)
            replies = await self._do(pipe.execute())
        return [Usage(Counters(*(int(v or 0) for v in counters)), int(n or 0))
                for counters, n in zip(replies[::2], replies[1::2], strict=True)]

    async def rate_state(self, scope: str, name: str, limit: int, now: float) -> RateState:
        """One round trip: the live count, and the admission `limit` places from the newest."""
        now = await self.now()
        key = self._k("w", scope, name)
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zcount(key, f"({now - WINDOW_S!r}", "+inf")
            pipe.zrange(key, -limit, -limit, withscores=True)
            live, boundary = await self._do(pipe.execute())
        return state_of(limit, int(live), boundary[0][1] if boundary else None, now)

    async def ledger(self, since: float | None, until: float | None, team: str | None,
                     user: str | None, model: str | None) -> list[Task]:
        rids = await self._do(self._r.zrangebyscore(
            self._k("all"), "-inf" if since is None else repr(float(since)),
            "+inf" if until is None else f"({float(until)!r}"))
        tasks: list[Task] = []
        for i in range(0, len(rids), PAGE):
            async with self._r.pipeline(transaction=False) as pipe:
                for rid in rids[i:i + PAGE]:
                    pipe.hgetall(self.prefix.encode() + b"t:" + rid)
                replies = await self._do(pipe.execute())
            for raw in replies:
                t = _task([x for kv in raw.items() for x in kv])
                if t and t.status != "create_failed" and all(
                        want is None or got == want
                        for got, want in ((t.team, team), (t.user, user), (t.model, model))):
                    tasks.append(t)
        return tasks

    async def prune(self, before: float) -> int:
        deleted = offset = 0
        while True:
            done, scanned = await self._eval("prune", f"({float(before)!r}", offset, PAGE)
            deleted, offset = deleted + done, offset + scanned - done
            if scanned < PAGE:
                return deleted

    async def purge_idempotency(self, now: float) -> int:
        """Nothing to do: every idempotency record carries a 24 h TTL and Redis removes it."""
        return 0

    # key pool

    async def key_health(self) -> dict[str, KeyHealth]:
        """Shared by all replicas. Read at most every HEALTH_CACHE_S per process, since every create
        asks; this process's own saves show at once, another replica's within HEALTH_CACHE_S."""
        if time.monotonic() >= self._health_due:
            raw = await self._do(self._r.hgetall(self._k("kh")))
            self._health = {k.decode(): KeyHealth(**orjson.loads(v)) for k, v in raw.items()}
            self._health_due = time.monotonic() + HEALTH_CACHE_S
        return dict(self._health)

    async def save_key_health(self, name: str, health: KeyHealth) -> None:
        await self._do(self._r.hset(self._k("kh"), name, orjson.dumps(asdict(health))))
        self._health[name] = health

    async def key_in_flight(self) -> dict[str, int]:
        raw = await self._do(self._r.hgetall(self._k("f:key")))
        return {k.decode(): int(v) for k, v in raw.items()}
