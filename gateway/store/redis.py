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
from collections.abc import Awaitable
from dataclasses import asdict
from typing import Any, TypeVar, get_args, get_type_hints

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import RedisError

from ..errors import IdempotencyConflict, StoreUnavailable
from ..keypool import KeyHealth
from ..quota import WINDOW_S, Counters, RateState, Rejection, Subject, check, state_of
from .base import IDEM_TTL_S, TASK_FIELDS, Admission, IdemRecord, Task, Usage

T = TypeVar("T")
CLOCK_REFRESH_S = 5.0
HEALTH_CACHE_S = 0.2  # key health is read on every create; replicas see a change within this
LIST_SCAN_MAX = 10_000  # list_tasks with a status filter looks at most this many older tasks
PAGE = 500

# Shared by every script. ARGV[1] is the key prefix; the scripts' own arguments follow it.
PRELUDE = """
local P = ARGV[1]
local LIVE = {pending = true, queued = true, running = true}
local CORE = {'team', 'user', 'team_period', 'user_period', 'estimate_micros', 'estimate_ms',
              'status', 'key_name', 'idem_key', 'task_id', 'settled_at', 'created_at'}
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.17g', x) end
local function tkey(rid) return P .. 't:' .. rid end
local function ckey(scope, name, period) return P .. 'c:' .. scope .. ':' .. name .. ':' .. period end
local function wkey(scope, name) return P .. 'w:' .. scope .. ':' .. name end
local function ikey(team, key) return P .. 'i:' .. #team .. ':' .. team .. ':' .. key end
local function core(rid)  -- the fields the scripts need, or nil when there is no such task
  local v = redis.call('HMGET', tkey(rid), unpack(CORE))
  if not v[1] then return nil end
  local t = {}
  for i, f in ipairs(CORE) do if v[i] and v[i] ~= '' then t[f] = v[i] end end
  return t
end
local function bump(scope, name, delta)  -- an in-flight count, never below zero
  if redis.call('HINCRBY', P .. 'f:' .. scope, name, delta) < 0 then
    redis.call('HSET', P .. 'f:' .. scope, name, 0)
  end
end
local function owners(t) return {{'team', t.team, t.team_period}, {'user', t.user, t.user_period}} end
local function release(t)  -- give back what a live task holds: its reservation and its slots
  if not LIVE[t.status] then return end
  for _, s in ipairs(owners(t)) do
    local c = ckey(s[1], s[2], s[3])
    redis.call('HINCRBY', c, 'reserved_micros', -tonumber(t.estimate_micros))
    redis.call('HINCRBY', c, 'reserved_ms', -tonumber(t.estimate_ms))
    bump(s[1], s[2], -1)
  end
  if t.key_name then bump('key', t.key_name, -1) end
end
local function finish_idem(t, status, body)
  if not t.idem_key then return end
  local k = ikey(t.team, t.idem_key)
  if redis.call('EXISTS', k) == 1 then redis.call('HSET', k, 'done', 1, 'status', status, 'body', body) end
end
"""

# ARGV: rid, team, idem key or '', body hash, idem TTL s, estimate micros, estimate ms, created_at,
#   next_poll_at, n, then n × (scope, name, period, rpm, max in flight, budget micros, budget ms;
#   '' = unlimited), then the task's field/value pairs.
# → {'ok'} | {'busy'} (idempotency key taken) | {'no', now, subject index, spent_micros,
#   reserved_micros, spent_ms, reserved_ms, in_flight, rate-window times...}
ADMIT = """
local rid, team, idem, n = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[11])
if redis.call('EXISTS', P .. 'x:' .. rid) == 1 then return {'gone'} end  -- abandoned: a late copy
if redis.call('EXISTS', tkey(rid)) == 1 then return {'ok'} end
local now = clock()
for i = 0, n - 1 do
  local a = 12 + 7 * i
  local scope, name, period, rpm = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local c = redis.call('HMGET', ckey(scope, name, period), 'spent_micros', 'reserved_micros',
                       'spent_ms', 'reserved_ms')
  for j = 1, 4 do c[j] = tonumber(c[j]) or 0 end
  local in_flight = tonumber(redis.call('HGET', P .. 'f:' .. scope, name)) or 0
  local live = 0
  if rpm then
    redis.call('ZREMRANGEBYSCORE', wkey(scope, name), '-inf', fmt(now - 60))
    live = redis.call('ZCARD', wkey(scope, name))
  end
  local max_in, budget, budget_ms = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  if (rpm and live >= rpm) or (max_in and in_flight >= max_in)
      or (budget and c[1] + c[2] + tonumber(ARGV[7]) > budget)
      or (budget_ms and c[3] + c[4] + tonumber(ARGV[8]) > budget_ms) then
    local window = {}  -- only a refusal carries the newest `rpm` times, for its Retry-After
    if rpm and rpm > 0 then
      local w = redis.call('ZRANGE', wkey(scope, name), -rpm, -1, 'WITHSCORES')
      for k = 2, #w, 2 do window[#window + 1] = w[k] end
    end
    return {'no', fmt(now), i, c[1], c[2], c[3], c[4], in_flight, unpack(window)}
  end
end
if idem ~= '' then
  local k = ikey(team, idem)
  if redis.call('EXISTS', k) == 1 then return {'busy'} end
  redis.call('HSET', k, 'body_hash', ARGV[5], 'done', 0, 'status', 0, 'created_at', fmt(now))
  redis.call('EXPIRE', k, ARGV[6])
end
redis.call('HSET', tkey(rid), unpack(ARGV, 12 + 7 * n))
redis.call('ZADD', P .. 'all', ARGV[9], rid)
redis.call('ZADD', P .. 'due', ARGV[10], rid)
for i = 0, n - 1 do
  local a = 12 + 7 * i
  local c = ckey(ARGV[a], ARGV[a + 1], ARGV[a + 2])
  redis.call('HINCRBY', c, 'reserved_micros', ARGV[7])
  redis.call('HINCRBY', c, 'reserved_ms', ARGV[8])
  bump(ARGV[a], ARGV[a + 1], 1)
  if ARGV[a + 3] ~= '' then
    redis.call('ZADD', wkey(ARGV[a], ARGV[a + 1]), fmt(now), rid)
    redis.call('PEXPIRE', wkey(ARGV[a], ARGV[a + 1]), 61000)
  end
end
return {'ok'}
"""

