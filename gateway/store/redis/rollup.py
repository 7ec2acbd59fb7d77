"""The ledger's per-day and per-month figures in the Redis store, and the scripts that read rows in order.

The scripts that settle a row (settle, mark_unknown) add it to the figures of its UTC day and month, in the
same script; resolve moves them by the difference; create_failed rows count nothing. A row's `rolled`
field says the figures hold it: '1' when its settlement counted it, '2' when the backfill did (a row
settled before the figures existed, counted once at open, a short script per batch). Pruning counts a row
the backfill has not reached before deleting it, so the figures keep every deleted row.

Keys, under the prefix:
    r:d:{YYYY-MM-DD}   hash  a day's figures: field {figure}{team/user/model} → a whole number
    r:m:{YYYY-MM}      hash  a month's, the same fields
    r:dt:{YYYY-MM-DD}  hash  a day's figures by team alone: field {figure}{team}, a fraction of the fields
    r:mt:{YYYY-MM}     hash  a month's: what a figure by team or by day with no user or model filter reads
    r:months           zset  the months that have figures (score year × 12 + month − 1)
    r:bf               str   the backfill's progress: every row created up to this time is counted; 'done'

A figure's field is one letter (n tasks, s succeeded, f failed, b billed_ms, c cost_micros) and then
`{len(team)}:{team}{len(user)}:{user}{model}` (lengths in bytes: any name reads back whole), or the team.
"""

from __future__ import annotations

# In PRELUDE, for every script: a row's day, and the tally that adds a row to its day's and month's figures.
# A row's day is the date Python's datetime.fromtimestamp gives its created_at: rounded to the microsecond,
# half to even, so a row 0.4 µs before midnight belongs to the next day.
ROLLUP_LUA = """
local FAILED = {failed = true, cancelled = true, expired = true}
local function int(x)  -- a whole number as HINCRBY reads it (a Lua number would be sent as %.14g)
  if type(x) == 'number' then return string.format('%d', x) end
  return x
end
local function day_of(t)  -- days since 1970-01-01
  local s = math.floor(t)
  if (t - s) * 1000000 >= 999999.5 then s = s + 1 end
  return math.floor(s / 86400)
end
local function civil(z)  -- a day number as YYYY-MM-DD (H. Hinnant's civil_from_days)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02d', y, m, d)
end
local function tally(t, tasks, ok, bad, ms, micros)  -- t: a row's team, user, model, created_at
  local day = civil(day_of(tonumber(t.created_at)))
  local month = string.sub(day, 1, 7)
  local c = #t.team .. ':' .. t.team .. #t.user .. ':' .. t.user .. (t.model or '')
  redis.call('ZADD', P .. 'r:months', tonumber(string.sub(day, 1, 4)) * 12 + tonumber(string.sub(day, 6, 7)) - 1,
             month)
  local views = {{'r:d:' .. day, c}, {'r:m:' .. month, c}, {'r:dt:' .. day, t.team}, {'r:mt:' .. month, t.team}}
  for _, f in ipairs({{'n', tasks}, {'s', ok}, {'f', bad}, {'b', ms}, {'c', micros}}) do
    if f[2] ~= 0 and f[2] ~= '0' then
      for _, view in ipairs(views) do redis.call('HINCRBY', P .. view[1], f[1] .. view[2], int(f[2])) end
    end
  end
end
local function count(t, status, ms, micros)  -- a settled row into its figures
  if status ~= 'create_failed' then
    tally(t, 1, status == 'succeeded' and 1 or 0, FAILED[status] and 1 or 0, ms, micros)
  end
end
local function fields(k)  -- a task's field/value pairs, without the flag that only the scripts read
  local kv = redis.call('HGETALL', k)
  for i = 1, #kv, 2 do
    if kv[i] == 'rolled' then
      table.remove(kv, i)
      table.remove(kv, i)
      break
    end
  end
  return kv
end
"""

