#!/usr/bin/env bash
# Composition benchmark: Manifold's user dashboard (three parallel backend
# calls plus reshaping) vs a hand-written Node.js BFF (fastify + undici, one
# process per core, bench/peers/node-bff), same backends, same output, one run.
#
#   bench/compose.sh             # 5 s per target, 64 connections
#   RECORD=1 bench/compose.sh    # also append the table to bench/RESULTS.md
#
# Reports req/s, p50/p99 and peak RSS of each gateway, the ratio, and the
# p99 each adds over calling one backend directly at half Manifold's
# measured rate (hey, fixed rate). Needs wrk, hey, nginx (Debian) and
# node/npm (installed when missing); loopback ports 18101-18112 only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
USERS=18101 ORDERS=18102 REVIEWS=18103 NODE_PORT=18110 MANIFOLD_PORT=18111 ADMIN_PORT=18112

need wrk wrk
need hey hey
need nginx nginx-light
command -v node >/dev/null || need node nodejs
command -v npm >/dev/null || need npm npm
[ -d bench/peers/node-bff/node_modules ] || (cd bench/peers/node-bff && npm install --silent --no-audit --no-fund)
build_manifold

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
PORT=$NODE_PORT USERS_URL=http://127.0.0.1:$USERS ORDERS_URL=http://127.0.0.1:$ORDERS REVIEWS_URL=http://127.0.0.1:$REVIEWS \
  node bench/peers/node-bff/server.js > "$work/logs/node.log" 2>&1 &
node_pid=$!
pids+=($node_pid)

path=/v1/users/1/dashboard
wait_for "http://127.0.0.1:$USERS/users/1"
wait_for "http://127.0.0.1:$MANIFOLD_PORT$path"
wait_for "http://127.0.0.1:$NODE_PORT$path"
# Same work, same answer: the comparison is only fair if the bodies match.
a=$(curl -s "http://127.0.0.1:$MANIFOLD_PORT$path")
b=$(curl -s "http://127.0.0.1:$NODE_PORT$path")
if ! python3 -c 'import json, sys; sys.exit(json.loads(sys.argv[1]) != json.loads(sys.argv[2]))' "$a" "$b"; then echo "the two gateways answer differently:"; echo "manifold: $a"; echo "node:     $b"; exit 1; fi

echo "measuring: wrk -t$THREADS -c$CONNS -d$DURATION, one target at a time"
read -r node_rps node_p50 node_p99 node_err < <(wrk_run "http://127.0.0.1:$NODE_PORT$path")
read -r mf_rps mf_p50 mf_p99 mf_err < <(wrk_run "http://127.0.0.1:$MANIFOLD_PORT$path")
node_rss=$(peak_rss_mib "$node_pid" $(pgrep -P "$node_pid"))
mf_rss=$(peak_rss_mib "$manifold_pid")
ratio=$(awk -v a="$mf_rps" -v b="$node_rps" 'BEGIN { printf "%.2f", a / b }')

# Moderate load: half of Manifold's measured rate, through each gateway and
# straight to one backend; what a gateway adds is its p99 minus the backend's.
rate=$(awk -v r="$mf_rps" 'BEGIN { printf "%d", r / 2 }')
echo "measuring p99 at a fixed $rate req/s (hey)"
direct_p99=$(hey_p99 "http://127.0.0.1:$USERS/users/1" "$rate")
mf_mod_p99=$(hey_p99 "http://127.0.0.1:$MANIFOLD_PORT$path" "$rate")
node_mod_p99=$(hey_p99 "http://127.0.0.1:$NODE_PORT$path" "$rate")
added() { awk -v a="$1" -v b="$direct_p99" 'BEGIN { printf "%.2f", a - b }'; }

table="| gateway | req/s | p50 | p99 | peak RSS | p99 at $rate req/s | added over a direct backend call |
| --- | --- | --- | --- | --- | --- | --- |
| node BFF (fastify + undici, $(nproc) processes) | $node_rps | $node_p50 | $node_p99 | $node_rss MiB | ${node_mod_p99} ms | $(added "$node_mod_p99") ms |
| manifold | $mf_rps | $mf_p50 | $mf_p99 | $mf_rss MiB | ${mf_mod_p99} ms | $(added "$mf_mod_p99") ms |

manifold / node BFF: **${ratio}x** req/s (errors: manifold $mf_err, node $node_err); a direct backend call's p99 at that rate: ${direct_p99} ms"
echo; echo "$table"
record "Composition (bench/compose.sh): GET /v1/users/1/dashboard, 3 parallel calls + reshape" "$table"
