"""The outbox and the archive's bookkeeping in the Redis store (see outbox.py). The scripts run after
redis_scripts.PRELUDE (ARGV[1] is the key prefix); SETTLE writes a settlement's items with OUTBOX_LUA.

Keys, under the prefix:
    ob:{id}         hash  an item: topic, payload, created_at, attempts
    obq:{topic}     zset  the topic's items by when they are next due (a claimed one: its lease end)
    obl:{topic}     zset  the topic's items leased now, by lease end (bounds the attempts at once)
    obt             set   topics that have had items
    obs:{topic}     hash  delivered, failed, gave_up, last_error, last_attempt_at
    af:{task id}    hash  variant → an archived file as JSON
    afz             zset  "{task id} {variant}" by archive time
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from gateway.store.outbox import ArchivedFile, Item, TopicStats, clip

T = TypeVar("T")

# Helpers for SETTLE: its items follow its own arguments as n, then n × (id, topic, payload, created_at).
OUTBOX_LUA = """
local function outbox_ok(first)  -- checked before the script's first write
  local n = tonumber(ARGV[first])
  if not n or n < 0 or #ARGV ~= first + 4 * n then return false end
  for i = 0, n - 1 do if not tonumber(ARGV[first + 4 + 4 * i]) then return false end end
  return true
end
local function outbox_add(first)
  for i = 0, tonumber(ARGV[first]) - 1 do
    local a = first + 1 + 4 * i
    local k = P .. 'ob:' .. ARGV[a]
    if redis.call('EXISTS', k) == 0 then
      redis.call('HSET', k, 'topic', ARGV[a + 1], 'payload', ARGV[a + 2], 'created_at', ARGV[a + 3], 'attempts', 0)
      redis.call('ZADD', P .. 'obq:' .. ARGV[a + 1], ARGV[a + 3], ARGV[a])
      redis.call('SADD', P .. 'obt', ARGV[a + 1])
    end
  end
