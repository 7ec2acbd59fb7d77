"""Console sessions in the Redis store (store/base.py's Console sessions section, SPEC §16), mixed into
RedisStore: one string per session, `<prefix>cs:<id sha256>`, holding the session as JSON and expiring with it
(Redis removes it at expires_at, so nothing sweeps). The console's list of `unknown` rows: Redis keeps no
index of them, so the newest UNKNOWN_SCAN rows of the ledger are looked at, a short script per chunk."""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from gateway.store.base import Task
from gateway.store.redis.codec import decode_task
from gateway.store.sessions import UNKNOWN_SCAN, ConsoleSession

T = TypeVar("T")
SCAN_CHUNK = 2000  # rows one script looks at (a short script: never a long pause for the other replicas)
# KEYS[1] the ledger's `all`; ARGV: prefix, start (newest first), rows to look at, rows wanted → {rids, ended}.
UNKNOWN_LUA = """
local rids = redis.call('ZREVRANGE', KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[2]) + tonumber(ARGV[3]) - 1)
local found = {}
for _, rid in ipairs(rids) do
  if redis.call('HGET', ARGV[1] .. 't:' .. rid, 'status') == 'unknown' then
    found[#found + 1] = rid
    if #found >= tonumber(ARGV[4]) then break end
  end
end
return {found, #rids < tonumber(ARGV[3]) and 1 or 0}
"""


class RedisSessions:
    """Mixed into RedisStore (its `_do`, `_k` and connection `_r`)."""

    if TYPE_CHECKING:  # provided by RedisStore
        _r: Any  # the redis-py client
        prefix: str

        def _k(self, *parts: str) -> str: ...
        async def _do(self, aw: Awaitable[T]) -> T: ...

    async def save_session(self, session: ConsoleSession) -> None:
        value = orjson.dumps(
            {
                "kind": session.kind,
                "subject": session.subject,
                "created_at": session.created_at,
                "expires_at": session.expires_at,
            }
        )
        await self._do(self._r.set(self._k("cs", session.id_sha256), value, exat=math.ceil(session.expires_at)))

    async def get_session(self, id_sha256: str, now: float) -> ConsoleSession | None:
        raw = await self._do(self._r.get(self._k("cs", id_sha256)))
        if raw is None:
            return None
        doc = orjson.loads(raw)
        session = ConsoleSession(
            id_sha256, str(doc["kind"]), str(doc["subject"]), float(doc["created_at"]), float(doc["expires_at"])
        )
        return session if session.expires_at > now else None

    async def delete_session(self, id_sha256: str) -> None:
        await self._do(self._r.delete(self._k("cs", id_sha256)))

    async def unknown_tasks(self, limit: int) -> list[Task]:
        found: list[bytes] = []
        for start in range(0, UNKNOWN_SCAN, SCAN_CHUNK):
            rids, ended = await self._do(
                self._r.eval(UNKNOWN_LUA, 1, self._k("all"), self.prefix, start, SCAN_CHUNK, limit - len(found))
            )
            found += [rid for rid in rids if rid not in found]
            if len(found) >= limit or ended:
                break
        async with self._r.pipeline(transaction=False) as pipe:
            for rid in found[:limit]:
                pipe.hgetall(self._k("t", rid.decode()))
            rows = await self._do(pipe.execute())
        return [task for task in map(_task, rows) if task is not None]


def _task(raw: dict[bytes, bytes]) -> Task | None:
    raw.pop(b"rolled", None)  # the scripts' own flag (rollup.py)
    raw.pop(b"final_body", None)
    return decode_task([x for pair in raw.items() for x in pair]) if raw else None
