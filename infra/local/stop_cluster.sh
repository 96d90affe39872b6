#!/usr/bin/env bash
# Stop what infra/local/start_cluster.sh started from DIR (default .cluster): exactly the process
# groups recorded in DIR/pids, newest first (workers before the head); never `ray stop`, which would
# kill every Ray process of this user on the machine.
#   infra/local/stop_cluster.sh [--dir DIR] [--node NAME] [--grace S]   (--node worker2: stop one node
#   only; --grace: seconds a node has to exit after SIGTERM before SIGKILL, default 15)
set -euo pipefail
DIR=.cluster
NODE=""
GRACE=15
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --node) NODE=$2; shift 2 ;;
    --grace) GRACE=$2; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$GRACE" =~ ^[0-9]+$ ]] || { echo "--grace takes whole seconds, got '$GRACE'" >&2; exit 2; }
[[ -s "$DIR/pids" ]] || { echo "nothing recorded in $DIR/pids: no cluster started from $DIR"; exit 0; }

stop_group() {  # stop_group PGID NAME: SIGTERM, then SIGKILL what is left after GRACE seconds
  local pgid=$1 name=$2
  kill -0 -- "-$pgid" 2>/dev/null || return 0
  kill -TERM -- "-$pgid" 2>/dev/null || true
  for _ in $(seq 1 $((2 * GRACE))); do kill -0 -- "-$pgid" 2>/dev/null || { echo "stopped $name"; return 0; }; sleep 0.5; done
  kill -KILL -- "-$pgid" 2>/dev/null || true
  echo "killed $name"
}

tac "$DIR/pids" | while read -r pgid name; do
  if [[ -z "$NODE" || "$NODE" == "$name" ]]; then stop_group "$pgid" "$name"; fi
done
if [[ -z "$NODE" ]]; then
  : > "$DIR/pids"
  # `ray start --head` leaves a pointer to its cluster that a later plain ray.init() would follow.
  current=${RAY_TMPDIR:-/tmp}/ray/ray_current_cluster
  if [[ -s "$DIR/gcs_port" && -f "$current" ]] && grep -q ":$(cat "$DIR/gcs_port")\$" "$current"; then rm -f "$current"; fi
fi
