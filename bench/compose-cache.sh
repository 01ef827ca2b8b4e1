#!/usr/bin/env bash
# Composition calls shared across requests (issue 15): a dashboard whose
# `products` call runs a for_each over 20 products of the user's orders,
# against a catalog backend, four ways in one run: one request per product
# (plain), `batch` (one request for the 20), `cache` (each product kept
# 60 s) and both. For each: catalog requests per client request (counted
# in the catalog's own access log over a fixed number of client requests),
# then req/s, p50 and p99 in alternating rounds; and the Node BFF of
# bench/compose.sh doing the same work, one request per product and with a
# small in-process cache (a Map per worker process, as a team would).
#
#   bench/compose-cache.sh            # 3 rounds, 2 s per target, 32 connections
#   RECORD=1 bench/compose-cache.sh   # also append the table to bench/RESULTS.md
#
# Needs wrk, hey, nginx and node/npm (Debian; installed when missing);
# loopback ports 18121-18126 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-2s} WARMUP=${WARMUP:-1s} CONNS=${CONNS:-32}
source bench/lib.sh
USERS=18121 ORDERS=18122 CATALOG=18123 MANIFOLD_PORT=18124 ADMIN_PORT=18125 NODE_PORT=18126
COUNTED=${COUNTED:-1024}  # a multiple of hey's 16 connections: hey sends n - n % c

need wrk wrk
need hey hey
need nginx nginx-light
command -v node >/dev/null || need node nodejs
command -v npm >/dev/null || need npm npm
[ -d bench/peers/node-bff/node_modules ] || (cd bench/peers/node-bff && npm install --silent --no-audit --no-fund)
build_manifold

# The user, their 20 order lines (products p-1..p-20), each product, and
# the catalog's batch answer (every product: the gateway matches by id).
printf '{"id":1,"name":"Ada Lovelace","tier":"gold"}' > "$work/www/user.json"
items=$(for i in $(seq 1 20); do printf '{"id":"o-%d","product_id":"p-%d"}' "$i" "$i"; done | sed 's/}{/},{/g')
printf '{"user_id":"1","items":[%s]}' "$items" > "$work/www/orders.json"
mkdir -p "$work/www/products"
all=
for i in $(seq 1 20); do
  p=$(printf '{"id":"p-%d","name":"product %d","price":%d.5,"stock":%d}' "$i" "$i" "$i" "$(( i * 3 ))")
  printf '%s' "$p" > "$work/www/products/p-$i"
  all+="${all:+,}$p"
done
printf '[%s]' "$all" > "$work/www/products-batch.json"
chmod -R a+rX "$work"
server() { echo "server { listen 127.0.0.1:$1 reuseport; location / { root $work/www; default_type application/json; try_files /$2 =404; } }"; }
# The catalog logs every request: the count of backend requests.
catalog="server { listen 127.0.0.1:$CATALOG reuseport; access_log $work/logs/catalog-access.log;
  location = /products { root $work/www; default_type application/json; try_files /products-batch.json =404; }
  location /products/ { root $work/www; default_type application/json; } }"
start_nginx backends "$(server $USERS user.json) $(server $ORDERS orders.json) $catalog"

products() { # products NAME EXTRA...: the for_each call, with extra fields
  local url="http://127.0.0.1:$CATALOG/products/{{item}}"
  [[ "$2" == *batch* ]] && url="http://127.0.0.1:$CATALOG/products?ids={{items}}"
  cat <<CONF
  - name: dashboard-$1
    path: /$1/users/{id}/dashboard
    timeout: 2s
    calls:
      user: { url: "http://127.0.0.1:$USERS/users/{{request.path.id}}" }
      orders: { url: "http://127.0.0.1:$ORDERS/orders?user={{request.path.id}}" }
      products: { for_each: "\$.orders.body.items[*].product_id", url: "$url", max_concurrency: 8$2 }
    response:
      body: { id: \$.user.body.id, name: \$.user.body.name, products: \$.products.body }
CONF
}
{
  echo "compositions:"
  products plain ""
  products batch ", batch: { size: 50, key: \$.id }"
  products cache ", cache: { ttl: 60s }"
  products batch-cache ", batch: { size: 50, key: \$.id }, cache: { ttl: 60s }"
} > "$work/config/bench.yaml"
start_manifold $MANIFOLD_PORT $ADMIN_PORT
mf_pid=$manifold_pid
env PORT=$NODE_PORT USERS_URL="http://127.0.0.1:$USERS" ORDERS_URL="http://127.0.0.1:$ORDERS" REVIEWS_URL="http://127.0.0.1:$ORDERS" \
  CATALOG_URL="http://127.0.0.1:$CATALOG" node bench/peers/node-bff/server.js > "$work/logs/node.log" 2>&1 &
