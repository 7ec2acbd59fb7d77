"""The Lua every Redis script runs after: the key prefix, the clock, key names, and the checks and books the
scripts share (the ledger's figures: rollup.py)."""

from __future__ import annotations

from gateway.policy.quota import WINDOW_S
from gateway.store.base import MAX_COUNTER, MAX_FIGURE
from gateway.store.redis.budget import BUDGET_LUA
from gateway.store.redis.outbox import OUTBOX_LUA
from gateway.store.redis.rollup import ROLLUP_LUA

# Shared by every script. ARGV[1] is the key prefix; the scripts' own arguments follow it.
# A script that errors is not rolled back: each checks everything it is given before its first write,
# and refuses with an error reply whose first word calls.py maps to an error (REJECTED, DUPLICATE,
# NOTFOUND, NOTUNKNOWN).
PRELUDE = (
    f"local WINDOW_S, MAX_FIGURE, MAX_COUNTER = {WINDOW_S}, {MAX_FIGURE}, {MAX_COUNTER}\n"
    + """
local P = ARGV[1]
local LIVE = {pending = true, queued = true, running = true}
local CORE = {'team', 'user', 'model', 'team_period', 'user_period', 'estimate_micros', 'estimate_ms',
              'status', 'key_name', 'idem_key', 'task_id', 'settled_at', 'created_at', 'rolled'}
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
local function figure(s)  -- a whole number in 0..MAX_FIGURE as HINCRBY reads it (no leading 0), or nil
  if type(s) ~= 'string' or #s > 16 or not (s == '0' or string.match(s, '^[1-9]%d*$')) then return nil end
  local x = tonumber(s)
  if x > MAX_FIGURE then return nil end
  return x
end
local function can_spend(t, micros, ms)  -- no spent counter may pass MAX_COUNTER
  for _, s in ipairs(owners(t)) do
    local c = redis.call('HMGET', ckey(s[1], s[2], s[3]), 'spent_micros', 'spent_ms')
    if (tonumber(c[1]) or 0) + micros > MAX_COUNTER or (tonumber(c[2]) or 0) + ms > MAX_COUNTER then
      return false
    end
  end
  return true
end
local function spend(t, micros, ms)
  for _, s in ipairs(owners(t)) do
    local c = ckey(s[1], s[2], s[3])
    redis.call('HINCRBY', c, 'spent_micros', micros)
    redis.call('HINCRBY', c, 'spent_ms', ms)
  end
end
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
local function usable(health, now)  -- KeyHealth.usable: a cooldown ends by itself, nothing else does
  if not health then return true end
  local h = cjson.decode(health)
  return h.state == 'ok' or (h.state == 'cooldown' and now >= h['until'])
end
local function choose_key(keys, draw, now)  -- the Lua twin of keypool.choose's first pick
  local names, odds, total = {}, {}, 0
  for _, k in ipairs(keys) do  -- {name, weight, max_concurrent_tasks}
    local n = tonumber(redis.call('HGET', P .. 'f:key', k[1])) or 0
    if n < k[3] and usable(redis.call('HGET', P .. 'kh', k[1]), now) then
      names[#names + 1], odds[#odds + 1] = k[1], k[2] * (1 - n / k[3])
      total = total + odds[#odds]
    end
  end
  if total <= 0 then return names[1] end
  local x = draw * total
  for i = 1, #names do
    x = x - odds[i]
    if x < 0 then return names[i] end
  end
  return names[#names]
end
local function finish_idem(t, status, body)
  if not t.idem_key then return end
  local k = ikey(t.team, t.idem_key)
  if redis.call('EXISTS', k) == 1 then redis.call('HSET', k, 'done', 1, 'status', status, 'body', body) end
end
"""
    + ROLLUP_LUA
    + OUTBOX_LUA
    + BUDGET_LUA
)
