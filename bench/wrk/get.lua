-- A fixed GET of the URL given on the command line (pages, hello-world GET).
package.path = (os.getenv("BENCH_WRK_DIR") or ".") .. "/?.lua;" .. package.path
local report = require("report")

done = report
