#!/usr/bin/env bash
# Cluster rate limits on a three-node cluster (deploy/local-cluster.sh,
# database mode) sharing the real local Redis:
#
#   (a) exactness: a route with a `rate-limit` policy, `scope: cluster`,
#       LIMIT (1000) per hour, `by: header:x-client`, is sent REQUESTS (3000)
#       requests per x-client value, spread evenly over the three nodes, all
#       at once (hey, one process per node and value). Every value must be
#       admitted exactly LIMIT times, cluster-wide. KEYS (2) values are sent
#       together in one burst (buckets must not leak into each other), and
#       the burst is repeated REPEATS (3) times with new values.
#   (b) throughput: req/s of a route with a cluster limit that never refuses
#       (100,000,000 per minute, `by: route`) against the same route with no
#       policy, wrk on all three nodes at once (CONNS/3 connections each),
#       the two routes taking turns ROUNDS (3) times; the median round of
#       each is reported, and their ratio.
#
#   bench/cluster-limits.sh
#   RECORD=1 bench/cluster-limits.sh     # also append the tables to bench/RESULTS.md
#   NOTE="another build was running" RECORD=1 bench/cluster-limits.sh   # NOTE goes into the record
#   LIMIT=500 REQUESTS=5000 CONCURRENCY=32 bench/cluster-limits.sh
#   MANIFOLD_BIN=/abs/path/manifold bench/cluster-limits.sh   # that binary, not rebuilt
#
# Routes and policies are created through node 1's admin API (loopback: no
# token). The backend is nginx (static JSON). Needs hey, wrk, nginx
# (installed when missing), psql and the local Postgres (PG, default
# postgres://postgres@127.0.0.1:5432, trust auth; the database
# manifold_bench_cluster_limits is created and dropped), Redis at REDIS_URL
# (redis://127.0.0.1:6379; keys under a fresh prefix, deleted at the end);
# loopback ports 18500-18530. Exits 1 when a bucket was not exact. The
# cluster is stopped with SIGTERM and the database dropped however the
# script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
BASE_PORT=18500 BACKEND_PORT=18530
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
LIMIT=${LIMIT:-1000}
REQUESTS=${REQUESTS:-3000}
KEYS=${KEYS:-2}
REPEATS=${REPEATS:-3}
CONCURRENCY=${CONCURRENCY:-16}   # hey workers per process (one process per node and key)
ROUNDS=${ROUNDS:-3}

need hey hey
need wrk wrk
need nginx nginx-light
command -v psql >/dev/null || need psql postgresql-client
command -v redis-cli >/dev/null || need redis-cli redis-tools
redis-cli -u "$REDIS_URL" ping >/dev/null || { echo "Redis does not answer at $REDIS_URL"; exit 1; }
(( REQUESTS > LIMIT )) || { echo "REQUESTS ($REQUESTS) must exceed LIMIT ($LIMIT)"; exit 1; }
build_manifold
load_start=$(cut -d" " -f1 /proc/loadavg)   # the machine is shared: say how busy it was

printf '{"id":1,"name":"Ada Lovelace","email":"ada@example.com","tier":"gold"}' > "$work/www/user.json"
chmod -R a+rX "$work"
start_nginx backend "server { listen 127.0.0.1:$BACKEND_PORT reuseport; location / { root $work/www; default_type application/json; try_files /user.json =404; } }"
wait_for "http://127.0.0.1:$BACKEND_PORT/users/1"

start_cluster cluster-limits $BASE_PORT
admin=http://127.0.0.1:${node_admin[0]}