# ARGV: rid. Undo all of admit; the tombstone refuses a copy of the admit that a slow Redis runs later.
CANCEL = """
local rid = ARGV[2]
redis.call('SET', P .. 'x:' .. rid, 1, 'EX', 3600)
local t = core(rid)
if not t then return 0 end
release(t)
redis.call('DEL', tkey(rid))
redis.call('ZREM', P .. 'all', rid)
redis.call('ZREM', P .. 'due', rid)
if t.task_id then
  redis.call('HDEL', P .. 'tid', t.task_id)
  redis.call('ZREM', P .. 'team:' .. t.team, rid)
end
if t.idem_key then redis.call('DEL', ikey(t.team, t.idem_key)) end
redis.call('ZREM', wkey('team', t.team), rid)
redis.call('ZREM', wkey('user', t.user), rid)
return 1
"""

# ARGV: rid, key name, limit → 1 when the key's slot is taken for the task.
ACQUIRE_KEY = """
local k = tkey(ARGV[2])
local held = redis.call('HGET', k, 'key_name')
if held == ARGV[3] then return 1 end
if redis.call('EXISTS', k) == 0 then return 0 end
if (tonumber(redis.call('HGET', P .. 'f:key', ARGV[3])) or 0) >= tonumber(ARGV[4]) then return 0 end
bump('key', ARGV[3], 1)
redis.call('HSET', k, 'key_name', ARGV[3])
return 1
"""

# ARGV: rid
RELEASE_KEY = """
local held = redis.call('HGET', tkey(ARGV[2]), 'key_name')
if held and held ~= '' then
  bump('key', held, -1)
  redis.call('HDEL', tkey(ARGV[2]), 'key_name')
end
"""

# ARGV: rid, task_id, status, now, reply status, reply body
RECORD_CREATED = """
local rid = ARGV[2]
local t = core(rid)
if not t then return 0 end
redis.call('HSET', tkey(rid), 'task_id', ARGV[3], 'status', ARGV[4], 'updated_at', ARGV[5])
redis.call('HSET', P .. 'tid', ARGV[3], rid)
redis.call('ZADD', P .. 'team:' .. t.team, t.created_at, rid)
finish_idem(t, ARGV[6], ARGV[7])
return 1
"""

# ARGV: rid, now, '1' when a reply follows, reply status, reply body
FAIL_CREATE = """
local rid = ARGV[2]
local t = core(rid)
if not t or t.settled_at then return 0 end
release(t)
redis.call('HSET', tkey(rid), 'status', 'create_failed', 'billed_ms', 0, 'cost_micros', 0,
           'settled_at', ARGV[3], 'updated_at', ARGV[3])
redis.call('ZREM', P .. 'due', rid)
if ARGV[4] == '1' then finish_idem(t, ARGV[5], ARGV[6])
elseif t.idem_key then redis.call('DEL', ikey(t.team, t.idem_key)) end
return 1
"""

# ARGV: task_id → the task's field/value pairs, or nil
GET = """
local rid = redis.call('HGET', P .. 'tid', ARGV[2])
if not rid then return false end
return redis.call('HGETALL', tkey(rid))
"""

# ARGV: task_id, status, now
SET_STATUS = """
local rid = redis.call('HGET', P .. 'tid', ARGV[2])
if rid and redis.call('HEXISTS', tkey(rid), 'settled_at') == 0 then
  redis.call('HSET', tkey(rid), 'status', ARGV[3], 'updated_at', ARGV[4])
end
"""

