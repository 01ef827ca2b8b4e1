#!/usr/bin/env bash
# A local gateway cluster: NODES (3) nodes of ./target/release/manifold on
# this machine, in database mode on one Postgres database, sharing one Redis
# (cluster rate limits), each on its own proxy/admin port pair and with its
# own snapshot file. Prints the nodes' addresses, then runs until Ctrl-C
# (SIGINT) or SIGTERM, which stops every node with SIGTERM (each drains its
# requests) and waits for them.
#
#   deploy/local-cluster.sh                      # 3 nodes on the database manifold_local
#   deploy/local-cluster.sh --sync compositions/ # also load a config directory (through node 1)
#   deploy/local-cluster.sh --fresh              # drop and recreate the database first
#   NODES=5 BASE_PORT=9100 deploy/local-cluster.sh
#
# Node i (1-based) listens on 127.0.0.1: proxy BASE_PORT + 10*(i-1), admin
# that + 1 (defaults: 8100/8101, 8110/8111, 8120/8121); the admin API is on
# loopback, so it needs no token. State and logs: STATE/node-i/, where STATE
# is target/local-cluster/BASE_PORT. Once every node answers /status/ready
# the script prints "cluster ready" and writes STATE/nodes, one line per
# node: "i proxy_port admin_port pid", for scripts that start it in the
# background (stop it with SIGTERM then: a background job of a
# non-interactive shell ignores SIGINT).
#
# Settings (environment): PG (postgres://postgres@127.0.0.1:5432, trust
# auth), MANIFOLD_CLUSTER_DB (manifold_local), REDIS_URL
# (redis://127.0.0.1:6379; empty: no Redis), MANIFOLD_REDIS_PREFIX
# (manifold-local), MANIFOLD_BIN (./target/release/manifold, built with
# `cargo build --release` when missing), MANIFOLD_LOG (info).
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-3}
BASE_PORT=${BASE_PORT:-8100}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
DB=${MANIFOLD_CLUSTER_DB:-manifold_local}
REDIS_URL=${REDIS_URL-redis://127.0.0.1:6379}
PREFIX=${MANIFOLD_REDIS_PREFIX:-manifold-local}
BIN=${MANIFOLD_BIN:-./target/release/manifold}
STATE=${STATE:-target/local-cluster/$BASE_PORT}
fresh=0 sync_dir=
while (( $# > 0 )); do
  case $1 in
    --fresh) fresh=1 ;;
    --sync) sync_dir=${2:?--sync needs a directory or file}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ ! -x "$BIN" ]]; then
  [[ "$BIN" == ./target/release/manifold ]] || { echo "MANIFOLD_BIN=$BIN is not an executable (a relative path counts from the repository root)" >&2; exit 1; }
  echo "building manifold (release): $BIN is missing"
  cargo build --release
fi

# The proxy listener uses SO_REUSEPORT: a second process on a taken port
# would share it silently, so taken ports are refused here, before --fresh
# could drop the database of a cluster already running on them.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for i in $(seq 1 "$NODES"); do
  for port in $((BASE_PORT + 10 * (i - 1))) $((BASE_PORT + 10 * (i - 1) + 1)); do
    if listening "$port"; then echo "port $port is taken (another cluster running? set BASE_PORT)" >&2; exit 1; fi
  done
done

# Postgres: the database, and its schema.
command -v psql >/dev/null || { echo "psql is needed (apt-get install postgresql-client)" >&2; exit 1; }
psql "$PG/postgres" -qtAc 'SELECT 1' >/dev/null || { echo "Postgres does not answer at $PG" >&2; exit 1; }
if (( fresh )); then
  echo "dropping the database $DB"
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null
fi
if [[ -z $(psql "$PG/postgres" -qtAc "SELECT 1 FROM pg_database WHERE datname = '$DB'") ]]; then
  echo "creating the database $DB"
  psql "$PG/postgres" -qc "CREATE DATABASE \"$DB\"" >/dev/null
