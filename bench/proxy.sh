#!/usr/bin/env bash
# Plain-proxy benchmark: Manifold vs nginx and HAProxy as reverse proxies,
# same backend (nginx, static JSON), same client (wrk), one run, all targets
# in alternating rounds. Then the same through an https upstream: Manifold
# vs nginx, both proxying to a TLS nginx backend (self-signed certificate).
#
#   bench/proxy.sh                       # 5 rounds, 5 s per target, 64 connections
#   ROUNDS=3 DURATION=10s CONNS=128 bench/proxy.sh
#   MANIFOLD_BASE_BIN=/path/to/older/manifold bench/proxy.sh   # + "manifold (base)" rows
#   RECORD=1 bench/proxy.sh              # also append the table to bench/RESULTS.md
#
# Each row: the median over the rounds of req/s, p50, p99 and of the CPU
# (user+sys) the proxy's own processes used per request. Ratios: the median
# of the per-round ratios. The https rows are skipped (with a message) when
# the Manifold build refuses https upstreams.
#
# Needs wrk, nginx, haproxy and openssl (Debian packages; installed when
# missing). Everything listens on loopback ports 18080-18089 and 18094-18096
# and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ROUNDS=${ROUNDS:-5}
BACKEND_PORT=18081 NGINX_PORT=18080 MANIFOLD_PORT=18082 ADMIN_PORT=18083 HAPROXY_PORT=18084
BASE_PORT=18085 BASE_ADMIN_PORT=18086
TLS_BACKEND_PORT=18087 NGINX_TLS_PORT=18088 MANIFOLD_TLS_PORT=18089 MANIFOLD_TLS_ADMIN=18094
BASE_TLS_PORT=18095 BASE_TLS_ADMIN=18096
url_path=/api/users/1

need wrk wrk
need nginx nginx-light
need haproxy haproxy
need openssl openssl
build_manifold
with_base=0; if base_bin; then with_base=1; echo "also measuring MANIFOLD_BASE_BIN=$MANIFOLD_BASE_BIN as \"manifold (base)\""; fi

printf '{"id":1,"name":"Ada Lovelace","email":"ada@example.com","tier":"gold"}' > "$work/www/user.json"
# A self-signed certificate for the TLS backend: a leaf (CA:FALSE, both
# 127.0.0.1 and localhost as names), trusted as it is by both proxies.
mkdir -p "$work/tls"
cat > "$work/tls/openssl.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = localhost
[leaf]
basicConstraints = critical, CA:FALSE
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
CNF
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -config "$work/tls/openssl.cnf" -extensions leaf \
  -keyout "$work/tls/key.pem" -out "$work/tls/cert.pem" 2>"$work/tls/openssl.log"
chmod -R a+rX "$work"
# The backends: nginx, one worker each, a small static JSON document, over
# http and over https.
start_nginx backend "server { listen 127.0.0.1:$BACKEND_PORT reuseport; location / { root $work/www; default_type application/json; try_files /user.json =404; } }"
backend_pid=$nginx_pid
start_nginx tls-backend "server { listen 127.0.0.1:$TLS_BACKEND_PORT ssl reuseport; ssl_certificate $work/tls/cert.pem; ssl_certificate_key $work/tls/key.pem;
  location / { root $work/www; default_type application/json; try_files /user.json =404; } }"
# The peers: nginx as a reverse proxy, as it is usually deployed (a worker
# per core, upstream keep-alive), to each backend.
start_nginx proxy "upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 256; }
  server { listen 127.0.0.1:$NGINX_PORT reuseport; location / { proxy_pass http://backend; proxy_http_version 1.1;
    proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } }" auto
nginx_proxy_pid=$nginx_pid
start_nginx proxy-tls "upstream tlsbackend { server 127.0.0.1:$TLS_BACKEND_PORT; keepalive 256; }
  server { listen 127.0.0.1:$NGINX_TLS_PORT reuseport; location / { proxy_pass https://tlsbackend; proxy_http_version 1.1;
    proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    proxy_ssl_session_reuse on; proxy_ssl_verify on; proxy_ssl_trusted_certificate $work/tls/cert.pem; proxy_ssl_name localhost; } }" auto
