"""What the Redis store reads of the roster and the audit log, its bulk record of keys' last use, and the wait
for a roster change (mixed into RedisStore through RedisTenancy; key layout: tenancy.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import RedisError

from gateway.store.base import ROSTER_CHANGES_MAX
from gateway.store.roster import PAGE, audit_load, key_load, roster_of, team_load, user_load
from gateway.tenancy import ApiKey, AuditEntry, Roster, RosterChanges, audit_teams

T = TypeVar("T")
AUDIT_SCAN = 1_000  # ids looked at for one page when a filter is not the index read
TOUCH_CHUNK = 500  # keys per script run

# ARGV: (key id, unix seconds)... → 0; a key's last use only moves forward, unknown keys are skipped
TOUCH = """
for i = 2, #ARGV, 2 do
  if redis.call('HEXISTS', P .. 'tn:k', ARGV[i]) == 1 then
    if tonumber(ARGV[i + 1]) > tonumber(redis.call('HGET', P .. 'tn:kl', ARGV[i]) or '0') then
      redis.call('HSET', P .. 'tn:kl', ARGV[i], ARGV[i + 1])
    end
  end
end
return 0
"""

# ARGV: a version → {version, (member, record or '')...} | {-1} (ahead of the store) | {-2} (too many)
CHANGES = f"""
local now_at, since = tonumber(redis.call('GET', P .. 'tn:v')) or 0, tonumber(ARGV[2])
if since > now_at then return {{-1}} end
local members = redis.call('ZRANGEBYSCORE', P .. 'tn:chg', '(' .. since, '+inf', 'LIMIT', 0, {ROSTER_CHANGES_MAX + 1})
if #members > {ROSTER_CHANGES_MAX} then return {{-2}} end
local hashes, out = {{t = 'tn:t', u = 'tn:u', k = 'tn:k'}}, {{now_at}}
for _, m in ipairs(members) do
  out[#out + 1] = m
  out[#out + 1] = redis.call('HGET', P .. hashes[string.sub(m, 1, 1)], string.sub(m, 3)) or ''
end
return out
"""


class RedisTenancyReads:
    """Mixed into RedisStore (its `_eval`, `_do`, `_k`, `now` and connection `_r`)."""

    _pubsub: Any = None  # subscribed to "<prefix>roster" by the first roster_wait
    _wait_lock: asyncio.Lock | None = None
    _heard = 0  # the highest roster version read or announced

    if TYPE_CHECKING:  # provided by RedisStore
        prefix: str
        _r: Any

        def _k(self, *parts: str) -> str: ...
        async def _do(self, aw: Awaitable[T]) -> T: ...
        async def _eval(self, name: str, *args: Any) -> Any: ...
        async def now(self) -> float: ...

    # keys

    async def get_key(self, key_id: str) -> ApiKey | None:
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hget(self._k("tn:k"), key_id)
            pipe.hget(self._k("tn:kl"), key_id)
            raw, used = await self._do(pipe.execute())
        return key_load(raw, float(used) if used else None) if raw else None

    async def _keys(self, ids: list[bytes]) -> list[ApiKey]:
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hmget(self._k("tn:k"), ids)
            pipe.hmget(self._k("tn:kl"), ids)
            raws, used = await self._do(pipe.execute())
        return [key_load(raw, float(at) if at else None) for raw, at in zip(raws, used, strict=True) if raw]

    async def list_keys(
        self, user: str | None, team: str | None, limit: int, after: str | None
    ) -> tuple[list[ApiKey], str | None]:
        index = self._k("tn:kx:u", user) if user is not None else self._k("tn:kx:t", team) if team else self._k("tn:kx")
        filtered = user is not None and team is not None  # a user's keys, of one team only
        scan = max(limit + 1, AUDIT_SCAN) if filtered else limit + 1
        start = "(" + after if after else "-"
        ids = await self._do(self._r.zrangebylex(index, start, "+", 0, scan))
        keys = [k for k in await self._keys(ids) if not filtered or k.team == team]
        if len(keys) > limit:
            return keys[:limit], keys[limit - 1].id
        return keys, ids[-1].decode() if len(ids) == scan else None

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        pairs = [(key_id, repr(float(at))) for key_id, at in used.items()]
        for start in range(0, len(pairs), TOUCH_CHUNK):
            await self._eval("roster_touch", *(x for pair in pairs[start : start + TOUCH_CHUNK] for x in pair))

    # the audit log

    async def audit_page(
        self,
        since: float | None,
        target: str | None,
        actor: str | None,
        limit: int,
        after: int | None,
        team: str | None = None,
    ) -> tuple[list[AuditEntry], int | None]:
        """One index is read (target's, else team's, else actor's, else all); the other filters are checked on
        the rows it gives."""
        index = (
            self._k("tn:ax:t", target)
            if target
            else self._k("tn:ax:m", team)
            if team
            else self._k("tn:ax:a", actor)
            if actor
            else self._k("tn:ax")
        )
        start = after or 0
        if since is not None:  # rows are written in time order: the first at or after `since` bounds the ids
            first = await self._do(self._r.zrangebyscore(self._k("tn:at"), repr(float(since)), "+inf", 0, 1))
            if not first:
                return [], None
            start = max(start, int(first[0]) - 1)
        filtered = since is not None or sum(x is not None for x in (target, actor, team)) > 1
        scan = max(limit + 1, AUDIT_SCAN) if filtered else limit + 1
        ids = await self._do(self._r.zrangebyscore(index, f"({start}", "+inf", 0, scan))
        raws = await self._do(self._r.hmget(self._k("tn:a"), ids)) if ids else []
        entries = [
            entry
            for entry in (audit_load(int(i), raw) for i, raw in zip(ids, raws, strict=True) if raw)
            if (actor is None or entry.actor == actor)
            and (since is None or entry.at >= since)
            and (team is None or team in audit_teams(entry.target, entry.before, entry.after))
        ]
        if len(entries) > limit:
            return entries[:limit], entries[limit - 1].id
        return entries, int(ids[-1]) if len(ids) == scan else None

    # the roster

    async def roster_version(self) -> int:
        return int(await self._do(self._r.get(self._k("tn:v"))) or 0)

    async def roster_wait(self, version: int, timeout_s: float) -> int:
        """Subscribed once, on a connection of its own; one waiter at a time reads the messages. A message
        carries the version it announces, so a change costs no read; the version is read (GET) on subscribing
        and when timeout_s passes without news of a version above `version`."""
        if self._wait_lock is None:
            self._wait_lock = asyncio.Lock()
        async with self._wait_lock:
            try:
                if self._pubsub is None:
                    self._pubsub = self._r.pubsub()
                    await self._pubsub.subscribe(self.prefix + "roster")
                    self._heard = await self.roster_version()  # after subscribing: no change falls in between
                if self._heard <= version:
                    self._heard = max(self._heard, await self._news(version, timeout_s))
                if self._heard > version:
                    return self._heard
            except (RedisError, OSError, ValueError):
                self._pubsub = None  # subscribed again next time; the version is read below meanwhile
                await asyncio.sleep(min(timeout_s, 0.1))
        self._heard = await self.roster_version()
        return self._heard

    async def _news(self, version: int, timeout_s: float) -> int:
        """The first version announced above `version` within timeout_s, else -1."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
            if message is not None and int(message["data"]) > version:
                return int(message["data"])
        return -1

    async def roster_changes_since(self, version: int) -> RosterChanges | None:
        reply = await self._eval("roster_changes", version)
        if int(reply[0]) < 0:
            return None
        changes: dict[str, list[Any]] = {"t": [], "u": [], "k": [], "-t": [], "-u": []}
        for member, raw in zip(reply[1::2], reply[2::2], strict=True):
            kind, name = member.decode().split(":", 1)
            if not raw:
                changes["-" + kind].append(name)
            else:
                changes[kind].append({"t": team_load, "u": user_load, "k": key_load}[kind](raw))
        return RosterChanges(
            int(reply[0]),
            tuple(changes["t"]),
            tuple(changes["u"]),
            tuple(changes["k"]),
            tuple(changes["-t"]),
            tuple(changes["-u"]),
        )

    async def load_roster(self) -> Roster:
        parts, version = await roster_of(self.roster_pages())
        return parts.roster(version, await self.now())

    async def roster_pages(self) -> AsyncIterator[RosterChanges | None]:
        """Teams and users at once, the keys by HSCAN in pages (Redis is never held long), then brought to one
        version by the changes made meanwhile."""
        while True:
            start = await self.roster_version()
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hvals(self._k("tn:t"))
                pipe.hvals(self._k("tn:u"))
                teams, users = await self._do(pipe.execute())
            yield RosterChanges(start, teams=tuple(map(team_load, teams)), users=tuple(map(user_load, users)))
            del teams, users
            now, cursor = await self.now(), 0
            while True:
                cursor, page = await self._do(self._r.hscan(self._k("tn:k"), cursor, count=PAGE))
                yield RosterChanges(start, keys=tuple(k for k in map(key_load, page.values()) if k.live(now)))
                if not cursor:
                    break
            changes = await self.roster_changes_since(start)
            if changes is not None:
                yield changes
                return
            yield None
