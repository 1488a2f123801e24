#!/usr/bin/env bash
# The loopback stand-in of the production cluster, for a person to try: a thin wrapper over
# `cluster/local/standin.py up`, the same code the tests run. It starts, on 127.0.0.1:
#   - an S3 API (moto_server) with the buckets se4lip-data, se4lip-ray and mlflow;
#   - PostgreSQL (Debian's, run as the postgres OS user, fresh data dir) with an mlflow database;
#   - `mlflow server`: PostgreSQL backend store, artifacts served from s3://mlflow/mlflow;
#   - an autoscaling Ray: a 0-CPU head whose autoscaler (Ray's fake multi-node provider) starts
#     worker nodes - cpu_node {CPU: WORKER_CPUS}, gpu_node {CPU: 1, GPU: 1 declared, no CUDA} -
#     as extra raylets when work asks for them, and removes them when idle. Its dashboard is on
#     127.0.0.1; its GCS and raylets listen on every interface (Ray 2.60), so token auth is on.
# Every process group is recorded in the state folder; down.sh stops exactly those (never
# Ray's own stop command, which kills every Ray on the host).
#
#   cluster/local/up.sh && source "${SE4LIP_LOCAL_DIR:-/tmp/se4lip-local}/env.sh"
#   se4lip-dist submit -- presets
#   se4lip-dist train --data shards/ --address "$RAY_ADDRESS" --tracking-uri "$MLFLOW_TRACKING_URI"
#   cluster/local/down.sh
#
# Settings (env): SE4LIP_LOCAL_DIR (/tmp/se4lip-local; keep it short: Ray's socket paths under
# it must stay below 108 bytes), RAY_AUTH_MODE (token | disabled), WORKER_CPUS (1),
# CPU_NODES (2), GPU_NODES (1), IDLE_TIMEOUT_MINUTES (1), GCS_PORT, DASH_PORT, MLFLOW_PORT,
# S3_PORT, PG_PORT (default: free ports), PYTHON (default: the checkout's .venv/bin/python).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-$HERE/../../.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
AUTH_MODE=${RAY_AUTH_MODE:-token}
[ "$AUTH_MODE" = "disabled" ] || AUTH_MODE=token

exec "$PYTHON" "$HERE/standin.py" up --dir "${SE4LIP_LOCAL_DIR:-/tmp/se4lip-local}" \
  --auth "$AUTH_MODE" --worker-cpus "${WORKER_CPUS:-1}" --cpu-nodes "${CPU_NODES:-2}" \
  --gpu-nodes "${GPU_NODES:-1}" --idle-timeout-minutes "${IDLE_TIMEOUT_MINUTES:-1}" \
  --gcs-port "${GCS_PORT:-0}" --dashboard-port "${DASH_PORT:-0}" \
  --mlflow-port "${MLFLOW_PORT:-0}" --s3-port "${S3_PORT:-0}" --postgres-port "${PG_PORT:-0}"
