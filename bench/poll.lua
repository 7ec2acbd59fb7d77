-- GET /videos/generations/{id}, rotating through ids created beforehand (one per line in a file).
--   wrk -s bench/poll.lua URL -- <path> <bearer key> <ids file>
-- Requests are formatted once in init(); each thread starts at its own offset in the list.

local dir = debug.getinfo(1, "S").source:match("^@?(.*/)") or "./"
dofile(dir .. "common.lua")

local threads = 0

function setup(thread)
   thread:set("tid", threads)
   threads = threads + 1
end

local requests, n, i = {}, 0, 0

function init(args)
   local headers = {["Authorization"] = "Bearer " .. args[2]}
   for id in io.lines(args[3]) do
      n = n + 1
      requests[n] = wrk.format("GET", args[1] .. "/" .. id, headers)
   end
   i = ((tid or 0) * 997) % n
end

function request()
   i = i % n + 1
   return requests[i]
end