# post KIND JSON: creates an entity through node 1's admin API.
post() {
  local code
  code=$(curl -s -o "$work/post.out" -w '%{http_code}' -H 'content-type: application/json' --data-binary "$2" "$admin/$1")
  [[ $code == 201 ]] || { echo "POST /$1 answered $code: $(cat "$work/post.out")"; exit 1; }
}
upstream=http://127.0.0.1:$BACKEND_PORT
post policies '{"name": "exact", "type": "rate-limit", "config": {"limit": '"$LIMIT"', "window": "1h", "by": "header:x-client", "scope": "cluster"}}'
post policies '{"name": "never-full", "type": "rate-limit", "config": {"limit": 100000000, "window": "1m", "by": "route", "scope": "cluster"}}'
post routes '{"name": "exact", "path": "/exact/{id}", "upstream": "'"$upstream"'", "path_rewrite": "/users/{id}", "policies": ["exact"]}'
post routes '{"name": "plain", "path": "/plain/{id}", "upstream": "'"$upstream"'", "path_rewrite": "/users/{id}"}'
post routes '{"name": "limited", "path": "/limited/{id}", "upstream": "'"$upstream"'", "path_rewrite": "/users/{id}", "policies": ["never-full"]}'

# status_field NODE_INDEX FIELD: a number from that node's /status.
status_json() { curl -sf "http://127.0.0.1:${node_admin[$1]}/status"; }
fallbacks_total() {
  local i total=0 n
  for i in 0 1 2; do
    n=$(status_json "$i" | sed -n 's/.*"rate_limit_fallbacks":\([0-9]*\).*/\1/p')
    total=$(( total + ${n:-0} ))
  done
  echo "$total"
}
# Every node has the three routes and two policies, and reaches Redis.
for i in 0 1 2; do
  for _ in $(seq 1 100); do
    s=$(status_json "$i" || true)
    [[ $s == *'"routes":3'* && $s == *'"policies":2'* && $s == *'"reachable":true'* ]] && continue 2
    sleep 0.1
  done
  echo "node $((i + 1)) did not take the config (or does not reach Redis) within 10 s: $s"; exit 1
done
for i in 0 1 2; do
  for path in plain/1 limited/1; do
    curl -sf "http://127.0.0.1:${node_proxy[$i]}/$path" >/dev/null || { echo "node $((i + 1)) does not serve /$path"; exit 1; }
  done
done

# (a) Exactness. The window is a sliding one over hourly counters: a burst
# that straddles the top of the hour may rightly admit a little more than
# LIMIT (the previous hour's count starts to fade), so a burst does not
# start in the last minute of an hour (by Redis's clock, which the limiter
# uses).
redis_secs() { redis-cli -u "$REDIS_URL" time | head -n 1; }
into_hour=$(( $(redis_secs) % 3600 ))
if (( into_hour > 3600 - 60 )); then
  echo "waiting $(( 3600 - into_hour + 2 )) s for the next hour (a burst must not straddle the hourly counters)"
  sleep $(( 3600 - into_hour + 2 )) & pids+=($!)
  wait $!
