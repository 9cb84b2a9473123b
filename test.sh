#!/usr/bin/env bash
# Every check pydist has: lint, format, types, unit, integration and e2e tests.
#   ./test.sh                 the whole suite (9 minutes on 2 cores, 2026-12-04)
#   PYDIST_LONG=1 ./test.sh   also the long fault/load runs (CI's mode)
#   ./test.sh tests/unit -k money   extra arguments go to pytest
# It installs what it needs from the lock file and makes sure Postgres and RabbitMQ are up
# (starting them if installed and stopped). A missing service fails the run; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")"

fail() { echo "test.sh: $*" >&2; exit 1; }

if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet "uv>=0.4" || fail "cannot install uv (pip install uv)"
fi
uv sync --frozen --quiet || fail "uv sync --frozen failed: is uv.lock in step with pyproject.toml?"

PG_HOST=${PYDIST_TEST_PG_HOST:-127.0.0.1}
ensure_postgres() {
  pg_isready -q -h "$PG_HOST" -p 5432 && return 0
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "test.sh: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h "$PG_HOST" -p 5432 && return 0; sleep 1; done
  fi
  fail "PostgreSQL is not reachable on $PG_HOST:5432 and could not be started (install postgresql)"
}
ensure_rabbitmq() {
  command -v rabbitmqctl >/dev/null 2>&1 || fail "RabbitMQ is not installed (apt-get install rabbitmq-server)"
  rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1 && return 0
  echo "test.sh: starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1 && return 0
    sleep 1
  done
  fail "RabbitMQ is not reachable on 127.0.0.1:5672 and could not be started"
}
ensure_wrk() {  # the benchmark smoke test drives load with wrk
  command -v wrk >/dev/null 2>&1 && return 0
  echo "test.sh: installing wrk"
  command -v apt-get >/dev/null 2>&1 || fail "wrk is missing and apt-get is not available: install wrk"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y wrk >/dev/null 2>&1 \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null; } \
    || fail "could not install wrk (apt-get install wrk)"
}
ensure_prometheus() {  # tests/unit/test_alerts.py checks deploy/prometheus with promtool
  command -v promtool >/dev/null 2>&1 && return 0
  echo "test.sh: installing prometheus (for promtool)"
  command -v apt-get >/dev/null 2>&1 || fail "promtool is missing and apt-get is not available: install prometheus"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  PROM_APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus"
  $PROM_APT >/dev/null 2>&1 || { $SUDO apt-get update >/dev/null && $PROM_APT >/dev/null; } \
    || fail "could not install prometheus (apt-get install prometheus)"
  # Only promtool is wanted: if the package started its own daemon (:9090), stop that one.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  command -v promtool >/dev/null 2>&1 || fail "prometheus installed but promtool is not on PATH"
}
command -v pg_isready >/dev/null 2>&1 || fail "pg_isready not found: install postgresql-client"
command -v pgbench >/dev/null 2>&1 || fail "pgbench not found: install postgresql-client"
ensure_postgres
ensure_rabbitmq
ensure_wrk
ensure_prometheus

echo "== ruff"
uv run ruff check .
uv run ruff format --check .
echo "== mypy"
uv run mypy
echo "== pytest"
uv run pytest -p no:cacheprovider "$@"
