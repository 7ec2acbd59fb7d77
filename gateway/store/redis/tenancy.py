"""Teams, users, gateway keys and the audit log in the Redis store (store/base.py's Roster section, SPEC §15).

A change is read, then written by one script (APPLY) that first checks that what was read is still there as
read (compare and set); when another replica changed it in between, the change is read and tried again. So the
records are encoded here, exactly, and the script only compares and writes bytes: the change, its audit row,
the roster version (INCR) and a note of what changed at that version, then PUBLISH on "<prefix>roster", which
wakes every replica's roster_wait at once. Each change carries an id the script remembers for an hour, so a
script run twice (redis-py retries once after a lost connection) answers as the first run did.

Keys, under the prefix:
    tn:v                 str   the roster version
    tn:chg               zset  "t:NAME" | "u:NAME" | "k:ID" by the version of its last change
    tn:t, tn:u           hash  team / user name → record (JSON)
    tn:td                hash  a deleted team's name → when (unix seconds): such a name is not taken again
    tn:ue                hash  tenancy.email_key of a user's e-mail → the user's name: one user an e-mail
    tn:ut:{team}         zset  the team's users (score 0)
    tn:k                 hash  key id → record (JSON array)
    tn:kh                hash  key sha256 → key id
    tn:kl                hash  key id → last used (unix seconds, to the minute)
    tn:kx, tn:kx:u:{user}, tn:kx:t:{team}   zset  key ids (score 0: by id)
    tn:a                 hash  audit id → row (JSON); tn:aid the last id
    tn:ax, tn:ax:t:{target}, tn:ax:a:{actor}   zset  audit ids (score: the id); tn:at zset  audit id by time
    tn:ax:m:{team}       zset  the ids of the audit rows that concern the team (tenancy.audit_teams)
    tn:op:{change id}    str   a change's answer (1 h)
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import orjson

from gateway.errors import Conflict, GatewayError, NotFound, StoreUnavailable, TeamNotEmpty
from gateway.store.budget import BudgetCheck, script_arg, take_reached
from gateway.store.redis.budget import BUDGET_SCRIPTS
from gateway.store.redis.tenancy_reads import CHANGES, TOUCH, RedisTenancyReads
from gateway.store.roster import audit_json, key_json, key_load, team_json, team_load, user_json, user_load
from gateway.tenancy import (
    KEY_CREATE,
    KEY_REVOKE,
    TEAM_CREATE,
    TEAM_DELETE,
    TEAM_UPDATE,
    USER_CREATE,
    USER_DELETE,
    USER_UPDATE,
    ApiKey,
    AuditDraft,
    AuditEntry,
    TeamRecord,
    UserRecord,
    audit_teams,
    created_doc,
    deleted_team,
    email_key,
    email_taken,
    key_doc,
    key_target,
    team_doc,
    team_target,
    user_doc,
    user_target,
)

T = TypeVar("T")
Doc = dict[str, Any] | None
OP_TTL_S = 3600
RETRIES = 20  # a change read again this often when other replicas keep changing what it read

# ARGV: the plan as JSON (Plan.json). → {'ok', version, audit id} | {failure code, check index}
APPLY = f"""
local plan = cjson.decode(ARGV[2])
local op = P .. 'tn:op:' .. plan.op
local done = redis.call('GET', op)
if done then
  local version, id = string.match(done, '^(%d+) (%d+)$')
  return {{'ok', tonumber(version), tonumber(id)}}
end
-- a check: {{'h', hash, field, expected ('' = absent), failure}} | {{'n', zset, count, failure}}
for i, c in ipairs(plan.checks) do
  if c[1] == 'h' then
    if (redis.call('HGET', P .. c[2], c[3]) or '') ~= c[4] then return {{c[5], i}} end
  elseif redis.call('ZCARD', P .. c[2]) ~= tonumber(c[3]) then
    return {{c[4], i}}
  end
end
for _, w in ipairs(plan.hset) do redis.call('HSET', P .. w[1], w[2], w[3]) end
for _, w in ipairs(plan.hdel) do redis.call('HDEL', P .. w[1], w[2]) end
for _, w in ipairs(plan.zadd) do redis.call('ZADD', P .. w[1], 0, w[2]) end
for _, w in ipairs(plan.zrem) do redis.call('ZREM', P .. w[1], w[2]) end
local version = tonumber(redis.call('GET', P .. 'tn:v')) or 0
if #plan.changed > 0 then
  version = redis.call('INCR', P .. 'tn:v')
  for _, m in ipairs(plan.changed) do redis.call('ZADD', P .. 'tn:chg', version, m) end