node_bff_pid=$!
pids+=("$node_bff_pid")
wait_for "http://127.0.0.1:$USERS/users/1"
variants=(plain batch cache batch-cache node node-cache)
port_of() { case $1 in node*) echo $NODE_PORT ;; *) echo $MANIFOLD_PORT ;; esac; }
for v in "${variants[@]}"; do wait_for "http://127.0.0.1:$(port_of "$v")/$v/users/1/dashboard"; done

# Same answer every way: 20 products, in order, none null.
for v in "${variants[@]}"; do
  curl -s "http://127.0.0.1:$(port_of "$v")/$v/users/1/dashboard" > "$work/body.$v"
  python3 - "$work/body.$v" "$work/body.plain" <<'PY' || { echo "$v answers differently: $(cat "$work/body.$v")"; exit 1; }
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:3])
ps = a["products"]
sys.exit(not (a == b and len(ps) == 20 and all(p and p["id"] == f"p-{i + 1}" for i, p in enumerate(ps))))
PY
done
echo "same answer every way: 20 products in order"

# Catalog requests per client request, over COUNTED client requests each
# (16 at a time), the cache warm as it is after the check above.
declare -A per_request
for v in "${variants[@]}"; do
  before=$(wc -l < "$work/logs/catalog-access.log")
  hey -n "$COUNTED" -c 16 "http://127.0.0.1:$(port_of "$v")/$v/users/1/dashboard" > "$work/logs/hey-$v.log"
  after=$(wc -l < "$work/logs/catalog-access.log")
  per_request[$v]=$(awk -v d=$(( after - before )) -v n="$COUNTED" 'BEGIN { printf "%.2f", d / n }')
  echo "$v: $(( after - before )) catalog requests for $COUNTED client requests"
done

for v in "${variants[@]}"; do
  case $v in node*) pid=$node_bff_pid ;; *) pid=$mf_pid ;; esac
  add_target "$v" "http://127.0.0.1:$(port_of "$v")/$v/users/1/dashboard" "$pid"
done
run_rounds

describe() {
  case $1 in
    plain) echo "for_each, one request per product" ;;
    batch) echo "for_each + batch (size 50)" ;;
    cache) echo "for_each + cache (ttl 60s)" ;;
    batch-cache) echo "for_each + batch + cache" ;;
    node) echo "node BFF, one request per product" ;;
    node-cache) echo "node BFF, in-process cache (60 s)" ;;
  esac
}
table="| products call | catalog requests per client request | req/s | p50 | p99 | gateway CPU µs/request | errors |
| --- | --- | --- | --- | --- | --- | --- |"
for i in "${!target_name[@]}"; do
  table+=$'\n'"| $(describe "${target_name[i]}") | ${per_request[${target_name[i]}]} | $(target_cells "$i") | $(target_errors "$i") |"
done
ratios="| ratio (median of the per-round ratios) | req/s | CPU/request |
| --- | --- | --- |
$(ratio_row batch plain)
$(ratio_row cache plain)
$(ratio_row batch-cache plain)
$(ratio_row plain node)
$(ratio_row cache node-cache)
$(ratio_row batch-cache node-cache)"
notes="GET /VARIANT/users/1/dashboard: user and orders calls, then products, a for_each over the order's 20 product ids against one nginx catalog (static files: /products/ID, and /products?ids=... answering all 20). Catalog requests counted in its access log over $COUNTED client requests (hey -c 16) after one warm-up request (so the cache rows are warm: 0 means every product came from the node's store). Medians of $ROUNDS alternating rounds (wrk -t$THREADS -c$CONNS, $DURATION each after a $WARMUP warm-up). One gateway process serves the four compositions; CPU is its user+sys per request. The node BFF (bench/peers/node-bff, fastify + undici, one process per core): the same answer, 8 product requests at a time; its cache is a Map per worker process (so each process warms its own); CPU is its processes' user+sys."
table+=$'\n\n'"$ratios"$'\n\n'"$notes"
echo; echo "$table"
record "Composition calls shared across requests (bench/compose-cache.sh): a for_each over 20 products, with and without batch and cache" "$table"
