"""The Redis store's Lua scripts: each operation that decides something is one script, so it is atomic
across replicas. Every script is given the key prefix as KEYS[1] (which routes it to the prefix's hash
slot on a Cluster) and as ARGV[1], its own arguments after it, and runs after PRELUDE (shared helpers).
Key layout: see store.py."""

from __future__ import annotations

from gateway.store.redis.outbox import OUTBOX_SCRIPTS
from gateway.store.redis.rollup import ROLLUP_SCRIPTS

# ARGV: the admission as JSON (RedisStore.admit: figures and times as strings), then the task's bytes
#   fields as name/value pairs (they may hold any byte, which JSON cannot carry).
# → {'ok', key taken or '', now, key health (HGETALL kh), {live, boundary or ''} per subject}
#   | {'busy'} (idempotency key taken) | {'gone'} (abandoned) | {'no', now, subject index, spent_micros,
#   reserved_micros, spent_ms, reserved_ms, in_flight, rate-window times...}
ADMIT = """
local a = cjson.decode(ARGV[2])
local rid, micros, ms = a.rid, figure(a.micros), figure(a.ms)
if not micros or not ms then return redis.error_reply('REJECTED estimate') end
if redis.call('EXISTS', P .. 'x:' .. rid) == 1 then return {'gone'} end  -- abandoned: a late copy
local now = clock()
local function admitted(key)  -- what the caller learns with its admission: no read before or after it
  local windows = {}
  for i, s in ipairs(a.subjects) do
    local rpm, live, boundary = tonumber(s[4]), 0, ''
    if rpm and rpm > 0 then
      live = redis.call('ZCOUNT', wkey(s[1], s[2]), '(' .. fmt(now - WINDOW_S), '+inf')
      local b = redis.call('ZRANGE', wkey(s[1], s[2]), -rpm, -rpm, 'WITHSCORES')
      if b[2] then boundary = b[2] end
    end
    windows[i] = {live, boundary}
  end
  return {'ok', key or '', fmt(now), redis.call('HGETALL', P .. 'kh'), windows}
end
if redis.call('EXISTS', tkey(rid)) == 1 then return admitted(redis.call('HGET', tkey(rid), 'key_name')) end
for i, s in ipairs(a.subjects) do  -- the Lua twin of quota.check, rate window included: change the two together
  local scope, name, period, rpm = s[1], s[2], s[3], tonumber(s[4])
  local c = redis.call('HMGET', ckey(scope, name, period), 'spent_micros', 'reserved_micros',
                       'spent_ms', 'reserved_ms')
  for j = 1, 4 do c[j] = tonumber(c[j]) or 0 end
  local in_flight = tonumber(redis.call('HGET', P .. 'f:' .. scope, name)) or 0
  local live = 0
  if rpm then
    redis.call('ZREMRANGEBYSCORE', wkey(scope, name), '-inf', fmt(now - WINDOW_S))
    live = redis.call('ZCARD', wkey(scope, name))
  end
  local max_in, budget, budget_ms = tonumber(s[5]), tonumber(s[6]), tonumber(s[7])
  if (rpm and live >= rpm) or (max_in and in_flight >= max_in)
      or (budget and c[1] + c[2] + micros > budget) or (budget_ms and c[3] + c[4] + ms > budget_ms) then
    local window = {}  -- only a refusal carries the newest `rpm` times, for its Retry-After
    if rpm and rpm > 0 then
      local w = redis.call('ZRANGE', wkey(scope, name), -rpm, -1, 'WITHSCORES')
      for k = 2, #w, 2 do window[#window + 1] = w[k] end
    end
    return {'no', fmt(now), i - 1, c[1], c[2], c[3], c[4], in_flight, unpack(window)}
  end
end
if a.idem ~= '' then
  local k = ikey(a.team, a.idem)
  if redis.call('EXISTS', k) == 1 then return {'busy'} end
  redis.call('HSET', k, 'body_hash', a.hash, 'done', 0, 'status', 0, 'created_at', fmt(now))
  redis.call('EXPIRE', k, a.ttl)
end
redis.call('HSET', tkey(rid), unpack(a.task))
if #ARGV > 2 then redis.call('HSET', tkey(rid), unpack(ARGV, 3)) end
redis.call('ZADD', P .. 'all', a.created, rid)
redis.call('ZADD', P .. 'due', a.next, rid)
for _, s in ipairs(a.subjects) do
  local c = ckey(s[1], s[2], s[3])
  redis.call('HINCRBY', c, 'reserved_micros', micros)
  redis.call('HINCRBY', c, 'reserved_ms', ms)
  bump(s[1], s[2], 1)
  if tonumber(s[4]) then
    redis.call('ZADD', wkey(s[1], s[2]), fmt(now), rid)
    redis.call('PEXPIRE', wkey(s[1], s[2]), (WINDOW_S + 1) * 1000)
  end
end
local key = choose_key(a.keys, a.draw, now)
if key then
  bump('key', key, 1)
  redis.call('HSET', tkey(rid), 'key_name', key)
end
return admitted(key)
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

# ARGV: rid. A settled task's slot was given back with its settlement.
RELEASE_KEY = """
local v = redis.call('HMGET', tkey(ARGV[2]), 'key_name', 'settled_at')
local held = v[1]
if held and held ~= '' and not v[2] then
  bump('key', held, -1)
  redis.call('HDEL', tkey(ARGV[2]), 'key_name')
