#!/usr/bin/env bash
# Composition benchmark: Manifold's user dashboard (three parallel backend
# calls plus reshaping) vs two hand-written BFFs serving the same answer: a
# Node.js one (fastify + undici, one process per core, bench/peers/node-bff)
# and a Go one (standard library, typed structs, a goroutine per call,
# bench/peers/go-bff); same backends, same client, one run, all targets in
# alternating rounds.
#
#   bench/compose.sh             # 5 rounds, 5 s per target, 64 connections
#   MANIFOLD_BASE_BIN=/path/to/older/manifold bench/compose.sh   # + a "manifold (base)" row
#   RECORD=1 bench/compose.sh    # also append the table to bench/RESULTS.md
#
# Each row: the median over the rounds of req/s, p50, p99 and of the CPU
# (user+sys) the gateway's own processes used per request; its peak RSS;
# and the p99 each adds over calling one backend directly at half
# Manifold's median rate (hey, fixed rate). Ratios: the median of the
# per-round ratios. Needs wrk, hey, nginx, node/npm and go (Debian;
# installed when missing); loopback ports 18101-18115 only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ROUNDS=${ROUNDS:-5}
USERS=18101 ORDERS=18102 REVIEWS=18103 NODE_PORT=18110 MANIFOLD_PORT=18111 ADMIN_PORT=18112
GO_PORT=18113 BASE_PORT=18114 BASE_ADMIN_PORT=18115

need wrk wrk
need hey hey
need nginx nginx-light
need go golang-go
command -v node >/dev/null || need node nodejs
command -v npm >/dev/null || need npm npm
[ -d bench/peers/node-bff/node_modules ] || (cd bench/peers/node-bff && npm install --silent --no-audit --no-fund)
build_manifold
with_base=0; if base_bin; then with_base=1; echo "also measuring MANIFOLD_BASE_BIN=$MANIFOLD_BASE_BIN as \"manifold (base)\""; fi
# The Go BFF: standard library only (go.mod requires nothing), built into
# the temp dir; the build cache is Go's usual one (~/.cache/go-build).
echo "building bench/peers/go-bff"
(cd bench/peers/go-bff && GOPATH="$work/gopath" GOPROXY=off GOFLAGS=-mod=mod go build -o "$work/go-bff" .)

# Three backends: one nginx worker answering static JSON on three ports.
printf '{"id":1,"name":"Ada Lovelace","email":"ada@example.com","seller_id":10,"tier":"gold"}' > "$work/www/user.json"
printf '{"user_id":"1","items":[{"id":"o-1001","total":42.5,"status":"shipped","product_id":"p-1"},{"id":"o-1002","total":12.0,"status":"delivered","product_id":"p-2"},{"id":"o-1003","total":99.9,"status":"processing","product_id":"p-3"}]}' > "$work/www/orders.json"
printf '{"user_id":"1","items":[{"product_id":"p-1","stars":5,"text":"Exactly as described."},{"product_id":"p-2","stars":4,"text":"Good value."}],"average":4.5}' > "$work/www/reviews.json"
chmod -R a+rX "$work"
server() { echo "server { listen 127.0.0.1:$1 reuseport; location / { root $work/www; default_type application/json; try_files /$2 =404; } }"; }
start_nginx backends "$(server $USERS user.json) $(server $ORDERS orders.json) $(server $REVIEWS reviews.json)"

cat > "$work/config/bench.yaml" <<CONF
compositions:
  - name: user-dashboard
    path: /v1/users/{id}/dashboard
    timeout: 2s
    calls:
      user: { url: "http://127.0.0.1:$USERS/users/{{request.path.id}}" }
      orders: { url: "http://127.0.0.1:$ORDERS/orders?user={{request.path.id}}&limit=5", required: false }
      reviews: { url: "http://127.0.0.1:$REVIEWS/reviews?user={{request.path.id}}", required: false }
    response:
      headers: { cache-control: "private, max-age=10" }
      body: { id: \$.user.body.id, name: \$.user.body.name, tier: \$.user.body.tier, orders: \$.orders.body.items, rating: \$.reviews.body.average }
CONF
start_manifold $MANIFOLD_PORT $ADMIN_PORT
mf_pid=$manifold_pid
if (( with_base )); then
  start_manifold $BASE_PORT $BASE_ADMIN_PORT "$MANIFOLD_BASE_BIN" "$work/config" manifold-base
  base_pid=$manifold_pid
fi
backend_env=("USERS_URL=http://127.0.0.1:$USERS" "ORDERS_URL=http://127.0.0.1:$ORDERS" "REVIEWS_URL=http://127.0.0.1:$REVIEWS")
env PORT=$NODE_PORT "${backend_env[@]}" node bench/peers/node-bff/server.js > "$work/logs/node.log" 2>&1 &
node_bff_pid=$!
pids+=("$node_bff_pid")
env PORT=$GO_PORT "${backend_env[@]}" "$work/go-bff" > "$work/logs/go-bff.log" 2>&1 &
go_pid=$!
pids+=("$go_pid")