fi
# shellcheck disable=SC2017 # rounds up to a multiple of CONCURRENCY on purpose
per_node=$(( (REQUESTS + 3 * CONCURRENCY - 1) / (3 * CONCURRENCY) * CONCURRENCY ))   # hey sends a multiple of -c
# hey_codes FILE: "admitted refused other errors" from hey's summary.
hey_codes() {
  awk '
    /^Status code distribution:/ { section = "codes"; next }
    /^Error distribution:/ { section = "errors"; next }
    section == "codes" && match($0, /\[[0-9]+\][ \t]+[0-9]+/) {
      split(substr($0, RSTART, RLENGTH), f, /[][ \t]+/)
      if (f[2] == 200) ok += f[3]; else if (f[2] == 429) refused += f[3]; else other += f[3]
      next
    }
    section == "errors" && match($0, /^[ \t]*\[[0-9]+\]/) { split(substr($0, RSTART, RLENGTH), f, /[][ \t]+/); errors += f[2]; next }
  END { printf "%d %d %d %d\n", ok, refused, other, errors }' "$1"
}
fallbacks_before=$(fallbacks_total)
exact_rows=() all_exact=1 bucket_values=()
echo "exactness: $KEYS x-client values at once, $((3 * per_node)) requests each ($per_node per node, hey -c $CONCURRENCY), limit $LIMIT per hour; $REPEATS times"
for r in $(seq 1 "$REPEATS"); do
  hey_pids=()
  for k in $(seq 1 "$KEYS"); do
    for i in 0 1 2; do
      hey -n "$per_node" -c "$CONCURRENCY" -H "x-client: $cluster_prefix-r$r-k$k" \
        "http://127.0.0.1:${node_proxy[$i]}/exact/1" > "$work/hey-$r-$k-$i.out" 2>&1 &
      hey_pids+=($!) pids+=($!)
    done
  done
  for p in "${hey_pids[@]}"; do wait "$p" || { echo "hey failed:"; cat "$work"/hey-"$r"-*.out; exit 1; }; done
  for k in $(seq 1 "$KEYS"); do
    admitted=0 refused=0 other=0 errors=0 by_node=()
    for i in 0 1 2; do
      read -r a b c d < <(hey_codes "$work/hey-$r-$k-$i.out")
      admitted=$((admitted + a)) refused=$((refused + b)) other=$((other + c)) errors=$((errors + d)) by_node+=("$a")
    done
    sent=$((admitted + refused + other + errors))
    if (( admitted == LIMIT && other == 0 && errors == 0 && sent == 3 * per_node )); then exact=yes; else exact="**no**" all_exact=0; fi
    exact_rows+=("| $r | $k | $sent | ${by_node[0]} / ${by_node[1]} / ${by_node[2]} | $admitted | $LIMIT | $refused | $other | $errors | $exact |")
    echo "  burst $r, value $k: $admitted admitted of $sent (nodes ${by_node[*]}), $refused refused, $other other statuses, $errors errors: exact $exact"
  done
