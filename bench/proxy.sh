#!/usr/bin/env bash
# Plain-proxy benchmark: Manifold vs nginx as a reverse proxy, same backend,
# same client, one run. Prints req/s, p50 and p99 for each and the ratio.
#
#   bench/proxy.sh            # 5 s per target, 64 connections
#   DURATION=10s CONNS=128 bench/proxy.sh
#   RECORD=1 bench/proxy.sh   # also append the table to bench/RESULTS.md
#
# Needs wrk and nginx (Debian packages; installed when missing). Everything
# listens on loopback ports 18080-18083 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
BACKEND_PORT=18081 NGINX_PORT=18080 MANIFOLD_PORT=18082 ADMIN_PORT=18083

need wrk wrk
need nginx nginx-light
build_manifold

printf '{"id":1,"name":"Ada Lovelace","email":"ada@example.com","tier":"gold"}' > "$work/www/user.json"
chmod -R a+rX "$work"
# The backend: nginx, one worker, a small static JSON document.
start_nginx backend "server { listen 127.0.0.1:$BACKEND_PORT reuseport; location / { root $work/www; default_type application/json; try_files /user.json =404; } }"
# The peer: nginx as a reverse proxy, as it is usually deployed.
start_nginx proxy "upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 256; }
  server { listen 127.0.0.1:$NGINX_PORT reuseport; location / { proxy_pass http://backend; proxy_http_version 1.1;
    proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } }" auto
cat > "$work/config/bench.yaml" <<CONF
routes:
  - name: users
    path: /api/users/{id}
    upstream: http://127.0.0.1:$BACKEND_PORT
CONF
start_manifold $MANIFOLD_PORT $ADMIN_PORT
for port in $BACKEND_PORT $NGINX_PORT $MANIFOLD_PORT; do wait_for "http://127.0.0.1:$port/api/users/1"; done

echo "measuring: wrk -t$THREADS -c$CONNS -d$DURATION, one target at a time"
read -r direct_rps direct_p50 direct_p99 direct_err < <(wrk_run "http://127.0.0.1:$BACKEND_PORT/api/users/1")
read -r nginx_rps nginx_p50 nginx_p99 nginx_err < <(wrk_run "http://127.0.0.1:$NGINX_PORT/api/users/1")
read -r mf_rps mf_p50 mf_p99 mf_err < <(wrk_run "http://127.0.0.1:$MANIFOLD_PORT/api/users/1")
ratio=$(awk -v a="$mf_rps" -v b="$nginx_rps" 'BEGIN { printf "%.2f", a / b }')
table="| target | req/s | p50 | p99 | errors |
| --- | --- | --- | --- | --- |
| backend directly | $direct_rps | $direct_p50 | $direct_p99 | $direct_err |
| nginx reverse proxy | $nginx_rps | $nginx_p50 | $nginx_p99 | $nginx_err |
| manifold | $mf_rps | $mf_p50 | $mf_p99 | $mf_err |

manifold / nginx: **${ratio}x** req/s; manifold peak RSS: $(peak_rss_mib "$manifold_pid") MiB"
echo; echo "$table"
record "Plain proxy (bench/proxy.sh)" "$table"
