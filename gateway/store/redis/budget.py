"""Budget alerts in the Redis store (store/budget.py): the Lua that SETTLE and BUDGET_CHECK run after the spent
counters moved, and their answers read back.

Keys, under the prefix:
    ba:{scope}:{len(name)}:{name}:{period}:{threshold}   str   set once a threshold is reached (40 days; kept
                                                               for a "total" period)
"""

from __future__ import annotations

from typing import Any

from gateway.store.budget import SPENT_S_JSON, SPENT_USD_JSON, BudgetCheck, take_reached

# budget_watches(check JSON or '') → the watches, decoded before a script writes; budget_alerts(watches, now)
# → {watch index, threshold index, spent micros, spent ms} per threshold this step reached first. The check:
# per watch {scope, name, period, budget micros or '', budget ms or '', marker ttl s, {threshold, marker,
# {item id, topic, payload}...}...}; the items go to the outbox (outbox.py) as OUTBOX_LUA writes them.
BUDGET_LUA = (
    """
local function budget_text(x, unit, digits)  -- exact decimals of a whole number of units: 12.500000
  return string.format('%d.%0' .. digits .. 'd', math.floor(x / unit), x % unit)
end
local function budget_put(s, token, value)
  local a, b = string.find(s, token, 1, true)
  if not a then return s end
  return string.sub(s, 1, a - 1) .. value .. string.sub(s, b + 1)
end
local BUDGET_SPENT_USD, BUDGET_SPENT_S = [["""
    + SPENT_USD_JSON.decode()
    + "]], [["
    + SPENT_S_JSON.decode()
    + """]]
local function budget_watches(raw)  -- decoded before a script's first write; nil when unreadable
  if raw == '' then return {} end
  local ok, watches = pcall(cjson.decode, raw)
  if ok and type(watches) == 'table' then return watches end
  return nil
end
local function budget_alerts(watches, now)
  local out = {}
  for i, w in ipairs(watches) do
    local c = redis.call('HMGET', ckey(w[1], w[2], w[3]), 'spent_micros', 'spent_ms')
    local micros, ms = tonumber(c[1]) or 0, tonumber(c[2]) or 0
    local budget, budget_ms = tonumber(w[4]), tonumber(w[5])
    for j, t in ipairs(w[7]) do
      local x = tonumber(t[1])
      if ((budget and micros >= x * budget) or (budget_ms and ms >= x * budget_ms))
          and redis.call('SET', P .. 'ba:' .. t[2], fmt(now), 'NX') then
        if w[6] > 0 then redis.call('EXPIRE', P .. 'ba:' .. t[2], w[6]) end
        local usd, secs = budget_text(micros, 1000000, 6), budget_text(ms, 1000, 3)
        for _, item in ipairs(t[3]) do
          local body = budget_put(budget_put(item[3], BUDGET_SPENT_USD, usd), BUDGET_SPENT_S, secs)
          redis.call('HSET', P .. 'ob:' .. item[1], 'topic', item[2], 'payload', body, 'created_at', fmt(now),
                     'attempts', 0)
          redis.call('ZADD', P .. 'obq:' .. item[2], fmt(now), item[1])
          redis.call('SADD', P .. 'obt', item[2])
        end
        out[#out + 1] = {i, j, micros, ms}
      end
    end
  end
  return out
end
"""
)

# ARGV: the check (as for budget_alerts), now → budget_alerts' answer. A budget lowered below what is spent.
BUDGET_CHECK = """
local now, watches = tonumber(ARGV[3]), budget_watches(ARGV[2])
if not now or not watches then return redis.error_reply('REJECTED budget check') end
return budget_alerts(watches, now)
"""

BUDGET_SCRIPTS = {"budget_check": BUDGET_CHECK}


def settled_row(reply: Any, check: BudgetCheck | None) -> Any:
    """SETTLE's answer: the row's pairs, and with a check the thresholds reached, put into the check."""
    if check is None or not check.watches or not reply:
        return reply
    row, reached = reply
    take_reached(check, reached)
    return row
