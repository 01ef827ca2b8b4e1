#!/usr/bin/env bash
# Upstream-pool benchmark: a route over a named upstream of three targets
# against the same route to one target (a URL), on one gateway process, in
# alternating rounds. The issue's check: the pool route keeps >= 0.97x the
# req/s of the single-target route.
#
#   bench/pool.sh                        # 5 rounds, 5 s per row, 64 connections
#   ROUNDS=2 DURATION=3s bench/pool.sh   # quick
#   LEAST_REQUESTS=0 bench/pool.sh       # without the least-requests row
#   RECORD=1 bench/pool.sh               # also append the table to bench/RESULTS.md
#
# Rows (all through the same Manifold process, config in one file):
#   one          /one/...      upstream: http://127.0.0.1:18201 (a URL: no balancing)
#   pool (rr)    /pool/...     upstream: pool-rr, targets :18202 :18203 :18204, round-robin
#   pool (lr)    /pool-lr/...  upstream: pool-lr, the same three targets, least-requests
#
# The backends: ONE nginx master with ONE worker, listening on the four
# ports 18201-18204, each answering the same small static JSON document. So
# the single route and the pool reach exactly the same backend capacity (the
# same worker process on the same core budget); the only difference measured
# is what the gateway does for a pool: picking a target, three origins' worth
# of connection pools instead of one, the balancer's counters. Three nginx
# masters with a worker each would give the pool three backend processes
# against the single route's one: on 2 cores that is not "equally capable"
# (the pool would have more backend parallelism, and more processes to
# schedule), so either direction of bias would leak into the ratio. One
# worker is enough: the backend alone serves about twice what the gateway
# proxies (bench/proxy.sh's "backend directly" row), so it is not the
# bottleneck of either route.
#
# Each row: the median over the rounds of req/s, p50, p99 and the gateway's
# CPU (user+sys of its one process, /proc/PID/stat) per request wrk
# completed. Ratios: the median of the per-round ratios.
#
# Needs wrk and nginx (installed when missing). Loopback ports 18200-18205;
# everything stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ROUNDS=${ROUNDS:-5}
LEAST_REQUESTS=${LEAST_REQUESTS:-1}
MANIFOLD_PORT=18200 ADMIN_PORT=18205 ONE_PORT=18201 POOL_PORTS=(18202 18203 18204)
TARGET_RATIO=0.97

need wrk wrk
need nginx nginx-light
build_manifold

printf '{"id":1,"name":"Ada Lovelace","email":"ada@example.com","tier":"gold"}' > "$work/www/user.json"
chmod -R a+rX "$work"
listens=
for port in $ONE_PORT "${POOL_PORTS[@]}"; do listens+="listen 127.0.0.1:$port reuseport; "; done
start_nginx backend "server { $listens location / { root $work/www; default_type application/json; try_files /user.json =404; } }"

targets=
for port in "${POOL_PORTS[@]}"; do targets+="${targets:+, }{ url: \"http://127.0.0.1:$port\" }"; done
cat > "$work/config/bench.yaml" <<YAML
upstreams:
  - name: pool-rr
    targets: [$targets]
    balance: round-robin
  - name: pool-lr
    targets: [$targets]
    balance: least-requests
routes:
  - name: one
    path: /one/{*rest}
    upstream: http://127.0.0.1:$ONE_PORT
  - name: pool-rr
    path: /pool/{*rest}
    upstream: pool-rr
  - name: pool-lr
    path: /pool-lr/{*rest}
    upstream: pool-lr
YAML
"$MANIFOLD_BIN" validate "$work/config" > "$work/logs/validate.log" 2>&1 \
  || { echo "manifold validate refused the config:"; cat "$work/logs/validate.log"; exit 1; }
start_manifold $MANIFOLD_PORT $ADMIN_PORT
mf_pid=$manifold_pid
for port in $ONE_PORT "${POOL_PORTS[@]}"; do wait_for "http://127.0.0.1:$port/api/users/1"; done
for p in one pool pool-lr; do wait_for "http://127.0.0.1:$MANIFOLD_PORT/$p/api/users/1"; done

add_target "one" "http://127.0.0.1:$MANIFOLD_PORT/one/api/users/1" "$mf_pid"
add_target "pool (rr)" "http://127.0.0.1:$MANIFOLD_PORT/pool/api/users/1" "$mf_pid"
(( LEAST_REQUESTS )) && add_target "pool (lr)" "http://127.0.0.1:$MANIFOLD_PORT/pool-lr/api/users/1" "$mf_pid"
run_rounds

# After the run: the pool's connections went to all three ports (ss counts
# the gateway's established connections to each backend port).
spread=
for port in $ONE_PORT "${POOL_PORTS[@]}"; do
  n=$(ss -Htn state established "( dport = :$port )" 2>/dev/null | wc -l || true)
  spread+="${spread:+, }:$port $n"
done

describe() {
  case $1 in
    one) echo "one target (route upstream: a URL)" ;;
    "pool (rr)") echo "pool of 3 targets, round-robin" ;;
    "pool (lr)") echo "pool of 3 targets, least-requests" ;;
  esac
}
table="| route | req/s | p50 | p99 | gateway CPU µs/request | errors |
| --- | --- | --- | --- | --- | --- |"
for i in "${!target_name[@]}"; do
  table+=$'\n'"| $(describe "${target_name[i]}") | $(target_cells "$i") | $(target_errors "$i") |"
done
met_row() {
  local a b r
  a=$(target_index "$1") b=$(target_index "$2")
  r=$(ratio_median rps "$a" "$b")
  printf '| %s / %s | **%.2fx** | %.2fx | >= %sx | %s |\n' "$1" "$2" "$r" "$(ratio_median cpu "$a" "$b")" "$TARGET_RATIO" \
    "$(awk -v r="$r" -v t="$TARGET_RATIO" 'BEGIN { print (r >= t ? "yes" : "no") }')"
}
ratios="| ratio (median of the per-round ratios) | req/s | CPU/request | target | met |
| --- | --- | --- | --- | --- |"
ratios+=$'\n'"$(met_row "pool (rr)" one)"
(( LEAST_REQUESTS )) && ratios+=$'\n'"$(met_row "pool (lr)" one)"
notes="Medians of $ROUNDS alternating rounds (wrk -t$THREADS -c$CONNS, $DURATION each after a $WARMUP warm-up, the order rotated each round), every row through the same gateway process. Backend: one nginx master with one worker listening on four ports (:$ONE_PORT for the single-target route, :${POOL_PORTS[0]} :${POOL_PORTS[1]} :${POOL_PORTS[2]} for the pool), so both routes reach the same backend capacity. gateway CPU µs/request: user+sys CPU of the manifold process during the measured run (/proc/PID/stat utime+stime) divided by the requests wrk completed; wrk's and nginx's CPU are not in it. Gateway connections to each backend port at the end (idle pool): $spread."
table+=$'\n\n'"$ratios"$'\n\n'"$notes"
echo; echo "$table"
record "Upstream pool (bench/pool.sh): 3-target pool vs one target" "$table"
