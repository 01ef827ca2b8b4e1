# shellcheck shell=bash
# Shared by the benchmark scripts: tools, process cleanup, wrk and hey runs,
# a local cluster (deploy/local-cluster.sh). Source it from the repository's
# root; it sets `work` (a temp dir) and cleans up on exit.
#
# MANIFOLD_BIN: the gateway binary, used as it is (give an absolute path).
# Unset: ./target/release/manifold, which build_manifold builds or brings
# up to date with `cargo build --release`.

DURATION=${DURATION:-5s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-1}

need() { command -v "$1" >/dev/null || { echo "installing $2"; apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }; }

work=$(mktemp -d)
chmod 755 "$work"
mkdir -p "$work/www" "$work/logs" "$work/config"
pids=()
cleanup() {
  trap '' HUP INT TERM
  stop_cluster
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# A signal ends the script through cleanup too. Bash runs these traps only
# between commands or inside `wait`: long steps run in the background
# (their pids in `pids`) and are waited for, so a signal stops them at once.
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n "${MANIFOLD_BIN:-}" ]]; then manifold_prebuilt=1; else manifold_prebuilt=0; fi
export MANIFOLD_BIN=${MANIFOLD_BIN:-./target/release/manifold}

build_manifold() {
  if (( manifold_prebuilt )); then
    [[ -x "$MANIFOLD_BIN" ]] || { echo "MANIFOLD_BIN=$MANIFOLD_BIN is not an executable file"; exit 1; }
    echo "using MANIFOLD_BIN=$MANIFOLD_BIN as it is (not rebuilt)"
    return
  fi
  echo "building manifold (release)"
  cargo build --release --quiet
}

# start_nginx NAME CONF_BODY: runs nginx in the foreground with that http{} body.
start_nginx() {
  local name=$1 body=$2 workers=${3:-1}
  cat > "$work/$name.conf" <<CONF
worker_processes $workers;
pid $work/$name.pid;
error_log $work/logs/$name-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  $body
}
CONF
  nginx -p "$work" -c "$work/$name.conf" -g 'daemon off;' &
  pids+=($!)
}

start_manifold() {
  local port=$1 admin=$2
  MANIFOLD_LOG=warn "$MANIFOLD_BIN" serve --config-dir "$work/config" \
    --proxy-listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" > "$work/logs/manifold.log" 2>&1 &
  manifold_pid=$!
  pids+=("$manifold_pid")
}