# Before the scripts that read many rows: groups and their seven sums (tasks, succeeded, failed, billed_ms,
# cost_micros, in flight, reserved), filters, and a walk through `all` in (created_at, rid) order.
_READ_LUA = """
local BY = {team = 1, user = 2, model = 3}
local sums, names = {}, {}
local function slot(g)
  local x = sums[g]
  if not x then
    x = {0, 0, 0, 0, 0, 0, 0}
    sums[g] = x
    names[#names + 1] = g
  end
  return x
end
local function add(g, ok, bad, ms, micros, live, reserved)  -- one row
  local x = slot(g)
  x[1], x[2], x[3] = x[1] + 1, x[2] + ok, x[3] + bad
  x[4], x[5], x[6], x[7] = x[4] + ms, x[5] + micros, x[6] + live, x[7] + reserved
end
local function reply(head)  -- head, then each group's name and sums
  for _, g in ipairs(names) do
    head[#head + 1] = g
    for i = 1, 7 do head[#head + 1] = sums[g][i] end
  end
  return head
end
local function filters(i)  -- ARGV[i .. i + 2]: team, user, model, each '' (any) or '=' .. the name
  local f = {}
  for j = 0, 2 do
    if ARGV[i + j] ~= '' then f[j + 1] = string.sub(ARGV[i + j], 2) end
  end
  return f
end
local function passes(f, team, user, model)
  return (not f[1] or f[1] == team) and (not f[2] or f[2] == user) and (not f[3] or f[3] == model)
end
local function row_status(v, ok_at)  -- 1, 0 for succeeded; 0, 1 for failed, cancelled, expired
  return v[ok_at] == 'succeeded' and 1 or 0, FAILED[v[ok_at]] and 1 or 0
end
-- Up to n rows of `all` past a position and created before `hi`: {rid, created_at, its score as text}
-- each, the last one looked at (rid, score), and whether the range ended. A position is (score, rid): past
-- that row; (score, ''): from that score on; ('(' .. score, ''): past every row of that score.
local function walk(s, m, n, hi)
  local z = P .. 'all'
  local start, skip
  if m ~= '' then
    local at = redis.call('ZSCORE', z, m)
    if at and tonumber(at) == tonumber(s) then
      start = redis.call('ZRANK', z, m) + 1
    else  -- that row is gone: from its score on, past the rids up to it
      start, skip = redis.call('ZCOUNT', z, '-inf', '(' .. s), m
    end
  elseif string.sub(s, 1, 1) == '(' then
    start = redis.call('ZCOUNT', z, '-inf', string.sub(s, 2))
  else
    start = redis.call('ZCOUNT', z, '-inf', '(' .. s)
  end
  local stop = redis.call('ZCOUNT', z, '-inf', '(' .. hi)
  if stop <= start then return {}, '', '', true end
  local got = redis.call('ZRANGE', z, start, math.min(start + n, stop) - 1, 'WITHSCORES')
  local rows, s0 = {}, tonumber(s)
  for i = 1, #got, 2 do
    local x = tonumber(got[i + 1])
    if not (skip and x == s0 and got[i] <= skip) then rows[#rows + 1] = {got[i], x, got[i + 1]} end
  end
  return rows, got[#got - 1], got[#got], start + n >= stop
end
"""

