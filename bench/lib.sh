# Shared by the benchmark scripts: tools, process cleanup, wrk and hey runs.
# Source it; it sets `work` (a temp dir) and cleans up on exit.

DURATION=${DURATION:-5s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-1}

need() { command -v "$1" >/dev/null || { echo "installing $2"; apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }; }

work=$(mktemp -d)
chmod 755 "$work"
mkdir -p "$work/www" "$work/logs" "$work/config"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

build_manifold() {
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
  MANIFOLD_LOG=warn ./target/release/manifold serve --config-dir "$work/config" \
    --proxy-listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" > "$work/logs/manifold.log" 2>&1 &
  manifold_pid=$!
  pids+=($manifold_pid)
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