path=/v1/users/1/dashboard
wait_for "http://127.0.0.1:$USERS/users/1"
wait_for "http://127.0.0.1:$MANIFOLD_PORT$path"
(( with_base )) && wait_for "http://127.0.0.1:$BASE_PORT$path"
wait_for "http://127.0.0.1:$NODE_PORT$path"
wait_for "http://127.0.0.1:$GO_PORT$path"
# Same work, same answer: the comparison is only fair if the bodies (as
# JSON) and the cache-control headers match Manifold's.
answer() { curl -s -D "$work/headers.$1" -o "$work/body.$1" "http://127.0.0.1:$2$path"; }
cache_control() { awk -F': *' 'tolower($1) == "cache-control" { sub(/\r$/, "", $2); print $2 }' "$work/headers.$1"; }
answer manifold $MANIFOLD_PORT
peers=("node:$NODE_PORT" "go:$GO_PORT"); (( with_base )) && peers+=("base:$BASE_PORT")
for peer in "${peers[@]}"; do
  name=${peer%%:*}
  answer "$name" "${peer#*:}"
  if ! python3 -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])) != json.load(open(sys.argv[2])))' "$work/body.manifold" "$work/body.$name" \
    || [[ "$(cache_control manifold)" != "$(cache_control "$name")" ]]; then
    echo "manifold and $name answer differently:"
    echo "manifold: cache-control: $(cache_control manifold); $(cat "$work/body.manifold")"
    echo "$name: cache-control: $(cache_control "$name"); $(cat "$work/body.$name")"
    exit 1
  fi
done
echo "same answer from every gateway (cache-control: $(cache_control manifold)): $(cat "$work/body.manifold")"

add_target "node BFF" "http://127.0.0.1:$NODE_PORT$path" "$node_bff_pid"
add_target "go BFF" "http://127.0.0.1:$GO_PORT$path" "$go_pid"
add_target "manifold" "http://127.0.0.1:$MANIFOLD_PORT$path" "$mf_pid"
(( with_base )) && add_target "manifold (base)" "http://127.0.0.1:$BASE_PORT$path" "$base_pid"
run_rounds

# Moderate load: half of Manifold's median rate, through each gateway and
# straight to one backend; what a gateway adds is its p99 minus the backend's.
rate=$(awk -v r="$(target_median rps "$(target_index manifold)")" 'BEGIN { printf "%d", r / 2 }')
echo "measuring p99 at a fixed $rate req/s (hey, $DURATION each)"
direct_p99=$(hey_p99 "http://127.0.0.1:$USERS/users/1" "$rate")
declare -A mod_p99
for i in "${!target_name[@]}"; do mod_p99[$i]=$(hey_p99 "${target_url[i]}" "$rate"); done
added() { awk -v a="$1" -v b="$direct_p99" 'BEGIN { printf "%.2f", a - b }'; }

describe() {
  case $1 in
    "node BFF") echo "node BFF (fastify + undici, $(( $(pgrep -c -P "$node_bff_pid") )) worker processes)" ;;
    "go BFF") echo "go BFF (net/http, typed structs, GOMAXPROCS ${GOMAXPROCS:-$(nproc)})" ;;
    *) echo "$1" ;;
  esac
}
rss_of() {
  case $1 in
    "node BFF") tree_rss_mib "$node_bff_pid" ;;
    "go BFF") peak_rss_mib "$go_pid" ;;
    manifold) peak_rss_mib "$mf_pid" ;;
    "manifold (base)") peak_rss_mib "$base_pid" ;;
  esac
}
table="| gateway | req/s | p50 | p99 | gateway CPU µs/request | peak RSS | p99 at $rate req/s | added over a direct backend call | errors |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for i in "${!target_name[@]}"; do
  table+=$'\n'"| $(describe "${target_name[i]}") | $(target_cells "$i") | $(rss_of "${target_name[i]}") MiB | ${mod_p99[$i]} ms | $(added "${mod_p99[$i]}") ms | $(target_errors "$i") |"
done
ratios="| ratio (median of the per-round ratios) | req/s | CPU/request |
| --- | --- | --- |
$(ratio_row manifold "node BFF")
$(ratio_row manifold "go BFF")"
if (( with_base )); then
  ratios+=$'\n'"$(ratio_row "manifold (base)" "node BFF")"$'\n'"$(ratio_row "manifold (base)" "go BFF")"$'\n'"$(ratio_row manifold "manifold (base)")"
fi
notes="Medians of $ROUNDS alternating rounds (wrk -t$THREADS -c$CONNS, $DURATION each after a $WARMUP warm-up, the order rotated each round). gateway CPU µs/request (issue 12's \"client CPU per request\"): user+sys CPU of the gateway's own process(es) (the node BFF: its primary and workers) during the measured run, from /proc/PID/stat utime+stime, divided by the requests wrk completed; wrk's and the backends' CPU are not in it. Peak RSS: VmHWM, summed over those processes. A direct backend call's p99 at $rate req/s: ${direct_p99} ms."
[[ -n "${MANIFOLD_BASE_BIN:-}" ]] && notes+=" manifold (base): $MANIFOLD_BASE_BIN."
table+=$'\n\n'"$ratios"$'\n\n'"$notes"
echo; echo "$table"
record "Composition (bench/compose.sh): GET /v1/users/1/dashboard, 3 parallel calls + reshape" "$table"
