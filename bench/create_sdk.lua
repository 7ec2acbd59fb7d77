-- POST /videos as the openai SDK sends `client.videos.create(...)`: multipart/form-data, every field a string.
--   wrk -s bench/create_sdk.lua URL -- <path> <bearer key>
-- The same video as create.lua's (sora-2 is doubao-seedance-2.0-fast; 1280x720 is 720p, 16:9).
-- The request is static (no request() function), so wrk builds it once per thread.

local dir = debug.getinfo(1, "S").source:match("^@?(.*/)") or "./"
dofile(dir .. "common.lua")

local boundary = "----bench-sdk-boundary-7d3a1c"

local function part(name, value)
   return "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"" .. name .. "\"\r\n\r\n" ..
          value .. "\r\n"
end

function init(args)
   wrk.method = "POST"
   wrk.path = args[1]
   wrk.headers["Authorization"] = "Bearer " .. args[2]
   wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
   wrk.body = part("prompt", "A red fox running through fresh snow at dawn, low tracking shot, cinematic light") ..
              part("model", "sora-2") .. part("seconds", "5") .. part("size", "1280x720") ..
              "--" .. boundary .. "--\r\n"
   response = nil -- wrk then skips parsing responses in Lua
end
