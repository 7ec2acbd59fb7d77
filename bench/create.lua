-- POST /videos/generations with a gateway key: one fixed, valid Seedance body.
--   wrk -s bench/create.lua URL -- <path> <bearer key> [<stop after N responses per thread>]
-- The request is static (no request() function), so wrk builds it once per thread.

local dir = debug.getinfo(1, "S").source:match("^@?(.*/)") or "./"
dofile(dir .. "common.lua")

local limit, seen = 0, 0

function init(args)
   wrk.method = "POST"
   wrk.path = args[1]
   wrk.headers["Authorization"] = "Bearer " .. args[2]
   wrk.headers["Content-Type"] = "application/json"
   wrk.body = '{"model": "doubao-seedance-2.0-fast", "prompt": "A red fox running through fresh snow at ' ..
              'dawn, low tracking shot, cinematic light", "duration": 5, "resolution": "720p", ' ..
              '"aspect_ratio": "16:9", "generate_audio": false}'
   limit = tonumber(args[3] or "0")
   if limit == 0 then
      response = nil -- wrk then skips parsing responses in Lua
   end
end

function response(status, headers, body)
   seen = seen + 1
   if seen >= limit then
      wrk.thread:stop()
   end
end