done
fallbacks_exact=$(( $(fallbacks_total) - fallbacks_before ))
# What Redis counted: one hourly counter per bucket, each should read LIMIT.
mapfile -t bucket_keys < <(redis-cli -u "$REDIS_URL" --scan --pattern "$cluster_prefix:rl:exact:*")
for key in "${bucket_keys[@]}"; do bucket_values+=("$(redis-cli -u "$REDIS_URL" get "$key")"); done
redis_exact=$(printf '%s\n' "${bucket_values[@]}" | awk -v n="$LIMIT" '$1 == n {c++} END {print c + 0}')
(( ${#bucket_keys[@]} == REPEATS * KEYS && redis_exact == REPEATS * KEYS )) || all_exact=0
(( fallbacks_exact == 0 )) || all_exact=0

# (b) Throughput: the three nodes under wrk at once.
per_conns=$(( CONNS / 3 > 0 ? CONNS / 3 : 1 ))
to_ms() { awk -v v="$1" 'BEGIN { u = v; sub(/^[0-9.]+/, "", u); n = v + 0; if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000; printf "%.2f", n }'; }
# cluster_wrk PATH: wrk on every node at once (in the background, in
# `pids`, so that a signal stops them); sets wrk_line to "total_req/s
# worst_p50_ms worst_p99_ms errors".
cluster_wrk() {
  local path=$1 i wpids=()
  for i in 0 1 2; do wrk -t1 -c"$per_conns" -d2s "http://127.0.0.1:${node_proxy[$i]}$path" > /dev/null & wpids+=($!) pids+=($!); done
  for i in "${wpids[@]}"; do wait "$i"; done
  wpids=()
  for i in 0 1 2; do wrk -t1 -c"$per_conns" -d"$DURATION" --latency "http://127.0.0.1:${node_proxy[$i]}$path" > "$work/wrk-$i.out" & wpids+=($!) pids+=($!); done
  for i in "${wpids[@]}"; do wait "$i"; done
  local rps=0 p50=0 p99=0 errors=0 out v
  for i in 0 1 2; do
    out=$(cat "$work/wrk-$i.out")
    rps=$(awk -v a="$rps" -v b="$(awk '/Requests\/sec/ {print $2}' <<<"$out")" 'BEGIN { printf "%.2f", a + b }')
    v=$(to_ms "$(awk '$1=="50%" {print $2}' <<<"$out")"); p50=$(awk -v a="$p50" -v b="$v" 'BEGIN { print (b > a ? b : a) }')
    v=$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")"); p99=$(awk -v a="$p99" -v b="$v" 'BEGIN { print (b > a ? b : a) }')
    errors=$(( errors + $(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10} END {print n + 0}' <<<"$out") ))
  done
  wrk_line="$rps $p50 $p99 $errors"
}
echo "throughput: 3 x wrk -t1 -c$per_conns -d$DURATION (one per node), plain and limited taking turns, $ROUNDS rounds"
declare -A runs round_rps
round_ratios=()
evals() { redis-cli -u "$REDIS_URL" info commandstats | awk -F'[=,:]' '/^cmdstat_evalsha:/ {print $3}'; }
redis_pid=$(pgrep -o redis-server || true)
redis_cpu() { if [[ -n "$redis_pid" ]]; then awk '{print $14 + $15}' "/proc/$redis_pid/stat"; else echo 0; fi; }
fallbacks_before=$(fallbacks_total)
evals_before=$(evals) redis_cpu_before=$(redis_cpu)
for round in $(seq 1 "$ROUNDS"); do
  for route in plain limited; do
    cluster_wrk "/$route/1"
    echo "  round $round, $route: $wrk_line"
    runs[$route]+="$wrk_line"$'\n'
    round_rps[$route]=${wrk_line%% *}
  done
  round_ratios+=("$(awk -v a="${round_rps[limited]}" -v b="${round_rps[plain]}" 'BEGIN { printf "%.2f", a / b }')")
done
redis_cpu_after=$(redis_cpu) evals_after=$(evals)
fallbacks_throughput=$(( $(fallbacks_total) - fallbacks_before ))
median() { printf '%s' "${runs[$1]}" | sed '/^$/d' | sort -n -k1,1 | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2)'; }
read -r plain_rps plain_p50 plain_p99 plain_err < <(median plain)
read -r lim_rps lim_p50 lim_p99 lim_err < <(median limited)
ratio=$(awk -v a="$lim_rps" -v b="$plain_rps" 'BEGIN { printf "%.2f", a / b }')
median_round_ratio=$(printf '%s\n' "${round_ratios[@]}" | sort -n | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2)')

exact_word=$([[ $all_exact == 1 ]] && echo "**exact**" || echo "**NOT exact**")
table="| burst | x-client value | requests | admitted by node 1 / 2 / 3 | admitted | limit | refused (429) | other statuses | errors | exact |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
$(printf '%s\n' "${exact_rows[@]}")

Exactness: $exact_word. Limit $LIMIT per hour, \`scope: cluster\`, \`by: header:x-client\`; each burst sends $KEYS values at once, $per_node requests per value to each node (hey -c $CONCURRENCY, $((3 * KEYS)) processes). Redis's hourly counters: ${#bucket_keys[@]} buckets, $redis_exact at exactly $LIMIT; checks answered locally because Redis failed: $fallbacks_exact.

| route (3 nodes at once) | req/s, sum | p50, worst node | p99, worst node | errors |
| --- | --- | --- | --- | --- |
| no policies | $plain_rps | ${plain_p50}ms | ${plain_p99}ms | $plain_err |
| cluster rate limit (never full) | $lim_rps | ${lim_p50}ms | ${lim_p99}ms | $lim_err |

limited / plain: **${ratio}x** req/s (median rounds of each, $ROUNDS alternating rounds); each round's ratio: ${round_ratios[*]} (median ${median_round_ratio}x); checks answered locally because Redis failed: $fallbacks_throughput; Redis CPU over the throughput runs: $(awk -v t=$(( redis_cpu_after - redis_cpu_before )) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t / hz }') s, scripts run: $(( ${evals_after:-0} - ${evals_before:-0} )). Load average (1 min) at start: $load_start.${NOTE:+ $NOTE}"
echo; echo "$table"
record "Cluster rate limits (bench/cluster-limits.sh): 3 nodes (deploy/local-cluster.sh), one Redis" "$table" ", 3 × wrk -t1 -c$per_conns -d$DURATION (one per node)"
(( all_exact )) || { echo "a bucket was not exact (see above)"; exit 1; }