# ARGV: task_id or rid, status, billed ms, cost micros, estimated 0|1, now, '1' when a body follows,
#   final body → the settled task's field/value pairs, or nil when it was settled already
SETTLE = """
local rid = redis.call('HGET', P .. 'tid', ARGV[2]) or ARGV[2]
local t = core(rid)
if not t or t.settled_at then return false end
release(t)
for _, s in ipairs(owners(t)) do
  local c = ckey(s[1], s[2], s[3])
  redis.call('HINCRBY', c, 'spent_micros', ARGV[5])
  redis.call('HINCRBY', c, 'spent_ms', ARGV[4])
end
local k = tkey(rid)
redis.call('HSET', k, 'status', ARGV[3], 'billed_ms', ARGV[4], 'cost_micros', ARGV[5],
           'cost_estimated', ARGV[6], 'settled_at', ARGV[7], 'updated_at', ARGV[7])
if ARGV[8] == '1' then redis.call('HSET', k, 'final_body', ARGV[9]) else redis.call('HDEL', k, 'final_body') end
redis.call('ZREM', P .. 'due', rid)
return redis.call('HGETALL', k)
"""

# ARGV: team, after task_id or '', status or '', limit, scan cap → up to limit + 1 tasks, newest first
LIST = """
local z, status, want = P .. 'team:' .. ARGV[2], ARGV[4], tonumber(ARGV[5]) + 1
local start = 0
if ARGV[3] ~= '' then
  local anchor = redis.call('HGET', P .. 'tid', ARGV[3])
  local rank = anchor and redis.call('ZREVRANK', z, anchor)
  if not rank then return {} end
  start = rank + 1
end
local out, stop = {}, start + tonumber(ARGV[6])
while #out < want and start < stop do
  local rids = redis.call('ZREVRANGE', z, start, math.min(start + 99, stop - 1))
  if #rids == 0 then break end
  for _, rid in ipairs(rids) do
    if status == '' or redis.call('HGET', tkey(rid), 'status') == status then
      out[#out + 1] = redis.call('HGETALL', tkey(rid))
      if #out >= want then break end
    end
  end
  start = start + #rids
end
return out
"""

# ARGV: limit, lease s → the due tasks (as they were before the lease), leased until now + lease
DUE = """
local now = clock()
local lease_end = fmt(now + tonumber(ARGV[3]))
local out = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'due', '-inf', fmt(now), 'LIMIT', 0, ARGV[2])) do
  local fields = redis.call('HGETALL', tkey(rid))
  if #fields == 0 then
    redis.call('ZREM', P .. 'due', rid)
  else
    out[#out + 1] = fields
    redis.call('ZADD', P .. 'due', lease_end, rid)
    redis.call('HSET', tkey(rid), 'next_poll_at', lease_end)
  end
end
return out
"""

# ARGV: rid, next poll time
DEFER = """
if redis.call('EXISTS', tkey(ARGV[2])) == 1 then
  redis.call('HSET', tkey(ARGV[2]), 'next_poll_at', ARGV[3])
  redis.call('ZADD', P .. 'due', 'XX', ARGV[3], ARGV[2])
end
"""

# ARGV: '(' .. before, offset, count → {deleted, scanned}: the settled tasks among `count` rids
#   created before `before`, from `offset` on, are deleted
PRUNE = """
local deleted, rids = 0, redis.call('ZRANGEBYSCORE', P .. 'all', '-inf', ARGV[2], 'LIMIT', ARGV[3], ARGV[4])
for _, rid in ipairs(rids) do
  local t = core(rid)
  if not t or t.settled_at then
    redis.call('DEL', tkey(rid))
    redis.call('ZREM', P .. 'all', rid)
    if t and t.task_id then
      redis.call('HDEL', P .. 'tid', t.task_id)
      redis.call('ZREM', P .. 'team:' .. t.team, rid)
    end
    deleted = deleted + 1
  end
end
return {deleted, #rids}
"""

SCRIPTS = {"admit": ADMIT, "cancel": CANCEL, "acquire_key": ACQUIRE_KEY, "release_key": RELEASE_KEY,
           "record_created": RECORD_CREATED, "fail_create": FAIL_CREATE, "get": GET,
           "set_status": SET_STATUS, "settle": SETTLE, "list": LIST, "due": DUE, "defer": DEFER,
           "prune": PRUNE}


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


class RedisStore:
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
            raise StoreUnavailable(f"The gateway's store failed: {exc.__class__.__name__}.") from None

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

    # tasks

    async def get_task(self, task_id: str) -> Task | None:
        return _task(await self._eval("get", task_id))

    async def set_status(self, task_id: str, status: str, now: float) -> None:
        await self._eval("set_status", task_id, status, repr(now))

    async def settle(self, task_id: str, status: str, billed_ms: int, cost_micros: int,
                     estimated: bool, final_body: bytes | None, now: float) -> Task | None:
        body = ("1", final_body) if final_body is not None else ("", b"")
        return _task(await self._eval("settle", task_id, status, billed_ms, cost_micros, int(estimated),
                                      repr(now), *body))

    async def list_tasks(self, team: str, limit: int, after: str | None,
                         status: str | None) -> tuple[list[Task], bool]:
        """With a status filter, at most LIST_SCAN_MAX older tasks are looked at for one page."""
        found = await self._eval("list", team, after or "", status or "", limit, LIST_SCAN_MAX)
        tasks = [_task(pairs) for pairs in found]
        return tasks[:limit], len(tasks) > limit

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
