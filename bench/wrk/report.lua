-- Shared by every wrk script: print one JSON line with the counts and latency percentiles (µs).
local function report(summary, latency)
  local e = summary.errors
  local out = string.format(
    '{"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"status_errors": %d, "timeouts": %d, "lat_p50_us": %d, "lat_p99_us": %d}',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99))
  io.write("WRK_JSON " .. out .. "\n")
end
return report
