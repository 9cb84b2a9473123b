-- A fixed GET of the URL given on the command line (pages, hello-world GET); with BENCH_AUTH set,
-- sent with `Authorization: Bearer $BENCH_AUTH` (a run against API_KEYS).
package.path = (os.getenv("BENCH_WRK_DIR") or ".") .. "/?.lua;" .. package.path
local report = require("report")

local auth = os.getenv("BENCH_AUTH")
if auth then
  wrk.headers["Authorization"] = "Bearer " .. auth
end

done = report