end
"""

# ARGV: topic, limit, now, lease s → {id, payload, created_at, attempts}... leased until now + lease
CLAIM = """
local topic, now = ARGV[2], tonumber(ARGV[4])
local q, l = P .. 'obq:' .. topic, P .. 'obl:' .. topic
redis.call('ZREMRANGEBYSCORE', l, '-inf', fmt(now))
local room = tonumber(ARGV[3]) - redis.call('ZCARD', l)
local out = {}
if room <= 0 then return out end
local lease_end = fmt(now + tonumber(ARGV[5]))
for _, id in ipairs(redis.call('ZRANGEBYSCORE', q, '-inf', fmt(now), 'LIMIT', 0, room)) do
  local k = P .. 'ob:' .. id
  local v = redis.call('HMGET', k, 'payload', 'created_at')
  if not v[1] then
    redis.call('ZREM', q, id)
  else
    local attempts = redis.call('HINCRBY', k, 'attempts', 1)
    redis.call('ZADD', q, lease_end, id)
    redis.call('ZADD', l, lease_end, id)
    out[#out + 1] = {id, v[1], v[2], attempts}
  end
end
return out
"""

# ARGV: id, topic, now, 'delivered' | 'gave_up', error or ''
END = """
local id, topic = ARGV[2], ARGV[3]
if redis.call('DEL', P .. 'ob:' .. id) == 0 then return 0 end
redis.call('ZREM', P .. 'obq:' .. topic, id)
redis.call('ZREM', P .. 'obl:' .. topic, id)
local s = P .. 'obs:' .. topic
if ARGV[5] == 'gave_up' then redis.call('HINCRBY', s, 'failed', 1) end
redis.call('HINCRBY', s, ARGV[5], 1)
redis.call('HSET', s, 'last_attempt_at', ARGV[4])
if ARGV[6] ~= '' then redis.call('HSET', s, 'last_error', ARGV[6]) end
return 1
"""

# ARGV: id, topic, next at, now, error
RETRY = """
local id, topic = ARGV[2], ARGV[3]
if redis.call('EXISTS', P .. 'ob:' .. id) == 0 then return 0 end
redis.call('ZADD', P .. 'obq:' .. topic, ARGV[4], id)
redis.call('ZREM', P .. 'obl:' .. topic, id)
local s = P .. 'obs:' .. topic
redis.call('HINCRBY', s, 'failed', 1)
redis.call('HSET', s, 'last_attempt_at', ARGV[5], 'last_error', ARGV[6])
return 1
"""

# ARGV: topic prefix, topics to keep... → the number of items given up
DROP = """
local prefix, keep, dropped = ARGV[2], {}, 0
for i = 3, #ARGV do keep[ARGV[i]] = true end
for _, topic in ipairs(redis.call('SMEMBERS', P .. 'obt')) do
  if string.sub(topic, 1, #prefix) == prefix and not keep[topic] then
    local q = P .. 'obq:' .. topic
    local ids = redis.call('ZRANGE', q, 0, -1)
    for _, id in ipairs(ids) do redis.call('DEL', P .. 'ob:' .. id) end
    redis.call('DEL', q, P .. 'obl:' .. topic)
    redis.call('SREM', P .. 'obt', topic)
    if #ids > 0 then
      redis.call('HINCRBY', P .. 'obs:' .. topic, 'gave_up', #ids)
      redis.call('HSET', P .. 'obs:' .. topic, 'last_error', 'endpoint removed from the config')
    end
    dropped = dropped + #ids
  end
end
return dropped
"""

OUTBOX_SCRIPTS = {"outbox_claim": CLAIM, "outbox_end": END, "outbox_retry": RETRY, "outbox_drop": DROP}


def item_args(items: Sequence[Item]) -> list[Any]:
    """SETTLE's trailing arguments for a settlement's items."""
    args: list[Any] = [len(items)]
    for item in items:
        args += [item.id, item.topic, item.payload, repr(float(item.created_at))]
    return args


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


class RedisOutbox:
    """Mixed into RedisStore (its `_eval`, `_do`, `_k` and connection `_r`)."""

    if TYPE_CHECKING:  # provided by RedisStore
        prefix: str
        _r: Any  # the redis-py client

        def _k(self, *parts: str) -> str: ...
        async def _do(self, aw: Awaitable[T]) -> T: ...
        async def _eval(self, name: str, *args: Any) -> Any: ...

    async def outbox_claim(self, topic: str, limit: int, now: float, lease_s: float) -> list[Item]:
        rows = await self._eval("outbox_claim", topic, limit, repr(float(now)), repr(float(lease_s)))
        return [
            Item(i.decode(), topic, payload, float(created), int(attempts)) for i, payload, created, attempts in rows
        ]

    async def outbox_done(self, item: Item, now: float) -> None:
        await self._eval("outbox_end", item.id, item.topic, repr(float(now)), "delivered", "")

    async def outbox_give_up(self, item: Item, error: str, now: float) -> None:
        await self._eval("outbox_end", item.id, item.topic, repr(float(now)), "gave_up", clip(error))

    async def outbox_retry(self, item: Item, next_at: float, error: str, now: float) -> None:
        await self._eval("outbox_retry", item.id, item.topic, repr(float(next_at)), repr(float(now)), clip(error))

    async def outbox_drop_topics(self, prefix: str, keep: frozenset[str], now: float) -> int:
        return int(await self._eval("outbox_drop", prefix, *sorted(keep)))

    async def outbox_stats(self, topics: list[str]) -> dict[str, TopicStats]:
        async with self._r.pipeline(transaction=False) as pipe:
            for topic in topics:
                pipe.zcard(self._k("obq", topic))
                pipe.hgetall(self._k("obs", topic))
            replies = await self._do(pipe.execute())
        out = {}
        for topic, backlog, stats in zip(topics, replies[::2], replies[1::2], strict=True):
            at = stats.get(b"last_attempt_at")
            out[topic] = TopicStats(
                int(backlog),
                int(stats.get(b"delivered", 0)),
                int(stats.get(b"failed", 0)),
                int(stats.get(b"gave_up", 0)),
                _text(stats.get(b"last_error")),
                at and float(at),
            )
        return out

    # the archive's files

    async def archive_record(self, file: ArchivedFile) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("af", file.task_id), file.variant, orjson.dumps(asdict(file)))
            pipe.zadd(self._k("afz"), {f"{file.task_id} {file.variant}": file.archived_at})
            await self._do(pipe.execute())

    async def archive_files(self, task_id: str) -> list[ArchivedFile]:
        raw = await self._do(self._r.hgetall(self._k("af", task_id)))
        return sorted((ArchivedFile(**orjson.loads(v)) for v in raw.values()), key=lambda file: file.variant)

    async def archive_older(self, before: float, limit: int) -> list[ArchivedFile]:
        names = await self._do(self._r.zrangebyscore(self._k("afz"), "-inf", f"({float(before)!r}", 0, limit))
        out = []
        for name in names:
            task_id, variant = name.decode().rpartition(" ")[::2]
            raw = await self._do(self._r.hget(self._k("af", task_id), variant))
            if raw is None:
                await self._do(self._r.zrem(self._k("afz"), name))
            else:
                out.append(ArchivedFile(**orjson.loads(raw)))
        return out

    async def archive_forget(self, task_id: str, variant: str) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hdel(self._k("af", task_id), variant)
            pipe.zrem(self._k("afz"), f"{task_id} {variant}")
            await self._do(pipe.execute())