wait_for() {
  local url=$1
  for _ in $(seq 1 100); do
    curl -sf "$url" >/dev/null && return 0
    sleep 0.1
  done
  echo "$url did not answer"; cat "$work"/logs/* 2>/dev/null; exit 1
}

# wrk_run URL: prints "req/s p50 p99 errors" after a 2 s warm-up.
wrk_run() {
  local url=$1 out
  wrk -t"$THREADS" -c"$CONNS" -d2s "$url" >/dev/null
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$url")
  local rps p50 p99 errors
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  echo "$rps $p50 $p99 ${errors:-none}"
}

# hey_p99 URL RATE: p99 latency in ms at a fixed total request rate.
hey_p99() {
  local url=$1 rate=$2 conns=16
  local per=$(( (rate + conns - 1) / conns ))
  hey -z "${DURATION}" -c $conns -q "$per" "$url" | awk '/99% in/ {printf "%.2f", $3 * 1000}'
}

peak_rss_mib() {
  local total=0 pid
  for pid in "$@"; do
    total=$(( total + $(awk '/VmHWM/ {print $2}' "/proc/$pid/status") ))
  done
  echo $(( total / 1024 ))
}

record() {
  if [[ "${RECORD:-0}" == 1 ]]; then
    {
      echo
      echo "## $1, $(date -u +%Y-%m-%d) on $(nproc) cores ($(uname -m))${3-, wrk -t$THREADS -c$CONNS -d$DURATION}"
      echo
      echo "$2"
    } >> bench/RESULTS.md
    echo "appended to bench/RESULTS.md"
  fi
}

# start_cluster NAME BASE_PORT: three gateway nodes from deploy/local-cluster.sh,
# in the background, on a fresh database manifold_bench_NAME (dropped by
# stop_cluster, which cleanup runs) and a fresh Redis key prefix, with their
# state and logs under $work. Waits for "cluster ready", then sets
# node_proxy, node_admin and node_pid (arrays, node 1 first) from its
# STATE/nodes file. Settings: PG (postgres://postgres@127.0.0.1:5432),
# REDIS_URL (redis://127.0.0.1:6379), CLUSTER_LOG (the nodes' MANIFOLD_LOG,
# warn: no access log on the request path).
cluster_pid='' cluster_db='' cluster_prefix='' cluster_state=''
node_proxy=() node_admin=() node_pid=()
start_cluster() {
  cluster_db=manifold_bench_${1//-/_}
  cluster_prefix=bench-$1-$$-$(date +%s)
  cluster_state=$work/cluster
  NODES=3 BASE_PORT=$2 STATE=$cluster_state PG=${PG:-postgres://postgres@127.0.0.1:5432} \
    MANIFOLD_CLUSTER_DB=$cluster_db REDIS_URL=${REDIS_URL-redis://127.0.0.1:6379} \
    MANIFOLD_REDIS_PREFIX=$cluster_prefix MANIFOLD_LOG=${CLUSTER_LOG:-warn} \
    deploy/local-cluster.sh --fresh > "$work/logs/cluster.log" 2>&1 &
  cluster_pid=$!
  local _
  for _ in $(seq 1 1200); do
    grep -q '^cluster ready' "$work/logs/cluster.log" && break
    if ! kill -0 "$cluster_pid" 2>/dev/null; then
      echo "deploy/local-cluster.sh failed:"; cat "$work/logs/cluster.log"; exit 1
    fi
    sleep 0.1
  done
  grep -q '^cluster ready' "$work/logs/cluster.log" || { echo "the cluster was not ready after 120 s:"; cat "$work/logs/cluster.log"; exit 1; }
  local proxy admin pid
  while read -r _ proxy admin pid; do
    node_proxy+=("$proxy") node_admin+=("$admin") node_pid+=("$pid")
  done < "$cluster_state/nodes"
  (( ${#node_proxy[@]} == 3 )) || { echo "$cluster_state/nodes lists ${#node_proxy[@]} nodes, not 3"; exit 1; }
  echo "cluster ready: proxies ${node_proxy[*]}, admin ${node_admin[*]}; database $cluster_db, Redis prefix $cluster_prefix"
}

# stop_cluster: SIGTERM to local-cluster.sh (which stops its nodes and waits
# for them), up to 40 s; then SIGKILL to whatever is left; then the database
# and the Redis keys are dropped. Does nothing when no cluster was started.
stop_cluster() {
  [[ -n "$cluster_pid" ]] || return 0
  local pid=$cluster_pid _ p
  cluster_pid=
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 400); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "local-cluster.sh did not stop within 40 s: killing it and its nodes"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  for p in "${node_pid[@]}"; do
    if kill -0 "$p" 2>/dev/null; then echo "node pid $p still runs: killing it"; kill -KILL "$p" 2>/dev/null || true; fi
  done
  grep -E '^node [0-9]+ (stopped|exited)' "$work/logs/cluster.log" 2>/dev/null | tr '\n' ';' | sed 's/;$/\n/; s/;/; /g' || true
  psql "${PG:-postgres://postgres@127.0.0.1:5432}/postgres" -qc "DROP DATABASE IF EXISTS \"$cluster_db\" WITH (FORCE)" >/dev/null 2>&1 \
    || echo "could not drop the database $cluster_db"
  if [[ -n "${REDIS_URL-redis://127.0.0.1:6379}" ]] && command -v redis-cli >/dev/null; then
    redis-cli -u "${REDIS_URL-redis://127.0.0.1:6379}" --scan --pattern "$cluster_prefix:*" 2>/dev/null \
      | xargs -r -n 500 redis-cli -u "${REDIS_URL-redis://127.0.0.1:6379}" del >/dev/null 2>&1 || true
  fi
}
