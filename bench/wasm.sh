#!/usr/bin/env bash
# A wasm policy's cost (issue 17 item 5: target >= 0.9x): a route whose
# headers are changed by a proxy-wasm filter (fixtures/wasm/headers.wat)
# against the same route making the same changes with request-transform and
# response-transform, on one gateway process, in alternating rounds.
#
#   bench/wasm.sh                        # 5 rounds, 5 s per row, 64 connections
#   ROUNDS=3 bench/wasm.sh
#   RECORD=1 bench/wasm.sh               # also append the table to bench/RESULTS.md
#
# The changes, both ways: request + x-wasm: hello, - x-remove-me,
# + x-path, + x-method, + x-plugin; answer + x-wasm-response, + x-status.
# (The filter copies :path and :method; the transform takes them from its
# template context, which it builds for the request: each does it its own
# way, the work asked of it is the same.)
#
# Needs wrk, nginx and wat2wasm (wabt), installed when missing. Loopback
# ports 18300-18302; everything stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
ROUNDS=${ROUNDS:-5}
MANIFOLD_PORT=18300 BACKEND_PORT=18301 ADMIN_PORT=18302
TARGET_RATIO=0.9

need wrk wrk
need nginx nginx-light
need wat2wasm wabt
build_manifold

printf '{"id":1,"name":"Ada Lovelace","email":"ada@example.com","tier":"gold"}' > "$work/www/user.json"
chmod -R a+rX "$work"
start_nginx backend "server { listen 127.0.0.1:$BACKEND_PORT reuseport; location / { root $work/www; default_type application/json; try_files /user.json =404; } }"

mkdir -p "$work/config/plugins"
wat2wasm fixtures/wasm/headers.wat -o "$work/config/plugins/headers.wasm"
cat > "$work/config/bench.yaml" <<YAML
policies:
  - name: headers
    type: wasm
    config: { module: plugins/headers.wasm }
  - name: same-request
    type: request-transform
    config:
      remove: { headers: [x-remove-me] }
      add: { headers: { x-wasm: hello, x-path: "/{{request.path.rest}}", x-method: "{{request.method}}", x-plugin: headers } }
  - name: same-answer
    type: response-transform
    config:
      add: { headers: { x-wasm-response: "1", x-status: "200" } }
routes:
  - { name: wasm, path: "/wasm/{*rest}", upstream: "http://127.0.0.1:$BACKEND_PORT", policies: [headers] }
  - { name: transform, path: "/transform/{*rest}", upstream: "http://127.0.0.1:$BACKEND_PORT", policies: [same-request, same-answer] }
YAML
"$MANIFOLD_BIN" validate "$work/config" > "$work/logs/validate.log" 2>&1 \
  || { echo "manifold validate refused the config:"; cat "$work/logs/validate.log"; exit 1; }
start_manifold $MANIFOLD_PORT $ADMIN_PORT
mf_pid=$manifold_pid
wait_for "http://127.0.0.1:$BACKEND_PORT/users/1"
for p in wasm transform; do wait_for "http://127.0.0.1:$MANIFOLD_PORT/$p/users/1"; done
for p in wasm transform; do
  curl -sfi "http://127.0.0.1:$MANIFOLD_PORT/$p/users/1" | grep -qi '^x-wasm-response: 1' \
    || { echo "the $p route did not change the answer's headers"; cat "$work"/logs/*; exit 1; }
done

add_target "wasm" "http://127.0.0.1:$MANIFOLD_PORT/wasm/users/1" "$mf_pid"
add_target "transform" "http://127.0.0.1:$MANIFOLD_PORT/transform/users/1" "$mf_pid"
run_rounds

describe() {
  case $1 in
    wasm) echo "wasm policy (fixtures/wasm/headers.wat)" ;;
    transform) echo "request-transform + response-transform, same changes" ;;
  esac
}
table="| route | req/s | p50 | p99 | gateway CPU µs/request | errors |
| --- | --- | --- | --- | --- | --- |"
for i in "${!target_name[@]}"; do
  table+=$'\n'"| $(describe "${target_name[i]}") | $(target_cells "$i") | $(target_errors "$i") |"
done
a=$(target_index wasm) b=$(target_index transform)
r=$(ratio_median rps "$a" "$b")
ratios="| ratio (median of the per-round ratios) | req/s | CPU/request | target | met |
| --- | --- | --- | --- | --- |
$(printf '| wasm / transform | **%.2fx** | %.2fx | >= %sx | %s |' "$r" "$(ratio_median cpu "$a" "$b")" "$TARGET_RATIO" \
  "$(awk -v r="$r" -v t="$TARGET_RATIO" 'BEGIN { print (r >= t ? "yes" : "no") }')")"
notes="Medians of $ROUNDS alternating rounds (wrk -t$THREADS -c$CONNS, $DURATION each after a $WARMUP warm-up, the order rotated each round), both routes through the same gateway process and the same nginx backend. gateway CPU µs/request: user+sys CPU of the manifold process during the measured run divided by the requests wrk completed."
table+=$'\n\n'"$ratios"$'\n\n'"$notes"
echo; echo "$table"
record "wasm policy (bench/wasm.sh): a proxy-wasm header filter vs the same changes by transforms" "$table"