end
local id = redis.call('INCR', P .. 'tn:aid')
redis.call('HSET', P .. 'tn:a', id, plan.audit)
for _, index in ipairs({{'tn:ax', 'tn:ax:t:' .. plan.target, 'tn:ax:a:' .. plan.actor}}) do
  redis.call('ZADD', P .. index, id, id)
end
for _, team in ipairs(plan.teams) do redis.call('ZADD', P .. 'tn:ax:m:' .. team, id, id) end
redis.call('ZADD', P .. 'tn:at', plan.at, id)
redis.call('SET', op, version .. ' ' .. id, 'EX', {OP_TTL_S})
if #plan.changed > 0 then redis.call('PUBLISH', P .. 'roster', version) end
return {{'ok', version, id}}
"""

TENANCY_SCRIPTS = {"roster_apply": APPLY, "roster_touch": TOUCH, "roster_changes": CHANGES, **BUDGET_SCRIPTS}
TENANCY_READS = frozenset({"roster_changes"})


@dataclass
class Plan:
    """One change for APPLY: what must still be as read, what to write, what changed, and its audit row."""

    audit: AuditDraft
    action: str
    target: str
    before: Doc = None
    after: Doc = None
    failures: dict[str, GatewayError] = field(default_factory=dict)  # a check's failure code → what to raise
    checks: list[list[Any]] = field(default_factory=list)
    hset: list[list[str]] = field(default_factory=list)
    hdel: list[list[str]] = field(default_factory=list)
    zadd: list[list[str]] = field(default_factory=list)
    zrem: list[list[str]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def same(self, hash_key: str, name: str, raw: bytes | None, failure: str = "stale") -> None:
        """Refuse (with `failure`) unless the hash's field is still `raw` (None: still absent)."""
        self.checks.append(["h", hash_key, name, (raw or b"").decode(), failure])

    def count(self, zset: str, members: int, failure: str = "stale") -> None:
        """Refuse (with `failure`) unless the sorted set still holds this many members."""
        self.checks.append(["n", zset, members, failure])

    def json(self) -> bytes:
        return orjson.dumps(
            {
                "op": secrets.token_hex(12),
                "checks": self.checks,
                "hset": self.hset,
                "hdel": self.hdel,
                "zadd": self.zadd,
                "zrem": self.zrem,
                "changed": self.changed,
                "audit": audit_json(self.audit, self.action, self.target, self.before, self.after).decode(),
                "target": self.target,
                "teams": audit_teams(self.target, self.before, self.after),
                "actor": self.audit.actor,
                "at": repr(float(self.audit.at)),
            }
        )


def _missing(what: str, name: str, param: str) -> NotFound:
    return NotFound(f"No {what} {name!r}.", code="not_found", param=param)


def _exists(what: str, name: str) -> Conflict:
    return Conflict(f"A {what} named {name!r} exists already.", param="name")