nginx_tls_pid=$nginx_pid
# HAProxy: a thread per core, keep-alive on both sides, idle backend
# connections shared by every client connection (http-reuse always).
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread $(nproc)
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 30s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend proxy
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend backend
backend backend
  server backend 127.0.0.1:$BACKEND_PORT
CONF
haproxy -c -q -f "$work/haproxy.cfg"
haproxy -db -f "$work/haproxy.cfg" > "$work/logs/haproxy.log" 2>&1 &
haproxy_pid=$!
pids+=("$haproxy_pid")

route() { printf 'routes:\n  - name: users\n    path: /api/users/{id}\n    upstream: %s\n' "$1"; }
route "http://127.0.0.1:$BACKEND_PORT" > "$work/config/bench.yaml"
start_manifold $MANIFOLD_PORT $ADMIN_PORT
mf_pid=$manifold_pid
if (( with_base )); then
  start_manifold $BASE_PORT $BASE_ADMIN_PORT "$MANIFOLD_BASE_BIN" "$work/config" manifold-base
  base_pid=$manifold_pid
fi
for port in $BACKEND_PORT $NGINX_PORT $HAPROXY_PORT $MANIFOLD_PORT; do wait_for "http://127.0.0.1:$port$url_path"; done
(( with_base )) && wait_for "http://127.0.0.1:$BASE_PORT$url_path"
curl -sf --cacert "$work/tls/cert.pem" "https://127.0.0.1:$TLS_BACKEND_PORT$url_path" >/dev/null \
  || { echo "the TLS backend does not answer"; cat "$work"/logs/tls-backend-error.log; exit 1; }

# start_tls_manifold LABEL BIN PORT ADMIN LOG: Manifold to the https backend,
# trusting its certificate through SSL_CERT_FILE (this process only). Sets
# manifold_pid and returns 0 when it answers; says why and returns 1 when
# this build refuses https upstreams or does not answer through one.
mkdir -p "$work/config-https"
route "https://127.0.0.1:$TLS_BACKEND_PORT" > "$work/config-https/bench.yaml"
start_tls_manifold() {
  local label=$1 bin=$2 port=$3 admin=$4 log=$5 _ code=
  if ! "$bin" validate "$work/config-https" > "$work/logs/$log-validate.log" 2>&1; then
    echo "https row skipped: this manifold build refuses https upstreams ($label: $(grep -m1 -i https "$work/logs/$log-validate.log" || head -n1 "$work/logs/$log-validate.log"))"
    return 1
  fi
  start_manifold "$port" "$admin" "$bin" "$work/config-https" "$log" "SSL_CERT_FILE=$work/tls/cert.pem"
  for _ in $(seq 1 100); do
    if ! kill -0 "$manifold_pid" 2>/dev/null; then
      echo "https row skipped: this manifold build refuses https upstreams ($label exited: $(tail -n1 "$work/logs/$log.log"))"
      return 1
    fi
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port$url_path" || true)
    [[ "$code" == 200 ]] && return 0
    sleep 0.1
  done
  echo "https row skipped: $label does not answer 200 through the https upstream (last status: ${code:-none}); its log:"
  tail -n 5 "$work/logs/$log.log"
  return 1
}
tls_mf=0 tls_base=0
if start_tls_manifold manifold "$MANIFOLD_BIN" $MANIFOLD_TLS_PORT $MANIFOLD_TLS_ADMIN manifold-https; then tls_mf=1 mf_tls_pid=$manifold_pid; fi
if (( with_base )) && start_tls_manifold "manifold (base)" "$MANIFOLD_BASE_BIN" $BASE_TLS_PORT $BASE_TLS_ADMIN manifold-base-https; then
  tls_base=1 base_tls_pid=$manifold_pid
fi
if (( tls_mf || tls_base )); then wait_for "http://127.0.0.1:$NGINX_TLS_PORT$url_path"; fi