end
"""

# ARGV: rid, task_id, status, now, reply status, reply body. A settled row is never reopened.
RECORD_CREATED = """
local rid = ARGV[2]
local t = core(rid)
if not t or t.settled_at then return 0 end
local holder = redis.call('HGET', P .. 'tid', ARGV[3])
if holder and holder ~= rid then return redis.error_reply('DUPLICATE') end
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
return fields(tkey(rid))
"""

# ARGV: task_id, status, now
SET_STATUS = """
local rid = redis.call('HGET', P .. 'tid', ARGV[2])
if rid and redis.call('HEXISTS', tkey(rid), 'settled_at') == 0 then
  redis.call('HSET', tkey(rid), 'status', ARGV[3], 'updated_at', ARGV[4])
end
"""

# ARGV: task_id or rid → the row's field/value pairs (none when there is no such row)
GET_RECORD = """
local rid = redis.call('HGET', P .. 'tid', ARGV[2]) or ARGV[2]
return fields(tkey(rid))
"""

# ARGV: task_id or rid, status, billed ms, cost micros, estimated 0|1, now, '1' when a body follows,
#   final body, the budget check or '' (budget.py), then the outbox items (outbox_redis.py) → the settled
#   task's field/value pairs (with a check: {them, the thresholds reached}), or nil when it was settled already
SETTLE = """
local billed, cost, now = figure(ARGV[4]), figure(ARGV[5]), tonumber(ARGV[7])
local watches = budget_watches(ARGV[10])
if not billed or not cost or not now or ARGV[3] == '' or (ARGV[6] ~= '0' and ARGV[6] ~= '1')
    or not watches or not outbox_ok(11) then
  return redis.error_reply('REJECTED settlement')
end
local rid = redis.call('HGET', P .. 'tid', ARGV[2]) or ARGV[2]
local t = core(rid)
if not t or t.settled_at then return false end
if not can_spend(t, cost, billed) then return redis.error_reply('REJECTED counter overflow') end
release(t)
spend(t, ARGV[5], ARGV[4])
local k = tkey(rid)
redis.call('HSET', k, 'status', ARGV[3], 'billed_ms', ARGV[4], 'cost_micros', ARGV[5],
           'cost_estimated', ARGV[6], 'settled_at', ARGV[7], 'updated_at', ARGV[7], 'rolled', 1)
count(t, ARGV[3], ARGV[4], ARGV[5])
if ARGV[8] == '1' then redis.call('HSET', k, 'final_body', ARGV[9]) else redis.call('HDEL', k, 'final_body') end
redis.call('ZREM', P .. 'due', rid)
outbox_add(11)
if ARGV[10] == '' then return fields(k) end
return {fields(k), budget_alerts(watches, now)}
"""

# ARGV: rid, now, '1' when a reply follows, reply status, reply body, the budget check or '' (budget.py),
#   then the outbox items → the row's field/value pairs (with a check: {them, the thresholds reached}).
#   Only a pending create changes: its estimate becomes its cost, its slots are freed.
MARK_UNKNOWN = """
local rid, now = ARGV[2], tonumber(ARGV[3])
local watches = budget_watches(ARGV[7])
if not now or not watches or not outbox_ok(8) then return redis.error_reply('REJECTED time') end
local t = core(rid)
if not t then return redis.error_reply('NOTFOUND') end
local k = tkey(rid)
local function answer(reached)
  if ARGV[7] == '' then return fields(k) end
  return {fields(k), reached}
end
if t.settled_at or t.status ~= 'pending' then return answer({}) end
local micros, ms = figure(t.estimate_micros), figure(t.estimate_ms)
if not micros or not ms or not can_spend(t, micros, ms) then return redis.error_reply('REJECTED estimate') end
release(t)
spend(t, t.estimate_micros, t.estimate_ms)
redis.call('HSET', k, 'status', 'unknown', 'billed_ms', t.estimate_ms, 'cost_micros', t.estimate_micros,
           'cost_estimated', 1, 'settled_at', ARGV[3], 'updated_at', ARGV[3], 'rolled', 1)
