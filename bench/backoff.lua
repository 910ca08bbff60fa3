-- wrk script: POST one fixed body (BODY_FILE, CONTENT_TYPE); after a 429 a connection waits
-- BACKOFF_MS before its next request (a client that honours back-pressure, if not Retry-After's
-- whole second); prints a JSON summary with the 2xx and 429 counts.
-- wrk's response() and delay() do not say which connection they are for, and a thread's responses
-- are read in batches before their connections ask delay(): one flag lost the pauses of all but
-- the last of several 429s in a batch (those connections came back at once). So each 429 adds one
-- pause that the thread's next request takes: as many paused requests as 429s, though a pause may
-- fall on another connection of the thread than the one refused.
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "application/json"
local backoff = tonumber(os.getenv("BACKOFF_MS") or "100")

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  ok, shed, other = 0, 0, 0
  pauses = {}  -- pauses owed, in milliseconds, first in first out
  first, last = 1, 0
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1
  elseif status == 429 then
    shed = shed + 1
    -- BACKOFF_MS 0: honour Retry-After (seconds), as a well-behaved client does
    local pause = backoff
    if backoff == 0 then pause = 1000 * (tonumber(headers["retry-after"] or headers["Retry-After"] or "1") or 1) end
    last = last + 1
    pauses[last] = pause
  else other = other + 1 end
end

function delay()
  if first <= last then
    local p = pauses[first]
    pauses[first] = nil
    first = first + 1
    return p
  end
  return 0
end

function done(summary, latency, requests)
  local total_ok, total_shed, total_other = 0, 0, 0
  for _, t in ipairs(threads) do
    total_ok = total_ok + t:get("ok")
    total_shed = total_shed + t:get("shed")
    total_other = total_other + t:get("other")
  end
  io.write(string.format(
    'WRK_JSON {"duration_us": %d, "ok": %d, "shed": %d, "other": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"errors_connect": %d, "errors_read": %d, "errors_timeout": %d}\n',
    summary.duration, total_ok, total_shed, total_other, latency:percentile(50), latency:percentile(99),
    summary.errors.connect, summary.errors.read, summary.errors.timeout))
end
