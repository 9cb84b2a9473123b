#!/usr/bin/env bash
# Start the whole pydist system in the foreground; Ctrl-C (or SIGTERM) stops every process cleanly.
#
#   ./run.sh                       embedded PostgreSQL (data in ./.data/pg) and, when rabbitmq-server
#                                  is installed, a private RabbitMQ node (pydist-dev@localhost on
#                                  127.0.0.1:5673, data in ./.data/rabbitmq) that read_model_sync
#                                  consumes from; without rabbitmq-server the relay projects
#                                  straight into the read model
#   PYDIST_RABBITMQ_PORT=5680 ./run.sh   the private node on another AMQP port
#   PYDIST_EMBEDDED_BROKER=0 ./run.sh    no private node: the relay projects into the read model
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
DATA_DIR=${PYDIST_DATA_DIR:-$PWD/.data}   # embedded PostgreSQL in $DATA_DIR/pg, RabbitMQ in $DATA_DIR/rabbitmq
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

# The read-model sync: through RabbitMQ (the given BROKER_URL, or a private node of our own when
# rabbitmq-server is installed), else the relay projects straight into the read model.
rabbit=0
rabbit_dir="$DATA_DIR/rabbitmq"
stop_embedded() {
  if [ "$rabbit" = 1 ]; then pydist dev rabbitmq-stop --data-dir "$rabbit_dir" || true; fi
  if [ "$embedded" = 1 ]; then pydist dev postgres-stop --data-dir "$DATA_DIR/pg" || true; fi
}
trap stop_embedded EXIT
direct="the relay projects straight into the read model"
if [ -n "${BROKER_URL:-}" ]; then
  sync_mode="RabbitMQ (BROKER_URL as given)"
elif [ "${PYDIST_EMBEDDED_BROKER:-1}" = "0" ]; then
  sync_mode="no broker (PYDIST_EMBEDDED_BROKER=0): $direct"
else
  rabbit_port=${PYDIST_RABBITMQ_PORT:-5673}
  echo "run.sh: no BROKER_URL: starting a private RabbitMQ node in $rabbit_dir (if rabbitmq-server is installed)"
  rc=0
  rabbit=1  # from here on the EXIT trap stops whatever part of the node came up
  broker_env=$(pydist dev rabbitmq-start --data-dir "$rabbit_dir" --port "$rabbit_port") || rc=$?
  if [ "$rc" = 0 ]; then
    eval "$broker_env"
    sync_mode="RabbitMQ (private node pydist-dev@localhost on 127.0.0.1:$rabbit_port, data in $rabbit_dir)"
  elif [ "$rc" = 3 ]; then
    rabbit=0
    sync_mode="no broker (rabbitmq-server not installed): $direct"
  else
    echo "run.sh: the private RabbitMQ node did not start (log: $rabbit_dir/log); set" \
      "PYDIST_RABBITMQ_PORT for another port, or PYDIST_EMBEDDED_BROKER=0 to run without a broker" >&2
    exit 1
  fi
fi
echo "read-model sync: $sync_mode"

processes="price,create,fetch,relay"
if [ -n "${BROKER_URL:-}" ]; then processes="$processes,sync"; fi
if [ "${PYDIST_DEMO_PRICES:-0}" = "1" ]; then
  export PYDIST_STUB_PORT=${PYDIST_STUB_PORT:-8790}
  export COINBASE_API_URL="http://127.0.0.1:$PYDIST_STUB_PORT"
  processes="stub,$processes"
fi

pydist migrate

cat <<MSG
run.sh: starting ${processes//,/, }
  create buy order   PUT  http://127.0.0.1:${CREATE_BUY_ORDER_PORT:-8777}/buy_order    (docs: /docs)
  fetch buy orders   GET  http://127.0.0.1:${FETCH_BUY_ORDERS_PORT:-8778}/buy_orders   (docs: /docs)
  btc price          GET  http://127.0.0.1:${BTC_PRICE_PORT:-8779}/prices/USD
  prices from        ${COINBASE_API_URL:-https://api.coinbase.com}
Ctrl-C stops everything.
MSG
# Not exec: the EXIT trap must run after honcho has stopped the processes.
read -ra names <<< "${processes//,/ }"
# honcho SIGKILLs what has not stopped KILL_WAIT (5) s after its SIGTERM; uvicorn gives a request in
# flight GRACEFUL_SHUTDOWN_S (8) s. The wait is raised to fit, so a stop never kills an order midway.
python -c 'import sys, honcho.command, honcho.manager, pydist.config as config
honcho.manager.KILL_WAIT = config.GRACEFUL_SHUTDOWN_S + 4
honcho.command.main(sys.argv[1:])' start --no-prefix --procfile Procfile "${names[@]}" &
honcho_pid=$!
trap 'kill -TERM "$honcho_pid" 2>/dev/null || true' INT TERM
wait "$honcho_pid" || true
wait "$honcho_pid" 2>/dev/null || true
