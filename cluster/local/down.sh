#!/usr/bin/env bash
# Stop exactly what up.sh started: a thin wrapper over `cluster/local/standin.py down`.
# Each process group recorded in the state folder is signalled only if its leader is still the
# process up.sh started (same pid and start time): first its own stop signal, SIGKILL after
# GRACE seconds; then every process whose command line names the Ray temp dir, and the
# children of all of them. Settings (env): SE4LIP_LOCAL_DIR (/tmp/se4lip-local), GRACE (15),
# PYTHON.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-$HERE/../../.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

exec "$PYTHON" "$HERE/standin.py" down --dir "${SE4LIP_LOCAL_DIR:-/tmp/se4lip-local}" \
  --grace "${GRACE:-15}"