class RedisTenancy(RedisTenancyReads):
    """Mixed into RedisStore (its `_eval`, `_do`, `_k`, `now` and connection `_r`)."""

    async def _apply(self, plan: Plan) -> int | None:
        """Run a plan: the version it reached, None when what it read has changed since (read again)."""
        reply = await self._eval("roster_apply", plan.json())
        word = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if word == "ok":
            return int(reply[1])
        if word == "stale":
            return None
        raise plan.failures[word]

    async def _change(self, build: Callable[[], Awaitable[tuple[Plan, T]]]) -> T:
        for _ in range(RETRIES):
            plan, result = await build()
            if await self._apply(plan) is not None:
                return result
        raise StoreUnavailable("The roster kept changing under this change: retry it.")

    async def _hget(self, hash_key: str, name: str) -> bytes | None:
        raw: bytes | None = await self._do(self._r.hget(self._k(hash_key), name))
        return raw

    async def _user_keys(self, name: str) -> tuple[list[str], list[bytes]]:
        """A user's key ids and records, as they are now."""
        ids = [i.decode() for i in await self._do(self._r.zrange(self._k("tn:kx:u", name), 0, -1))]
        raws = await self._do(self._r.hmget(self._k("tn:k"), ids)) if ids else []
        return ids, raws

    async def get_team(self, name: str) -> TeamRecord | None:
        raw = await self._hget("tn:t", name)
        return team_load(raw) if raw else None

    async def get_user(self, name: str) -> UserRecord | None:
        raw = await self._hget("tn:u", name)
        return user_load(raw) if raw else None

    # teams and users

    async def save_team(self, team: TeamRecord, audit: AuditDraft, create: bool) -> TeamRecord:
        async def build() -> tuple[Plan, TeamRecord]:
            raw = await self._hget("tn:t", team.name)
            old = team_load(raw) if raw else None
            if create and old:
                raise _exists("team", team.name)
            if not create and not old:
                raise _missing("team", team.name, "name")
            if create and await self._hget("tn:td", team.name):
                raise deleted_team(team.name)
            kept = replace(team, created_at=old.created_at if old else audit.at, updated_at=audit.at)
            action = TEAM_CREATE if create else TEAM_UPDATE
            plan = Plan(audit, action, team_target(team.name), team_doc(old) if old else None, team_doc(kept))
            plan.failures["conflict"] = _exists("team", team.name)
            plan.failures["deleted"] = deleted_team(team.name)
            plan.same("tn:t", team.name, raw, "conflict" if create else "stale")
            if create:
                plan.same("tn:td", team.name, None, "deleted")
            plan.hset.append(["tn:t", team.name, team_json(kept).decode()])
            plan.changed.append("t:" + team.name)
            return plan, kept

        return await self._change(build)

    async def delete_team(self, name: str, audit: AuditDraft) -> TeamRecord:
        async def build() -> tuple[Plan, TeamRecord]:
            raw = await self._hget("tn:t", name)
            if raw is None:
                raise _missing("team", name, "name")
            old = team_load(raw)
            plan = Plan(audit, TEAM_DELETE, team_target(name), team_doc(old), None)
            plan.failures["not_empty"] = TeamNotEmpty(
                f"The team {name!r} still has users: delete or move them first.", param="name"
            )
            plan.same("tn:t", name, raw)
            plan.count("tn:ut:" + name, 0, "not_empty")
            plan.hdel.append(["tn:t", name])
            plan.hset.append(["tn:td", name, repr(float(audit.at))])
            plan.changed.append("t:" + name)
            return plan, old

        return await self._change(build)

    async def save_user(self, user: UserRecord, audit: AuditDraft, create: bool, team_in_store: bool) -> UserRecord:
        async def build() -> tuple[Plan, UserRecord]:
            raw = await self._hget("tn:u", user.name)
            old = user_load(raw) if raw else None
            if create and old:
                raise _exists("user", user.name)
            if not create and not old:
                raise _missing("user", user.name, "name")
            kept = replace(user, created_at=old.created_at if old else audit.at, updated_at=audit.at)
            action = USER_CREATE if create else USER_UPDATE
            plan = Plan(audit, action, user_target(user.name), user_doc(old) if old else None, user_doc(kept))
            if team_in_store:
                team_raw = await self._hget("tn:t", user.team)
                if team_raw is None:
                    raise _missing("team", user.team, "team")
                plan.same("tn:t", user.team, team_raw)
            await self._claim_email(plan, user.name, old.email if old else None, user.email)
            plan.failures["conflict"] = _exists("user", user.name)
            plan.same("tn:u", user.name, raw, "conflict" if create else "stale")
            plan.hset.append(["tn:u", user.name, user_json(kept).decode()])
            plan.zadd.append(["tn:ut:" + kept.team, kept.name])
            if old and old.team != kept.team:
                plan.zrem.append(["tn:ut:" + old.team, kept.name])
                await self._move_keys(plan, kept.name, old.team, kept.team)
            if create:  # keys once issued under this name (to a config user since removed) are not the new user's
                plan.after = created_doc(kept, await self._revoke_all(plan, user.name, audit.at))
            plan.changed.append("u:" + user.name)
            return plan, kept

        return await self._change(build)

    async def _claim_email(self, plan: Plan, name: str, was: str | None, now: str | None) -> None:
        """The user's e-mail key taken (email_taken when another user holds it), its old one let go."""
        old_key, new_key = (email_key(e) if e else None for e in (was, now))
        if new_key:
            holder = await self._hget("tn:ue", new_key)
            if holder is not None and holder.decode() != name:
                raise email_taken()
            plan.same("tn:ue", new_key, holder)
            if holder is None:
                plan.hset.append(["tn:ue", new_key, name])
        if old_key and old_key != new_key:
            await self._let_go_email(plan, name, old_key)

    async def _let_go_email(self, plan: Plan, name: str, mail: str) -> None:
        holder = await self._hget("tn:ue", mail)
        if holder is not None and holder.decode() == name:
            plan.same("tn:ue", mail, holder)
            plan.hdel.append(["tn:ue", mail])

    async def _revoke_all(self, plan: Plan, name: str, at: float) -> list[ApiKey]:
        """Every key under the name not revoked yet, revoked by the plan (which checks them unchanged)."""
        ids, raws = await self._user_keys(name)
        plan.count("tn:kx:u:" + name, len(ids))
        revoked = [replace(k, revoked_at=at) for k in (key_load(r) for r in raws if r) if k.revoked_at is None]
        for key_id, key_raw in zip(ids, raws, strict=True):
            plan.same("tn:k", key_id, key_raw)
        for key in revoked:
            plan.hset.append(["tn:k", key.id, key_json(key).decode()])
            plan.changed.append("k:" + key.id)
        return revoked

    async def _move_keys(self, plan: Plan, name: str, old_team: str, new_team: str) -> None:
        ids, raws = await self._user_keys(name)
        plan.count("tn:kx:u:" + name, len(ids))
        for key_id, raw in zip(ids, raws, strict=True):
            if raw:
                plan.same("tn:k", key_id, raw)
                plan.hset.append(["tn:k", key_id, key_json(replace(key_load(raw), team=new_team)).decode()])
                plan.zrem.append(["tn:kx:t:" + old_team, key_id])
                plan.zadd.append(["tn:kx:t:" + new_team, key_id])
                plan.changed.append("k:" + key_id)

    async def delete_user(self, name: str, audit: AuditDraft) -> tuple[UserRecord, list[ApiKey]]:
        async def build() -> tuple[Plan, tuple[UserRecord, list[ApiKey]]]:
            raw = await self._hget("tn:u", name)
            if raw is None:
                raise _missing("user", name, "name")
            old = user_load(raw)
            plan = Plan(audit, USER_DELETE, user_target(name), None, None)
            revoked = await self._revoke_all(plan, name, audit.at)
            plan.before = {**user_doc(old), "api_keys": [{"id": k.id, "prefix": k.prefix} for k in revoked]}
            plan.same("tn:u", name, raw)
            if old.email:
                await self._let_go_email(plan, name, email_key(old.email))
            plan.hdel.append(["tn:u", name])
            plan.zrem.append(["tn:ut:" + old.team, name])
            plan.changed.append("u:" + name)
            return plan, (old, revoked)

        return await self._change(build)

    # keys

    async def add_key(self, key: ApiKey, audit: AuditDraft, user_in_store: bool) -> ApiKey:
        async def build() -> tuple[Plan, ApiKey]:
            held = Conflict("A key with this id or value exists already.", param="id")
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hexists(self._k("tn:k"), key.id)
                pipe.hexists(self._k("tn:kh"), key.sha256)
                if any(await self._do(pipe.execute())):
                    raise held
            kept = replace(key, created_at=audit.at, revoked_at=None, last_used_at=None)
            plan = Plan(audit, KEY_CREATE, key_target(key.id))
            if user_in_store:
                owner = await self._hget("tn:u", key.user)
                if owner is None:
                    raise _missing("user", key.user, "user")
                plan.same("tn:u", key.user, owner)
                kept = replace(kept, team=user_load(owner).team)
            plan.after = key_doc(kept)
            plan.failures["conflict"] = held
            plan.same("tn:k", key.id, None, "conflict")
            plan.same("tn:kh", key.sha256, None, "conflict")
            plan.hset += [["tn:k", key.id, key_json(kept).decode()], ["tn:kh", key.sha256, key.id]]
            plan.zadd += [["tn:kx", key.id], ["tn:kx:u:" + kept.user, key.id], ["tn:kx:t:" + kept.team, key.id]]
            plan.changed.append("k:" + key.id)
            return plan, kept

        return await self._change(build)

    async def revoke_key(self, key_id: str, audit: AuditDraft) -> ApiKey:
        while True:  # until revoked here, or found revoked already
            raw = await self._hget("tn:k", key_id)
            if raw is None:
                raise _missing("key", key_id, "id")
            old = key_load(raw)
            if old.revoked_at is not None:
                return old  # idempotent: no audit row, no version change
            kept = replace(old, revoked_at=audit.at)
            plan = Plan(audit, KEY_REVOKE, key_target(key_id), key_doc(old), key_doc(kept))
            plan.same("tn:k", key_id, raw)
            plan.hset.append(["tn:k", key_id, key_json(kept).decode()])
            plan.changed.append("k:" + key_id)
            if await self._apply(plan) is not None:
                return kept

    async def record_audit(self, audit: AuditDraft, action: str, target: str, before: Doc, after: Doc) -> AuditEntry:
        reply = await self._eval("roster_apply", Plan(audit, action, target, before, after).json())
        return AuditEntry(int(reply[2]), audit.at, audit.actor, action, target, before, after)

    async def check_budget(self, check: BudgetCheck, now: float) -> None:
        if check.watches:
            take_reached(check, await self._eval("budget_check", script_arg(check), repr(float(now))))
