#!/usr/bin/env bash
# A two-node Ray cluster and an MLflow server on this machine, on loopback only.
#
# The head and the worker are separate raylets (own temp dirs, own logical CPUs; the worker
# also advertises a custom resource "node2"), so placement across nodes behaves as on a real
# cluster. Token auth is on, with a token kept in the state folder (not ~/.ray), and every
# process started here is recorded by PID / process group in that folder; down.sh stops
# exactly those. Never `ray stop` on a shared machine: it kills every Ray on the host.
#
#   cluster/local/up.sh && source "${SE4LIP_LOCAL_DIR:-/tmp/se4lip-local}/env.sh"
#   se4lip-dist submit -- presets
#   se4lip-dist train --data shards/ --address "$RAY_ADDRESS" --tracking-uri "$MLFLOW_TRACKING_URI"
#   cluster/local/down.sh
#
# Keep SE4LIP_LOCAL_DIR short: Ray's unix socket paths under it must stay below 108 bytes.
# Settings (env): SE4LIP_LOCAL_DIR, GCS_PORT (6390), DASH_PORT (8270), MLFLOW_PORT (5055),
# HEAD_CPUS (1), WORKER_CPUS (1), RAY_AUTH_MODE (token | disabled), NO_MLFLOW=1, RAY, PYTHON.
set -euo pipefail

DIR=$(mkdir -p "${SE4LIP_LOCAL_DIR:-${TMPDIR:-/tmp}/se4lip-local}" && cd "${SE4LIP_LOCAL_DIR:-${TMPDIR:-/tmp}/se4lip-local}" && pwd)
RAY=${RAY:-ray}
PYTHON=${PYTHON:-python3}
GCS_PORT=${GCS_PORT:-6390}
DASH_PORT=${DASH_PORT:-8270}
MLFLOW_PORT=${MLFLOW_PORT:-5055}
HEAD_CPUS=${HEAD_CPUS:-1}
WORKER_CPUS=${WORKER_CPUS:-1}
AUTH_MODE=${RAY_AUTH_MODE:-token}
[ "$AUTH_MODE" = "disabled" ] || AUTH_MODE=token

for f in head worker mlflow; do
  if [ -s "$DIR/$f.pid" ] && kill -0 "$(cat "$DIR/$f.pid")" 2>/dev/null; then
    echo "already running ($f, pid $(cat "$DIR/$f.pid")); run cluster/local/down.sh first" >&2
    exit 1
  fi
done

export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=$AUTH_MODE
if [ "$AUTH_MODE" = token ]; then
  [ -s "$DIR/auth_token" ] || (umask 077 && "$PYTHON" -c "import secrets; print(secrets.token_hex(32))" > "$DIR/auth_token")
  export RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
fi

# `setsid` makes each node its own process group, so down.sh can stop it (and only it) at once.
start_node() {  # name, ray start args...
  local name=$1; shift
  setsid "$RAY" start --block --node-ip-address 127.0.0.1 "$@" > "$DIR/$name.log" 2>&1 &
  echo $! > "$DIR/$name.pid"
}

wait_for() {  # what, pidfile, seconds, command...
  local what=$1 pidfile=$2 secs=$3; shift 3
  for _ in $(seq "$secs"); do
    "$@" > /dev/null 2>&1 && return 0
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "$what exited; see $DIR/$(basename "$pidfile" .pid).log" >&2
      exit 1
    fi
    sleep 1
  done
  echo "$what did not come up in ${secs}s; logs in $DIR" >&2
  exit 1
}

auth_header=()
[ "$AUTH_MODE" = token ] && auth_header=(-H "Authorization: Bearer $(cat "$DIR/auth_token")")

start_node head --head --port "$GCS_PORT" --num-cpus "$HEAD_CPUS" --temp-dir "$DIR/ray-head" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --include-dashboard true
wait_for "Ray head dashboard" "$DIR/head.pid" 120 curl -sf "${auth_header[@]}" "http://127.0.0.1:$DASH_PORT/api/version"

start_node worker --address "127.0.0.1:$GCS_PORT" --num-cpus "$WORKER_CPUS" \
  --resources '{"node2": 1}' --temp-dir "$DIR/ray-worker"
wait_for "Ray worker node" "$DIR/worker.pid" 120 grep -q "Ray runtime started" "$DIR/worker.log"

if [ "${NO_MLFLOW:-0}" != 1 ]; then
  mkdir -p "$DIR/mlflow"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$PYTHON" -m mlflow server \
    --backend-store-uri "sqlite:///$DIR/mlflow/mlflow.db" \
    --serve-artifacts --artifacts-destination "$DIR/mlflow/artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 > "$DIR/mlflow.log" 2>&1 &
  echo $! > "$DIR/mlflow.pid"
  wait_for "MLflow server" "$DIR/mlflow.pid" 120 curl -sf "http://127.0.0.1:$MLFLOW_PORT/health"
fi

{
  echo "export RAY_ADDRESS=127.0.0.1:$GCS_PORT"
  echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT"
  echo "export RAY_AUTH_MODE=$AUTH_MODE"
  [ "$AUTH_MODE" = token ] && echo "export RAY_AUTH_TOKEN_PATH=$DIR/auth_token"
  [ "${NO_MLFLOW:-0}" != 1 ] && echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
  true
} > "$DIR/env.sh"
echo "up: Ray 127.0.0.1:$GCS_PORT (dashboard http://127.0.0.1:$DASH_PORT, auth $AUTH_MODE)," \
  "state in $DIR; source $DIR/env.sh"