# ARGV: by, filters, 'team' when the keys hold figures by team alone (no user or model filter then), then
#   (figure key under the prefix, its day or '') pairs → {backfill progress, groups...}
SUM = (
    _READ_LUA
    + """
local by, f, by_team, cache = ARGV[2], filters(3), ARGV[6] == 'team', {}
local LETTER = {n = 1, s = 2, f = 3, b = 4, c = 5}
local function split(c)  -- team, user, model of a field's tail
  local colon = string.find(c, ':', 1, true)
  local after = colon + tonumber(string.sub(c, 1, colon - 1))
  local colon2 = string.find(c, ':', after + 1, true)
  local after2 = colon2 + tonumber(string.sub(c, after + 1, colon2 - 1))
  return string.sub(c, colon + 1, after), string.sub(c, colon2 + 1, after2), string.sub(c, after2 + 1)
end
local function field_of(name)  -- false (filtered out), or {its group's sums unless by day, its figure}
  local team, user, model
  if by_team then team = string.sub(name, 2) else team, user, model = split(string.sub(name, 2)) end
  if not passes(f, team, user, model) then return false end
  return {by ~= 'day' and slot(({team, user, model})[BY[by]]), LETTER[string.sub(name, 1, 1)]}
end
for i = 7, #ARGV, 2 do
  local figures = redis.call('HGETALL', P .. ARGV[i])
  local day = by == 'day' and slot(ARGV[i + 1])
  for j = 1, #figures, 2 do
    local p = cache[figures[j]]
    if p == nil then
      p = field_of(figures[j])
      cache[figures[j]] = p
    end
    if p then
      local x = day or p[1]
      x[p[2]] = x[p[2]] + tonumber(figures[j + 1])
    end
  end
end
return reply({redis.call('GET', P .. 'r:bf') or ''})
"""
)

# ARGV: position score, position rid, end score (exclusive), rows to look at, which settled rows ('any';
#   'uncounted': not counted by their settlement; 'counted'), first day, end day (day numbers or ''), by,
#   filters → {position score, position rid, 1 when the range ended, groups...}: the settled rows
ROWS = (
    _READ_LUA
    + """
local mode, by, f = ARGV[6], ARGV[9], filters(10)
local d0, d1 = tonumber(ARGV[7]), tonumber(ARGV[8])
local rows, last_m, last_s, ended = walk(ARGV[2], ARGV[3], tonumber(ARGV[5]), ARGV[4])
for _, r in ipairs(rows) do
  local v = redis.call('HMGET', tkey(r[1]), 'team', 'user', 'model', 'status', 'settled_at', 'billed_ms',
                       'cost_micros', 'rolled')
  local day = day_of(r[2])
  if v[5] and v[4] ~= 'create_failed' and (not d0 or day >= d0) and (not d1 or day < d1)
      and (mode == 'any' or (mode == 'uncounted' and v[8] ~= '1') or (mode == 'counted' and v[8]))
      and passes(f, v[1], v[2], v[3]) then
    local ok, bad = row_status(v, 4)
    add(by == 'day' and civil(day) or v[BY[by]], ok, bad, tonumber(v[6]) or 0, tonumber(v[7]) or 0, 0, 0)
  end
end
return reply({last_s, last_m, ended and 1 or 0})
"""
)

# ARGV: first score, end score (exclusive), by, filters, then rids → {groups...}: those of the rows that are
#   unsettled and were created in [first, end)
LIVE = (
    _READ_LUA
    + """
local lo, hi, by, f = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], filters(5)
for i = 8, #ARGV do
  local v = redis.call('HMGET', tkey(ARGV[i]), 'team', 'user', 'model', 'created_at', 'status', 'settled_at',
                       'estimate_micros', 'billed_ms', 'cost_micros')
  local t = tonumber(v[4])
  if v[1] and t and not v[6] and t >= lo and t < hi and passes(f, v[1], v[2], v[3]) then
    local ok, bad = row_status(v, 5)
    add(by == 'day' and civil(day_of(t)) or v[BY[by]], ok, bad, tonumber(v[8]) or 0, tonumber(v[9]) or 0, 1,
        tonumber(v[7]) or 0)
  end
end
return reply({})
"""
)

