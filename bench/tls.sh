#!/usr/bin/env bash
# TLS termination benchmark: Manifold's TLS listener vs nginx terminating TLS,
# the same certificate (ECDSA P-256, TLS 1.3 by default on both), the same
# backend (nginx, static JSON over plain HTTP), the same client (wrk), all
# targets in alternating rounds:
#   - keep-alive: requests per second over long-lived TLS connections;
#   - new connections: `Connection: close` on every request, so each request
#     is a new TCP connection and a full handshake (no session resumption:
#     wrk does not resume), i.e. handshakes per second.
#
#   bench/tls.sh                          # 3 rounds, 5 s per target, 64 connections
#   ROUNDS=2 DURATION=3s WARMUP=1s bench/tls.sh   # short, on a shared machine
#   RECORD=1 bench/tls.sh                 # also append the table to bench/RESULTS.md
#
# Needs wrk, nginx and openssl (Debian packages; installed when missing).
# Everything listens on loopback ports 18180-18185 and stops when the
# script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ROUNDS=${ROUNDS:-3}
BACKEND_PORT=18180 NGINX_TLS_PORT=18181 MANIFOLD_PORT=18182 MANIFOLD_TLS_PORT=18183 ADMIN_PORT=18184
url_path=/api/users/1

need wrk wrk
need nginx nginx-light
need openssl openssl
build_manifold

printf '{"id":1,"name":"Ada Lovelace","email":"ada@example.com","tier":"gold"}' > "$work/www/user.json"
mkdir -p "$work/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$work/tls/key.pem" -out "$work/tls/cert.pem" 2>"$work/tls/openssl.log"
chmod -R a+rX "$work"

start_nginx backend "server { listen 127.0.0.1:$BACKEND_PORT reuseport; location / { root $work/www; default_type application/json; try_files /user.json =404; } }"
backend_pid=$nginx_pid
# nginx as it is usually deployed in front of services: a worker per core,
# TLS on the listener, upstream keep-alive to the backend.
start_nginx tls-proxy "upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 256; }
  server { listen 127.0.0.1:$NGINX_TLS_PORT ssl reuseport; ssl_certificate $work/tls/cert.pem; ssl_certificate_key $work/tls/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto https; } }" auto
nginx_tls_pid=$nginx_pid

printf 'routes:\n  - name: users\n    path: /api/users/{id}\n    upstream: http://127.0.0.1:%s\n' $BACKEND_PORT > "$work/config/bench.yaml"
start_manifold $MANIFOLD_PORT $ADMIN_PORT "$MANIFOLD_BIN" "$work/config" manifold \
  "MANIFOLD_PROXY_TLS_LISTEN=127.0.0.1:$MANIFOLD_TLS_PORT" "MANIFOLD_TLS_CERT=$work/tls/cert.pem" "MANIFOLD_TLS_KEY=$work/tls/key.pem"
mf_pid=$manifold_pid
wait_for "http://127.0.0.1:$BACKEND_PORT$url_path"
for port in $NGINX_TLS_PORT $MANIFOLD_TLS_PORT; do
  for _ in $(seq 1 100); do curl -sf --cacert "$work/tls/cert.pem" "https://localhost:$port$url_path" >/dev/null && break; sleep 0.1; done
  curl -sf --cacert "$work/tls/cert.pem" "https://localhost:$port$url_path" >/dev/null \
    || { echo "https://localhost:$port does not answer"; tail -n 20 "$work"/logs/*; exit 1; }
done

add_target "nginx, keep-alive" "https://localhost:$NGINX_TLS_PORT$url_path" "$nginx_tls_pid"
add_target "manifold, keep-alive" "https://localhost:$MANIFOLD_TLS_PORT$url_path" "$mf_pid"
add_target "nginx, new connections" "https://localhost:$NGINX_TLS_PORT$url_path#close" "$nginx_tls_pid"
add_target "manifold, new connections" "https://localhost:$MANIFOLD_TLS_PORT$url_path#close" "$mf_pid"
run_rounds

table="| target | req/s | p50 | p99 | proxy CPU µs/request | errors |
| --- | --- | --- | --- | --- | --- |"
for i in "${!target_name[@]}"; do
  table+=$'\n'"| ${target_name[i]} | $(target_cells "$i") | $(target_errors "$i") |"
done
ratios="| ratio (median of the per-round ratios) | req/s | CPU/request |
| --- | --- | --- |
$(ratio_row "manifold, keep-alive" "nginx, keep-alive")
$(ratio_row "manifold, new connections" "nginx, new connections")"
notes="Medians of $ROUNDS alternating rounds (wrk -t$THREADS -c$CONNS, $DURATION each after a $WARMUP warm-up, the order rotated each round). Both terminate TLS with the same ECDSA P-256 certificate and proxy to the same nginx backend over plain HTTP; nginx: $(nproc) workers, upstream keep-alive. new connections: Connection: close on every request, so req/s there is new TCP connections and full handshakes per second (wrk does not resume sessions). proxy CPU µs/request: user+sys CPU of the process(es) under test during the measured run divided by the requests wrk completed (wrk's own CPU, the backend's and the kernel's loopback work are not in it)."
table+=$'\n\n'"$ratios"$'\n\n'"$notes"
echo; echo "$table"
record "TLS termination (bench/tls.sh)" "$table"