fi
export MANIFOLD_DATABASE_URL=$PG/$DB
MANIFOLD_LOG=warn "$BIN" migrate

# Redis: optional; without it `scope: cluster` limits count per node.
if [[ -n "$REDIS_URL" ]]; then
  if command -v redis-cli >/dev/null && ! redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1; then
    echo "warning: Redis does not answer at $REDIS_URL: cluster rate limits will count per node until it does"
  fi
  export MANIFOLD_REDIS_URL=$REDIS_URL MANIFOLD_REDIS_PREFIX=$PREFIX
else
  unset MANIFOLD_REDIS_URL
fi
export MANIFOLD_LOG=${MANIFOLD_LOG:-info}

pids=()
stopping=0
stop_nodes() {
  local i pid rc
  for i in "${!pids[@]}"; do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if wait "$pid" 2>/dev/null; then rc=0; else rc=$?; fi
    echo "node $((i + 1)) stopped (pid $pid, exit $rc)"
  done
  pids=()
  rm -f "$STATE/nodes"
}
on_signal() {
  (( stopping )) && return
  stopping=1
  echo
  echo "$1: stopping ${#pids[@]} nodes"
  stop_nodes
  exit 0
}
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM
trap '(( ${#pids[@]} == 0 )) || stop_nodes' EXIT

mkdir -p "$STATE"
rm -f "$STATE/nodes"
for i in $(seq 1 "$NODES"); do
  proxy=$((BASE_PORT + 10 * (i - 1))) admin=$((BASE_PORT + 10 * (i - 1) + 1))
  mkdir -p "$STATE/node-$i"
  "$BIN" serve \
    --proxy-listen "127.0.0.1:$proxy" --admin-listen "127.0.0.1:$admin" \
    --snapshot-path "$STATE/node-$i/snapshot.json" > "$STATE/node-$i/log" 2>&1 &
  pids+=($!)
done

# Every node ready, or the log of the one that is not.
for i in $(seq 1 "$NODES"); do
  admin=$((BASE_PORT + 10 * (i - 1) + 1)) pid=${pids[$((i - 1))]}
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$admin/status/ready" >/dev/null && continue 2
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "node $i did not become ready; its log ($STATE/node-$i/log):" >&2
  tail -n 20 "$STATE/node-$i/log" >&2
  exit 1
done

if [[ -n "$sync_dir" ]]; then
  echo "loading $sync_dir into $DB through node 1"
  "$BIN" sync "$sync_dir" --admin "http://127.0.0.1:$((BASE_PORT + 1))"
fi

echo
printf '%-6s %-24s %-24s %-8s %s\n' node proxy admin pid snapshot
for i in $(seq 1 "$NODES"); do
  proxy=$((BASE_PORT + 10 * (i - 1))) admin=$((BASE_PORT + 10 * (i - 1) + 1)) pid=${pids[$((i - 1))]}
  printf '%-6s %-24s %-24s %-8s %s\n' "$i" "http://127.0.0.1:$proxy" "http://127.0.0.1:$admin" "$pid" "$STATE/node-$i/snapshot.json"
  echo "$i $proxy $admin $pid" >> "$STATE/nodes"
done
echo
echo "database $MANIFOLD_DATABASE_URL, Redis ${MANIFOLD_REDIS_URL:-none} (prefix ${MANIFOLD_REDIS_PREFIX:-}), logs in $STATE/node-*/log"
echo "cluster ready: $NODES nodes (Ctrl-C stops them)"

# Until a signal, or until a node dies on its own (then the others are
# stopped and the script fails).
while true; do
  if wait -n "${pids[@]}"; then rc=0; else rc=$?; fi
  (( stopping )) && break
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "node $((i + 1)) exited on its own (exit $rc); its log ($STATE/node-$((i + 1))/log):" >&2
      tail -n 20 "$STATE/node-$((i + 1))/log" >&2
      unset 'pids[i]'
      stopping=1
      stop_nodes
      exit 1
    fi
  done
done
