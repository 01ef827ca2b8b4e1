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
# wrk_measure: wrk warms each target up for WARMUP before its measured run.
# run_rounds measures ROUNDS rounds (the script that calls it sets it).
WARMUP=${WARMUP:-2s}

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

# MANIFOLD_BASE_BIN: an older gateway binary measured in the same rounds as
# MANIFOLD_BIN (a "manifold (base)" row), for before/after numbers from one
# run. Unset: no such row.
base_bin() {
  [[ -n "${MANIFOLD_BASE_BIN:-}" ]] || return 1
  [[ -x "$MANIFOLD_BASE_BIN" ]] || { echo "MANIFOLD_BASE_BIN=$MANIFOLD_BASE_BIN is not an executable file"; exit 1; }
}

# start_nginx NAME CONF_BODY [WORKERS [LAUNCHER]]: runs nginx in the
# foreground with that http{} body; LAUNCHER (e.g. setsid: its own process
# group, so one kill takes master and workers) runs it.
start_nginx() {
  local name=$1 body=$2 workers=${3:-1} launcher=${4:-}
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
  $launcher nginx -p "$work" -c "$work/$name.conf" -g 'daemon off;' &
  nginx_pid=$!
  pids+=("$nginx_pid")
}

# start_manifold PORT ADMIN [BIN [CONFIG_DIR [LOG [NAME=VALUE...]]]]: a
# DB-less gateway in the background; BIN defaults to MANIFOLD_BIN,
# CONFIG_DIR to $work/config, LOG to manifold ($work/logs/LOG.log). The
# NAME=VALUE pairs go into its environment only. Sets manifold_pid.
start_manifold() {
  local port=$1 admin=$2 bin=${3:-$MANIFOLD_BIN} dir=${4:-$work/config} log=${5:-manifold}
  shift $(( $# < 5 ? $# : 5 ))
  env MANIFOLD_LOG=warn "$@" "$bin" serve --config-dir "$dir" \
    --proxy-listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" > "$work/logs/$log.log" 2>&1 &
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

# tree_pids PID...: each PID and its direct children (nginx's, HAProxy's
# and the Node cluster's workers), one a line.
tree_pids() {
  local p
  for p in "$@"; do echo "$p"; pgrep -P "$p" || true; done
}

# tree_rss_mib PID...: peak_rss_mib over the PIDs and their direct children.
tree_rss_mib() {
  local procs
  mapfile -t procs < <(tree_pids "$@")
  peak_rss_mib "${procs[@]}"
}

# cpu_ticks PID...: utime + stime (all threads) summed over the PIDs, in
# clock ticks (getconf CLK_TCK a second), from /proc/PID/stat.
cpu_ticks() {
  local p t total=0
  for p in "$@"; do
    # Fields after "pid (comm) ": state is $1, so utime (field 14) is $12.
    t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null) || continue
    total=$(( total + ${t:-0} ))
  done
  echo "$total"
}

# wrk_measure URL PID...: a WARMUP run, then the measured run; prints
# "req/s p50_ms p99_ms requests cpu_us_per_request errors", where the CPU
# is what the PIDs (and their direct children) used during the measured run
# divided by the requests wrk completed in it. A URL ending in `#close` is
# requested with `Connection: close`: a new connection (and, over https, a
# new handshake) for every request.
wrk_measure() {
  local url=$1 out before after procs headers=()
  shift
  if [[ "$url" == *"#close" ]]; then url=${url%#close}; headers=(-H "Connection: close"); fi
  wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" "${headers[@]}" "$url" >/dev/null
  mapfile -t procs < <(tree_pids "$@")
  before=$(cpu_ticks "${procs[@]}")
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "${headers[@]}" "$url")
  after=$(cpu_ticks "${procs[@]}")
  awk -v ticks=$(( after - before )) -v hz="$(getconf CLK_TCK)" '
    function ms(v, n) { n = v + 0; if (v ~ /us$/) return n / 1000; if (v ~ /ms$/) return n; if (v ~ /m$/) return n * 60000; if (v ~ /s$/) return n * 1000; return n }
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    / requests in / { n = $1 }
    /Non-2xx|Socket errors/ { line = $0; gsub(/^ +| +$/, "", line); err = err (err == "" ? "" : "; ") line }
    END { printf "%s %.3f %.3f %d %.2f %s\n", rps, p50, p99, n, (n > 0 ? ticks * 1e6 / hz / n : 0), (err == "" ? "none" : err) }' <<<"$out"
}

# Alternating rounds. add_target NAME URL PID... adds a row: run_rounds
# measures every row once a round (wrk_measure), ROUNDS rounds, the order
# rotated by one each round, so slow drifts of a shared machine fall on
# every row alike; the PIDs are the processes charged with the CPU.
target_name=() target_url=() target_pids=()
declare -A m_rps=() m_p50=() m_p99=() m_cpu=() m_err=()
add_target() { target_name+=("$1"); target_url+=("$2"); shift 2; target_pids+=("$*"); }

run_rounds() {
  local n=${#target_name[@]} round k i p line rps p50 p99 cpu err progress
  echo "measuring: $ROUNDS alternating rounds of $n targets; each: wrk -t$THREADS -c$CONNS, $WARMUP warm-up, then $DURATION measured"
  for (( round = 1; round <= ROUNDS; round++ )); do
    progress=
    for (( k = 0; k < n; k++ )); do
      i=$(( (k + round - 1) % n ))
      # shellcheck disable=SC2086 # target_pids holds a list of pids
      for p in ${target_pids[i]}; do
        kill -0 "$p" 2>/dev/null || { echo "${target_name[i]}: pid $p is no longer running; logs:"; tail -n 20 "$work"/logs/*; exit 1; }
      done
      # shellcheck disable=SC2086
      line=$(wrk_measure "${target_url[i]}" ${target_pids[i]})
      read -r rps p50 p99 _ cpu err <<<"$line"
      # shellcheck disable=SC2034 # read through namerefs (target_median)
      m_rps[$i,$round]=$rps m_p50[$i,$round]=$p50 m_p99[$i,$round]=$p99 m_cpu[$i,$round]=$cpu m_err[$i,$round]=$err
      progress+="${progress:+, }${target_name[i]} $rps req/s $cpu µs/req"
    done
    echo "round $round: $progress"
  done
}

# median_of_lines: the median of the numbers on stdin (the mean of the
# middle two for an even count).
median_of_lines() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# target_index NAME: the row's index for the functions below.
target_index() {
  local i
  for i in "${!target_name[@]}"; do [[ "${target_name[i]}" == "$1" ]] && { echo "$i"; return; }; done
  echo "no target named $1" >&2; return 1
}

# target_median METRIC I: the median over the rounds of METRIC (rps, p50,
# p99 or cpu) of row I.
target_median() {
  local -n values=m_$1
  local r
  for (( r = 1; r <= ROUNDS; r++ )); do echo "${values[$2,$r]}"; done | median_of_lines
}

# ratio_median METRIC I J: the median over the rounds of that round's
# METRIC of row I divided by row J's.
ratio_median() {
  local -n values=m_$1
  local r
  for (( r = 1; r <= ROUNDS; r++ )); do
    awk -v a="${values[$2,$r]}" -v b="${values[$3,$r]}" 'BEGIN { if (b > 0) print a / b }'
  done | median_of_lines
}

# target_errors I: "none", or each round's wrk errors of row I.
target_errors() {
  local r out=
  for (( r = 1; r <= ROUNDS; r++ )); do
    [[ "${m_err[$1,$r]}" == none ]] || out+="${out:+; }round $r: ${m_err[$1,$r]}"
  done
  echo "${out:-none}"
}

# target_cells I: "req/s | p50 | p99 | µs/req" of row I (medians), for a table row.
target_cells() {
  printf '%.0f | %.2fms | %.2fms | %.1f' "$(target_median rps "$1")" "$(target_median p50 "$1")" \
    "$(target_median p99 "$1")" "$(target_median cpu "$1")"
}

# ratio_row NAME_A NAME_B: a table row "| A / B | req/s ratio | CPU/request ratio |"
# (medians of the per-round ratios).
ratio_row() {
  local a b
  a=$(target_index "$1") b=$(target_index "$2")
  printf '| %s / %s | **%.2fx** | %.2fx |\n' "$1" "$2" "$(ratio_median rps "$a" "$b")" "$(ratio_median cpu "$a" "$b")"
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