# ARGV: position score, position rid, first score, end score (exclusive), filters, rows wanted, rows to look
#   at, then the fields to load → {position score, position rid, 1 when the range ended, rows...}: the rows
#   but create_failed ones, each as field/value pairs
PAGE = (
    _READ_LUA
    + """
local lo, f, want = tonumber(ARGV[4]), filters(6), tonumber(ARGV[9])
local wanted, at = {}, {}
for i = 11, #ARGV do
  wanted[#wanted + 1] = ARGV[i]
  at[ARGV[i]] = #wanted
end
local rows, last_m, last_s, ended = walk(ARGV[2], ARGV[3], tonumber(ARGV[10]), ARGV[5])
local out = {last_s, last_m, ended and 1 or 0}
for _, r in ipairs(rows) do
  if r[2] >= lo then
    local v = redis.call('HMGET', tkey(r[1]), unpack(wanted))
    local status = v[at.status]
    if status and status ~= 'create_failed' and passes(f, v[at.team], v[at.user], v[at.model]) then
      local row = {}
      for i, name in ipairs(wanted) do
        if v[i] then
          row[#row + 1] = name
          row[#row + 1] = v[i]
        end
      end
      out[#out + 1] = row
      if #out - 3 >= want then
        out[1], out[2], out[3] = r[3], r[1], 0
        return out
      end
    end
  end
end
return out
"""
)

# ARGV: end score (exclusive), position score, position rid, rows to look at → {deleted, position score,
#   position rid, 1 when every row before the end was looked at}. Settled rows but `unknown` ones are deleted;
#   one the figures do not hold yet is counted first.
PRUNE = (
    _READ_LUA
    + """
local deleted = 0
local rows, last_m, last_s, ended = walk(ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[2])
for _, r in ipairs(rows) do
  local rid = r[1]
  local t = core(rid)
  if not t then
    redis.call('ZREM', P .. 'all', rid)
  elseif t.settled_at and t.status ~= 'unknown' then
    if not t.rolled then
      local v = redis.call('HMGET', tkey(rid), 'billed_ms', 'cost_micros')
      count(t, t.status, v[1] or '0', v[2] or '0')
    end
    redis.call('DEL', tkey(rid))
    redis.call('ZREM', P .. 'all', rid)
    if t.task_id then
      redis.call('HDEL', P .. 'tid', t.task_id)
      redis.call('ZREM', P .. 'team:' .. t.team, rid)
    end
    deleted = deleted + 1
  end
end
return {deleted, last_s, last_m, ended and 1 or 0}
"""
)

# ARGV: rows per batch → {rows looked at, 1 when done}. The next batch of rows past r:bf, oldest first (with
#   every other row of the batch's last created_at, so that r:bf can be a time): settled rows no settlement
#   counted are counted and flagged '2'.
BACKFILL = """
local state = redis.call('GET', P .. 'r:bf')
if state == 'done' then return {0, 1} end
local n = tonumber(ARGV[2])
local function backfill(rid)
  local k = tkey(rid)
  local v = redis.call('HMGET', k, 'settled_at', 'rolled', 'status', 'billed_ms', 'cost_micros', 'team', 'user',
                       'model', 'created_at')
  if v[1] and not v[2] and v[3] ~= 'create_failed' then
    count({team = v[6], user = v[7], model = v[8], created_at = v[9]}, v[3], v[4] or '0', v[5] or '0')
    redis.call('HSET', k, 'rolled', 2)
  end
end
local got = redis.call('ZRANGEBYSCORE', P .. 'all', state and '(' .. state or '-inf', '+inf', 'WITHSCORES',
                       'LIMIT', 0, n)
for i = 1, #got, 2 do backfill(got[i]) end
if #got < 2 * n then
  redis.call('SET', P .. 'r:bf', 'done')
  return {#got / 2, 1}
end
local last = got[#got]
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'all', last, last)) do backfill(rid) end
redis.call('SET', P .. 'r:bf', last)
return {#got / 2, 0}
"""

ROLLUP_SCRIPTS = {
    "rollup_sum": SUM,
    "rollup_rows": ROWS,
    "rollup_live": LIVE,
    "rollup_backfill": BACKFILL,
    "ledger_page": PAGE,
    "prune": PRUNE,
}
ROLLUP_READS = frozenset({"rollup_sum", "rollup_rows", "rollup_live", "ledger_page"})
