-- PUT /buy_order with a unique Idempotency-Key per request: <run nonce>-<thread>-4000-8000-<counter>.
-- Keys are unique by construction (no random collisions), across threads and across runs.
package.path = (os.getenv("BENCH_WRK_DIR") or ".") .. "/?.lua;" .. package.path
local report = require("report")

local nonce = os.getenv("BENCH_NONCE") or "00000000"
local body = '{"currency":"USD","amount":"10.00"}'
local next_tid = 0

function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
end

local counter = 0
function request()
  counter = counter + 1
  local key = string.format("%s-%04x-4000-8000-%012x", nonce, tid, counter)
  return wrk.format("PUT", "/buy_order",
    {["Content-Type"] = "application/json", ["Idempotency-Key"] = key}, body)
end

done = report