add_target "backend directly" "http://127.0.0.1:$BACKEND_PORT$url_path" "$backend_pid"
add_target "nginx" "http://127.0.0.1:$NGINX_PORT$url_path" "$nginx_proxy_pid"
add_target "haproxy" "http://127.0.0.1:$HAPROXY_PORT$url_path" "$haproxy_pid"
add_target "manifold" "http://127.0.0.1:$MANIFOLD_PORT$url_path" "$mf_pid"
(( with_base )) && add_target "manifold (base)" "http://127.0.0.1:$BASE_PORT$url_path" "$base_pid"
if (( tls_mf || tls_base )); then add_target "nginx, https upstream" "http://127.0.0.1:$NGINX_TLS_PORT$url_path" "$nginx_tls_pid"; fi
(( tls_mf )) && add_target "manifold, https upstream" "http://127.0.0.1:$MANIFOLD_TLS_PORT$url_path" "$mf_tls_pid"
(( tls_base )) && add_target "manifold (base), https upstream" "http://127.0.0.1:$BASE_TLS_PORT$url_path" "$base_tls_pid"
run_rounds

describe() {
  case $1 in
    "backend directly") echo "backend directly (nginx, 1 worker; CPU: the backend)" ;;
    nginx) echo "nginx reverse proxy ($(nproc) workers, upstream keepalive)" ;;
    haproxy) echo "haproxy (nbthread $(nproc), http-reuse always)" ;;
    "nginx, https upstream") echo "nginx reverse proxy, https upstream (keepalive, session reuse)" ;;
    *) echo "$1" ;;
  esac
}
rss_of() {
  case $1 in
    "backend directly") tree_rss_mib "$backend_pid" ;;
    nginx) tree_rss_mib "$nginx_proxy_pid" ;;
    haproxy) tree_rss_mib "$haproxy_pid" ;;
    manifold) peak_rss_mib "$mf_pid" ;;
    "manifold (base)") peak_rss_mib "$base_pid" ;;
    "nginx, https upstream") tree_rss_mib "$nginx_tls_pid" ;;
    "manifold, https upstream") peak_rss_mib "$mf_tls_pid" ;;
    "manifold (base), https upstream") peak_rss_mib "$base_tls_pid" ;;
  esac
}
table="| target | req/s | p50 | p99 | proxy CPU µs/request | peak RSS | errors |
| --- | --- | --- | --- | --- | --- | --- |"
for i in "${!target_name[@]}"; do
  table+=$'\n'"| $(describe "${target_name[i]}") | $(target_cells "$i") | $(rss_of "${target_name[i]}") MiB | $(target_errors "$i") |"
done
ratios="| ratio (median of the per-round ratios) | req/s | CPU/request |
| --- | --- | --- |"
mfs=(manifold); (( with_base )) && mfs+=("manifold (base)")
for m in "${mfs[@]}"; do ratios+=$'\n'"$(ratio_row "$m" nginx)"$'\n'"$(ratio_row "$m" haproxy)"; done
(( with_base )) && ratios+=$'\n'"$(ratio_row manifold "manifold (base)")"
(( tls_mf )) && ratios+=$'\n'"$(ratio_row "manifold, https upstream" "nginx, https upstream")"
(( tls_base )) && ratios+=$'\n'"$(ratio_row "manifold (base), https upstream" "nginx, https upstream")"
(( tls_mf && tls_base )) && ratios+=$'\n'"$(ratio_row "manifold, https upstream" "manifold (base), https upstream")"
notes="Medians of $ROUNDS alternating rounds (wrk -t$THREADS -c$CONNS, $DURATION each after a $WARMUP warm-up, the order rotated each round). proxy CPU µs/request (issue 12's \"client CPU per request\"): user+sys CPU of the process(es) under test (nginx and HAProxy: master and workers; manifold: its one process; the first row: the backend itself) during the measured run, from /proc/PID/stat utime+stime, divided by the requests wrk completed; wrk's CPU is not in it, nor (except in the first row) the backend's. Peak RSS: VmHWM, summed over those processes."
(( tls_mf || tls_base )) || notes+=" https rows skipped: the manifold build refuses https upstreams."
[[ -n "${MANIFOLD_BASE_BIN:-}" ]] && notes+=" manifold (base): $MANIFOLD_BASE_BIN."
table+=$'\n\n'"$ratios"$'\n\n'"$notes"
echo; echo "$table"
record "Plain proxy (bench/proxy.sh)" "$table"
