#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine plus an MLflow tracking server, loopback only.
#
#   infra/local/start_cluster.sh [--workers N] [--cpus C] [--dir DIR] [--port P] [--dashboard-port P]
#                                [--mlflow-port P] [--mlflow-backend URI] [--no-mlflow]
#   source DIR/env          # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, MLFLOW_TRACKING_URI
#   infra/local/stop_cluster.sh [--dir DIR]
#
# A head node and N worker nodes, each its own raylet with C CPUs (ports kept apart), all bound to
# 127.0.0.1, with Ray's token authentication on (a fresh token in DIR/auth_token, mode 600); an
# `mlflow server` (sqlite in DIR, or --mlflow-backend postgresql://...) with proxied artifacts in DIR.
# Every process group started is recorded in DIR/pids; stop_cluster.sh stops exactly those.
set -euo pipefail

WORKERS=2
CPUS=1
DIR=.cluster
PORT=6390
DASHBOARD_PORT=8270
MLFLOW_PORT=5050
MLFLOW_BACKEND=""
MLFLOW=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --dashboard-port) DASHBOARD_PORT=$2; shift 2 ;;
    --mlflow-port) MLFLOW_PORT=$2; shift 2 ;;
    --mlflow-backend) MLFLOW_BACKEND=$2; shift 2 ;;
    --no-mlflow) MLFLOW=0; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${ADVTRAIN_BIN:-$(cd "$HERE/../.." && pwd)/.venv/bin}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
if [[ -s "$DIR/pids" ]]; then
  while read -r pgid _; do
    if kill -0 -- "-$pgid" 2>/dev/null; then
      echo "a cluster started from $DIR is still running (process group $pgid): run infra/local/stop_cluster.sh --dir $DIR" >&2
      exit 1
    fi
  done < "$DIR/pids"
fi
: > "$DIR/pids"

# Ray 2.60 turns token authentication on for `ray start` clusters; every node, driver and Jobs client
# needs the same token. A fresh one per cluster, readable only by this user.
if [[ ! -s "$DIR/auth_token" ]]; then
  (umask 077 && "$BIN/python" -c "import secrets; print(secrets.token_hex(32))" > "$DIR/auth_token")
fi
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
export RAY_USAGE_STATS_ENABLED=0
# Train V2 takes one report per health check (2 s by default): short epochs waited for it.
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.25}
# Ray's default raylet start-up deadline is tight for a loaded 2-core machine.
export RAY_raylet_start_wait_time_s=${RAY_raylet_start_wait_time_s:-120}
# Job entrypoints say `python ...`: make it the environment's Python, the one with the dependencies.
export PATH="$BIN:$PATH"

start() {  # start NAME COMMAND...: its own process group, logs in DIR/NAME.log, group recorded
  local name=$1; shift
  setsid "$@" > "$DIR/$name.log" 2>&1 < /dev/null &
  echo "$! $name" >> "$DIR/pids"
}

# Each node gets its own block of ports (agents, metrics, workers), so raylets on one host never collide.
node_ports() {  # node_ports INDEX
  local base=$((PORT + 100 + 100 * $1))
  echo --node-ip-address=127.0.0.1 \
    --node-manager-port=$((base + 1)) --object-manager-port=$((base + 2)) \
    --dashboard-agent-listen-port=$((base + 3)) --dashboard-agent-grpc-port=$((base + 4)) \
    --runtime-env-agent-port=$((base + 5)) --metrics-export-port=$((base + 6)) \
    --min-worker-port=$((base + 10)) --max-worker-port=$((base + 99))
}

# trial_driver: what Tune trial drivers hold instead of a CPU (pipeline/tune.py).
start head "$BIN/ray" start --head --block --port="$PORT" $(node_ports 0) \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port=$((PORT + 1)) \
  --num-cpus="$CPUS" --resources='{"trial_driver": 100}' --disable-usage-stats

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" > /dev/null 2>&1; do
    if (( SECONDS > deadline )); then echo "timed out waiting for $what; logs in $DIR" >&2; exit 1; fi
    sleep 1
  done
}
alive_nodes() {
  "$BIN/python" - "$PORT" "$1" <<'PY'
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
alive = sum(1 for n in ray.nodes() if n["Alive"])
sys.exit(0 if alive >= int(sys.argv[2]) else 1)
PY
}
wait_for 90 "the head node" alive_nodes 1

# One node at a time: raylets starting together on a busy machine can miss Ray's start-up deadline.
for ((i = 1; i <= WORKERS; i++)); do
  start "worker$i" "$BIN/ray" start --block --address="127.0.0.1:$PORT" $(node_ports "$i") \
    --num-cpus="$CPUS" --resources='{"trial_driver": 100}' --disable-usage-stats
  wait_for 120 "worker node $i" alive_nodes $((i + 1))
done

TRACKING=""
if [[ $MLFLOW == 1 ]]; then
  BACKEND=${MLFLOW_BACKEND:-sqlite:///$DIR/mlflow.db}
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start mlflow "$BIN/mlflow" server \
    --backend-store-uri "$BACKEND" --artifacts-destination "$DIR/mlartifacts" --serve-artifacts \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
  TRACKING="http://127.0.0.1:$MLFLOW_PORT"
  wait_for 90 "the MLflow server" "$BIN/python" -c "import urllib.request; urllib.request.urlopen('$TRACKING/health', timeout=2)"
fi

echo "$PORT" > "$DIR/gcs_port"
cat > "$DIR/env" <<ENV
# source this file to use the cluster started from $DIR
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$DIR/auth_token
export RAY_ADDRESS=127.0.0.1:$PORT
export ADVTRAIN_JOBS_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
${TRACKING:+export MLFLOW_TRACKING_URI=$TRACKING}
ENV
echo "cluster up: head 127.0.0.1:$PORT + $WORKERS worker node(s), $CPUS CPU(s) each; dashboard/Jobs API http://127.0.0.1:$DASHBOARD_PORT${TRACKING:+; MLflow $TRACKING}"
echo "use it: source $DIR/env    stop it: infra/local/stop_cluster.sh --dir $DIR"
