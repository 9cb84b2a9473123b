#!/usr/bin/env bash
# pydist benchmark: one command, against real Postgres + RabbitMQ + the real processes.
#   ./bench/run.sh            full run (~12 minutes), writes the table into docs/benchmarks.md
#   ./bench/run.sh --smoke    ~1-2 minute check that it all runs (writes bench/out/smoke.md)
#   ./bench/run.sh --help     every option (e.g. --wait-load 1.0 to start on a quiet machine)
# Needs: uv, wrk (installed with apt-get if missing), pgbench, Postgres on 127.0.0.1:5432 (trust,
# user postgres) and RabbitMQ on 127.0.0.1:5672 with rabbitmqctl. It creates and drops its own
# databases (pydist_t_bench*) and vhost, and touches nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "bench/run.sh: $*" >&2; exit 1; }

if ! command -v wrk >/dev/null 2>&1; then
  echo "bench/run.sh: installing wrk"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get install -y wrk >/dev/null 2>&1 || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null; } \
      || fail "could not install wrk (apt-get install wrk)"
  else
    fail "wrk is missing and apt-get is not available: install wrk"
  fi
fi
command -v pgbench >/dev/null 2>&1 || fail "pgbench not found: install postgresql-client"
command -v rabbitmqctl >/dev/null 2>&1 || fail "rabbitmqctl not found: RabbitMQ must be installed"
pg_isready -q -h 127.0.0.1 -p 5432 || fail "PostgreSQL is not answering on 127.0.0.1:5432"

exec uv run --quiet python -m bench.run "$@"
