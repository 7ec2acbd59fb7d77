-- Shared by create.lua and poll.lua: done() prints one machine-readable line for bench/run.py.
-- Latencies are microseconds; errors.status counts responses with a status > 399.
--
-- wrk corrects its latency histogram for coordinated omission before done() sees it: every
-- request slower than 2 x the mean interval per connection adds synthetic samples below it.
-- p50/p99 below are that corrected histogram (what `wrk --latency` prints); raw_* undo the
-- correction, which is exact: for v > e, corrected[v] = raw[v] + corrected[v + e].

local function percentile(values, counts, total, p)
   local rank, seen = math.floor(p / 100 * total + 0.5 + 0.5), 0
   for k = 1, #values do
      seen = seen + counts[k]
      if seen >= rank then return values[k] end
   end
   return 0
end

local function raw_histogram(summary, latency)
   local conns = tonumber(os.getenv("BENCH_CONNECTIONS") or "0")
   local per_conn = conns > 0 and math.floor(summary.requests / conns) or 0
   local e = per_conn > 0 and math.floor(summary.duration / per_conn) or 0
   local values, corrected, i = {}, {}, 1
   while true do
      local v, c = latency(i)
      if v == 0 or i > 2000000 then break end
      values[i], corrected[v] = v, c
      i = i + 1
   end
   local counts, total = {}, 0
   for k, v in ipairs(values) do
      local c = corrected[v]
      if e > 0 and v > e then c = c - (corrected[v + e] or 0) end
      counts[k], total = c, total + c
   end
   return values, counts, total
end

function done(summary, latency, requests)
   local e = summary.errors
   local values, counts, total = raw_histogram(summary, latency)
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
      '"status":%d,"timeout":%d,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"mean_us":%.1f,"max_us":%.0f,' ..
      '"raw_n":%d,"raw_p50_us":%.0f,"raw_p99_us":%.0f}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
      total, percentile(values, counts, total, 50), percentile(values, counts, total, 99)))
   io.flush()
end
