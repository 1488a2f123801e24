#!/usr/bin/env bash
# Stop exactly what up.sh started: each recorded process group, SIGTERM then SIGKILL.
# A PID is only signalled if it still leads its group and runs ray or mlflow (PIDs get reused).
set -uo pipefail
DIR=${SE4LIP_LOCAL_DIR:-${TMPDIR:-/tmp}/se4lip-local}
GRACE=${GRACE:-15}

for f in mlflow worker head; do
  pidfile="$DIR/$f.pid"
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if [ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$pid" ] \
      && grep -qaE 'ray|mlflow' "/proc/$pid/cmdline" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null
    for _ in $(seq $((GRACE * 5))); do
      # Zombies (Z) still count to `kill -0`; look for live members of the group.
      [ -z "$(ps -eo pgid=,stat= | awk -v g="$pid" '$1==g && $2 !~ /^Z/')" ] && break
      sleep 0.2
    done
    kill -KILL -- "-$pid" 2>/dev/null
    echo "stopped $f (process group $pid)"
  fi
  rm -f "$pidfile"
done
