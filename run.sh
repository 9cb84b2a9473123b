#!/usr/bin/env bash
# Start the whole pydist system in the foreground; Ctrl-C (or SIGTERM) stops every process cleanly.
#
#   ./run.sh                       embedded PostgreSQL (data in ./.data/pg), no broker: the relay
#                                  projects straight into the read model
#   BROKER_URL=amqp://guest:guest@127.0.0.1:5672/ \
#   WRITE_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/pydist_write \
#   READ_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/pydist_read ./run.sh
#                                  the full distributed topology on your own Postgres and RabbitMQ
#   PYDIST_DEMO_PRICES=1 ./run.sh  offline: serve prices from the bundled Coinbase-compatible stub
#
# Configuration is the environment only (see .env.example); a ./.env file is read if present.
set -euo pipefail
cd "$(dirname "$0")"

if [ -f .env ]; then set -a; . ./.env; set +a; fi
DATA_DIR=${PYDIST_DATA_DIR:-$PWD/.data}   # embedded PostgreSQL lives in $DATA_DIR/pg
mkdir -p -m 700 "$DATA_DIR/run" && export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$DATA_DIR/run}  # pgserver wants one

if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet "uv>=0.4" || { echo "run.sh: cannot install uv" >&2; exit 1; }
fi
uv sync --frozen --no-dev --inexact --quiet  # --inexact: never strip a dev install
export PATH="$PWD/.venv/bin:$PATH"

embedded=0
if [ -z "${WRITE_DATABASE_URL:-}" ] && [ -z "${READ_DATABASE_URL:-}" ]; then
  echo "run.sh: no WRITE_DATABASE_URL/READ_DATABASE_URL: starting the embedded PostgreSQL in $DATA_DIR/pg"
  eval "$(pydist dev postgres-start --data-dir "$DATA_DIR/pg")"
  embedded=1
elif [ -z "${WRITE_DATABASE_URL:-}" ] || [ -z "${READ_DATABASE_URL:-}" ]; then
  echo "run.sh: set both WRITE_DATABASE_URL and READ_DATABASE_URL, or neither" >&2; exit 1
fi

processes="price,create,fetch,relay"
if [ -n "${BROKER_URL:-}" ]; then processes="$processes,sync"; fi
if [ "${PYDIST_DEMO_PRICES:-0}" = "1" ]; then
  export PYDIST_STUB_PORT=${PYDIST_STUB_PORT:-8790}
  export COINBASE_API_URL="http://127.0.0.1:$PYDIST_STUB_PORT"
  processes="stub,$processes"
fi

stop_embedded() { if [ "$embedded" = 1 ]; then pydist dev postgres-stop --data-dir "$DATA_DIR/pg" || true; fi; }
trap stop_embedded EXIT

pydist migrate

cat <<MSG
run.sh: starting ${processes//,/, }
  create buy order   PUT  http://127.0.0.1:${CREATE_BUY_ORDER_PORT:-8777}/buy_order    (docs: /docs)
  fetch buy orders   GET  http://127.0.0.1:${FETCH_BUY_ORDERS_PORT:-8778}/buy_orders   (docs: /docs)
  btc price          GET  http://127.0.0.1:${BTC_PRICE_PORT:-8779}/prices/USD
  prices from        ${COINBASE_API_URL:-https://api.coinbase.com}
  read-model sync    ${BROKER_URL:+RabbitMQ}${BROKER_URL:-embedded (no BROKER_URL)}
Ctrl-C stops everything.
MSG
# Not exec: the EXIT trap must run after honcho has stopped the processes.
read -ra names <<< "${processes//,/ }"
honcho start --no-prefix --procfile Procfile "${names[@]}" &
honcho_pid=$!
trap 'kill -TERM "$honcho_pid" 2>/dev/null || true' INT TERM
wait "$honcho_pid" || true
wait "$honcho_pid" 2>/dev/null || true
