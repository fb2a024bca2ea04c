-- wrk script for tests/bench: POSTs prepared requests and counts every status it gets back.
--
-- Environment (set by tests/bench/wrkrun.py):
--   BENCH_DATA     a file of lines "token<TAB>session<TAB>body" (token and session may be empty)
--   BENCH_FIRST    0-based index of the first line this run may use
--   BENCH_COUNT    how many lines from there; thread i takes every THREADS-th line from i
--   BENCH_THREADS  the wrk thread count (-t)
--   BENCH_CLOSE    1: every request asks `Connection: close` (a new connection, and for HTTPS a
--                  new handshake, per request)
-- When a thread has sent all of its lines it starts again from its first one and counts a
-- wrap: for the fresh-token target that means tokens were reused, and the run is invalid.
--
-- done() prints one line, "BENCH_RESULT {json}", that the runner parses.

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

local function load_requests(path, first, count, stride, offset)
   local prepared = {}
   local index = 0
   for line in io.lines(path) do
      if index >= first + count then
         break
      end
      if index >= first and (index - first) % stride == offset then
         local token, session, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
         if body == nil then
            error("malformed line " .. index .. " in " .. path)
         end
         local headers = { ["Content-Type"] = "application/json" }
         if token ~= "" then
            headers["Authorization"] = "Bearer " .. token
         end
         if session ~= "" then
            headers["X-Session-Id"] = session
         end
         if os.getenv("BENCH_CLOSE") == "1" then
            headers["Connection"] = "close"
         end
         table.insert(prepared, wrk.format("POST", nil, headers, body))
      end
      index = index + 1
   end
   return prepared
end

function init(args)
   local path = os.getenv("BENCH_DATA")
   local first = tonumber(os.getenv("BENCH_FIRST"))
   local count = tonumber(os.getenv("BENCH_COUNT"))
   local stride = tonumber(os.getenv("BENCH_THREADS"))
   prepared = load_requests(path, first, count, stride, id)
   if #prepared == 0 then
      error("no requests for thread " .. id .. " in " .. path)
   end
   cursor = 0
   calls = 0
   wraps = 0
   statuses = {}
end

function request()
   calls = calls + 1
   cursor = cursor + 1
   if cursor > #prepared then
      cursor = 1
      wraps = wraps + 1
   end
   return prepared[cursor]
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local codes = {}
   local calls_total, calls_max, wraps_total = 0, 0, 0
   for _, thread in ipairs(threads) do
      for code, n in pairs(thread:get("statuses")) do
         codes[code] = (codes[code] or 0) + n
      end
      local calls_thread = thread:get("calls")
      calls_total = calls_total + calls_thread
      calls_max = math.max(calls_max, calls_thread)
      wraps_total = wraps_total + thread:get("wraps")
   end
   local status_parts = {}
   for code, n in pairs(codes) do
      table.insert(status_parts, string.format('"%d":%d', code, n))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"statuses":{%s},'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},'
         .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%d},'
         .. '"calls":%d,"max_thread_calls":%d,"wraps":%d}\n',
      summary.requests, summary.duration, summary.bytes, table.concat(status_parts, ","),
      e.connect, e.read, e.write, e.timeout, e.status,
      math.floor(latency:percentile(50)), math.floor(latency:percentile(90)),
      math.floor(latency:percentile(99)), math.floor(latency.max), math.floor(latency.mean),
      calls_total, calls_max, wraps_total))
end
