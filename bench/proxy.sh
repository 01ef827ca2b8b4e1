#!/usr/bin/env bash
# Plain-proxy benchmark: Manifold vs nginx as a reverse proxy, same backend,
# same client, one run. Prints req/s, p50 and p99 for each and the ratio.
#
#   bench/proxy.sh            # 5 s per target, 64 connections
#   DURATION=10s CONNS=128 bench/proxy.sh
#   RECORD=1 bench/proxy.sh   # also append the table to bench/RESULTS.md
#
# Needs wrk and nginx (Debian packages; installed when missing). Everything
# listens on loopback ports 18080-18082 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-1}
BACKEND_PORT=18081 NGINX_PORT=18080 MANIFOLD_PORT=18082 ADMIN_PORT=18083

need() { command -v "$1" >/dev/null || { echo "installing $2"; apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }; }
need wrk wrk
need nginx nginx-light

echo "building manifold (release)"
cargo build --release --quiet

work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The backend: nginx, one worker, a small static JSON document.
mkdir -p "$work/www" "$work/logs"
printf '{"id":1,"name":"Ada Lovelace","email":"ada@example.com","tier":"gold"}' > "$work/www/user.json"
chmod -R a+rX "$work"
cat > "$work/backend.conf" <<CONF
worker_processes 1;
pid $work/backend.pid;
error_log $work/logs/backend-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$BACKEND_PORT reuseport;
    location / { root $work/www; default_type application/json; try_files /user.json =404; }
  }
}
CONF
# The peer: nginx as a reverse proxy, as it is usually deployed.
cat > "$work/proxy.conf" <<CONF
worker_processes auto;
pid $work/proxy.pid;
error_log $work/logs/proxy-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 256; }
  server {
    listen 127.0.0.1:$NGINX_PORT reuseport;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
CONF
nginx -p "$work" -c "$work/backend.conf" -g 'daemon off;' & pids+=($!)
nginx -p "$work" -c "$work/proxy.conf" -g 'daemon off;' & pids+=($!)

mkdir -p "$work/config"
cat > "$work/config/bench.yaml" <<CONF
routes:
  - name: users
    path: /api/users/{id}
    upstream: http://127.0.0.1:$BACKEND_PORT
CONF
MANIFOLD_LOG=warn ./target/release/manifold serve --config-dir "$work/config" \
  --proxy-listen 127.0.0.1:$MANIFOLD_PORT --admin-listen 127.0.0.1:$ADMIN_PORT > "$work/logs/manifold.log" 2>&1 &
manifold_pid=$!
pids+=($manifold_pid)

for port in $BACKEND_PORT $NGINX_PORT $MANIFOLD_PORT; do
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/api/users/1" >/dev/null && break
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$port/api/users/1" >/dev/null || { echo "port $port did not answer"; cat "$work"/logs/*; exit 1; }
done

# wrk's --latency output: "Requests/sec:", and the 50% / 99% lines.
run() {
  local port=$1 out
  wrk -t"$THREADS" -c"$CONNS" -d2s "http://127.0.0.1:$port/api/users/1" >/dev/null  # warm-up
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$port/api/users/1")
  local rps p50 p99 errors
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  echo "$rps $p50 $p99 ${errors:-none}"
}

echo "measuring: wrk -t$THREADS -c$CONNS -d$DURATION, one target at a time"
read -r direct_rps direct_p50 direct_p99 direct_err < <(run $BACKEND_PORT)
read -r nginx_rps nginx_p50 nginx_p99 nginx_err < <(run $NGINX_PORT)
read -r mf_rps mf_p50 mf_p99 mf_err < <(run $MANIFOLD_PORT)
mf_rss=$(awk '/VmHWM/ {print $2}' "/proc/$manifold_pid/status")

ratio=$(awk -v a="$mf_rps" -v b="$nginx_rps" 'BEGIN { printf "%.2f", a / b }')
table=$(cat <<TABLE
| target | req/s | p50 | p99 | errors |
| --- | --- | --- | --- | --- |
| backend directly | $direct_rps | $direct_p50 | $direct_p99 | $direct_err |
| nginx reverse proxy | $nginx_rps | $nginx_p50 | $nginx_p99 | $nginx_err |
| manifold | $mf_rps | $mf_p50 | $mf_p99 | $mf_err |

manifold / nginx: **${ratio}x** req/s; manifold peak RSS: $((mf_rss / 1024)) MiB
TABLE
)
echo
echo "$table"

if [[ "${RECORD:-0}" == 1 ]]; then
  {
    echo
    echo "## Plain proxy, $(date -u +%Y-%m-%d) on $(nproc) cores ($(uname -m)), wrk -t$THREADS -c$CONNS -d$DURATION"
    echo
    echo "$table"
  } >> bench/RESULTS.md
  echo "appended to bench/RESULTS.md"
fi