count(t, 'unknown', t.estimate_ms, t.estimate_micros)
redis.call('ZREM', P .. 'due', rid)
if ARGV[4] == '1' then finish_idem(t, ARGV[5], ARGV[6]) end
outbox_add(8)
return answer(budget_alerts(watches, now))
"""

# ARGV: task_id or rid, status ('succeeded' or 'voided'), billed ms, cost micros, resolved by, now, the
#   budget check or '' (budget.py) → the row's field/value pairs (with a check: {them, the thresholds
#   reached}). An unknown row only, once: the spent counters move by the difference from its figures, and it
#   keeps its new status, who resolved it and when.
RESOLVE = """
local status, billed, cost, by, now = ARGV[3], figure(ARGV[4]), figure(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local watches = budget_watches(ARGV[8] or '')
if not billed or not cost or not now or by == '' or (status ~= 'succeeded' and status ~= 'voided')
    or not watches then
  return redis.error_reply('REJECTED resolution')
end
local rid = redis.call('HGET', P .. 'tid', ARGV[2]) or ARGV[2]
local t = core(rid)
if not t then return redis.error_reply('NOTFOUND') end
if t.status ~= 'unknown' then return redis.error_reply('NOTUNKNOWN ' .. t.status) end
local k = tkey(rid)
local was = redis.call('HMGET', k, 'billed_ms', 'cost_micros')
local d_ms, d_micros = billed - (tonumber(was[1]) or 0), cost - (tonumber(was[2]) or 0)
if not can_spend(t, d_micros, d_ms) then return redis.error_reply('REJECTED counter overflow') end
spend(t, int(d_micros), int(d_ms))
if t.rolled then tally(t, 0, status == 'succeeded' and 1 or 0, 0, d_ms, d_micros) end  -- else the backfill counts it
redis.call('HSET', k, 'status', status, 'billed_ms', ARGV[4], 'cost_micros', ARGV[5], 'cost_estimated', 0,
           'resolved_by', by, 'resolved_at', ARGV[7], 'updated_at', ARGV[7])
if (ARGV[8] or '') == '' then return fields(k) end
return {fields(k), budget_alerts(watches, now)}
"""

# ARGV: team, after task_id or '', status or '', limit, scan cap, 'asc' or 'desc', '1' to leave out
#   deleted tasks → up to limit + 1 tasks in that order of creation
LIST = """
local z, status, want = P .. 'team:' .. ARGV[2], ARGV[4], tonumber(ARGV[5]) + 1
local asc, live_only = ARGV[7] == 'asc', ARGV[8] == '1'
local start = 0
if ARGV[3] ~= '' then
  local anchor = redis.call('HGET', P .. 'tid', ARGV[3])
  local rank = anchor and redis.call(asc and 'ZRANK' or 'ZREVRANK', z, anchor)
  if not rank then return {} end
  start = rank + 1
end
local out, stop = {}, start + tonumber(ARGV[6])
while #out < want and start < stop do
  local rids = redis.call(asc and 'ZRANGE' or 'ZREVRANGE', z, start, math.min(start + 99, stop - 1))
  if #rids == 0 then break end
  for _, rid in ipairs(rids) do
    local keep = true
    if status ~= '' or live_only then
      local f = redis.call('HMGET', tkey(rid), 'status', 'deleted_at')
      keep = (status == '' or f[1] == status) and not (live_only and f[2])
    end
    if keep then
      out[#out + 1] = fields(tkey(rid))
      if #out >= want then break end
    end
  end
  start = start + #rids
end
return out
"""

# ARGV: task_id, now → the row's field/value pairs (deleted_at as first set), or nil when there is none
MARK_DELETED = """
if not tonumber(ARGV[3]) then return redis.error_reply('REJECTED time') end
local rid = redis.call('HGET', P .. 'tid', ARGV[2])
if not rid or redis.call('EXISTS', tkey(rid)) == 0 then return false end
redis.call('HSETNX', tkey(rid), 'deleted_at', ARGV[3])
return fields(tkey(rid))
"""

# ARGV: limit, lease s → the due tasks (as they were before the lease), leased until now + lease
DUE = """
local now = clock()
local lease_end = fmt(now + tonumber(ARGV[3]))
local out = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'due', '-inf', fmt(now), 'LIMIT', 0, ARGV[2])) do
  local row = fields(tkey(rid))
  if #row == 0 then
    redis.call('ZREM', P .. 'due', rid)
  else
    out[#out + 1] = row
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

# → Redis's TIME, from the node that holds the gateway's keys (a Cluster's nodes may disagree)
CLOCK = """
local t = redis.call('TIME')
return {tonumber(t[1]), tonumber(t[2])}
"""

SCRIPTS = {
    "clock": CLOCK,
    "admit": ADMIT,
    "cancel": CANCEL,
    "acquire_key": ACQUIRE_KEY,
    "release_key": RELEASE_KEY,
    "record_created": RECORD_CREATED,
    "fail_create": FAIL_CREATE,
    "get": GET,
    "get_record": GET_RECORD,
    "set_status": SET_STATUS,
    "settle": SETTLE,
    "mark_unknown": MARK_UNKNOWN,
    "resolve": RESOLVE,
    "list": LIST,
    "mark_deleted": MARK_DELETED,
    "due": DUE,
    "defer": DEFER,
    **ROLLUP_SCRIPTS,
    **OUTBOX_SCRIPTS,
}
