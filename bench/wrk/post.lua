-- A fixed JSON POST (the hello-world baseline): same body shape and headers as create.lua.
package.path = (os.getenv("BENCH_WRK_DIR") or ".") .. "/?.lua;" .. package.path
local report = require("report")

wrk.method = "POST"
wrk.path = "/hello"
wrk.body = '{"currency":"USD","amount":"10.00"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "00000000-0000-4000-8000-000000000000"

done = report
