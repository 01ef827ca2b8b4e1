#!/usr/bin/env bash
# Failover benchmark: a route over an upstream of three nginx backends under
# load; halfway through the run one backend (its nginx master and worker)
# is killed with SIGKILL. What the client sees: requests, non-2xx answers,
# socket errors, and the p99 latency around the kill against before it.
#
#   bench/failover.sh                         # 20 s per variant, 1 s slices, 64 connections
#   DURATION=10s bench/failover.sh            # quick
#   SLICE=2 DURATION=30s bench/failover.sh    # 2 s slices
#   RECORD=1 bench/failover.sh                # also append the tables to bench/RESULTS.md
#
# Variants, each on fresh backends and a fresh gateway process (so no state,
# pooled connection or ejection carries over), the same kill in each:
#   retries + passive health  retries: { max: 2, on: [connect, "502", "503", "504"], budget: 20% }
#                             health: { passive: { failures: 3, window: 10s, eject_for: 30s, max_ejected: 50% } }
#   passive health only       the same health, no retries
#   no retries                neither: what the kill costs without them
#   retries, budget 100%      (diagnostic, BUDGET_ROW=0 skips it; WIDE_BUDGET sets it) the same
#                             retries with a budget that never refuses: with one target of three
#                             dead and no ejection, about a third of the requests need a retry,
#                             more than a 20% budget admits, so the budget, not the retries,
#                             decides how many 502s the client gets; this row shows the difference
# When this build refuses `health` ("not built yet", detected with
# `manifold validate` and, failing that, by the gateway not starting), the
# script says "health checks not supported by this build: retries only",
# runs the first variant as "retries only" and skips the second.
#
# How the load is measured: DURATION is cut into back-to-back wrk runs of
# SLICE seconds each (wrk -t1 -c64 --latency --timeout 2s), one after the
# other with no pause, the kill sent SLICE/2 into the slice that starts at
# half the run. Each slice gives its own req/s, p99 and error counts, so the
# slice holding the kill shows its own p99 instead of having it averaged
# into 20 s of normal traffic (one long wrk run only gives the whole run's
# percentiles; wrk's Lua cannot time single requests; `hey -o csv` has
# per-request timings but drops failed requests from the CSV, so it would
# hide exactly the errors this measures). The costs of slicing, said
# plainly: each slice opens its 64 client connections afresh (to the
# gateway, on loopback: microseconds, and the gateway's pooled connections
# to the backends stay), and a request still in flight when a slice ends is
# in no slice's counts. The second is checked: the gateway's own count of
# 5xx answers on the route (its /metrics, read after each variant) is
# printed beside wrk's non-2xx sum, so an error that fell between slices
# would show as a difference. bash reports the backend it killed ("line N:
# PID Killed  setsid nginx ..."): that line is the kill, not a failure.
#
# Needs wrk and nginx (installed when missing), util-linux's setsid (each
# backend runs in its own process group, so one `kill -KILL -- -PGID` takes
# its master and worker at once). Loopback ports 18210-18229; everything
# stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-20s}
source bench/lib.sh
SLICE=${SLICE:-1}
BUDGET_ROW=${BUDGET_ROW:-1} WIDE_BUDGET=${WIDE_BUDGET:-100%}
SLICE=${SLICE%s}
total_s=${DURATION%s}
[[ "$total_s" =~ ^[0-9]+$ && "$SLICE" =~ ^[0-9]+$ && "$SLICE" -ge 1 ]] \
  || { echo "DURATION (whole seconds, e.g. 20s) and SLICE (whole seconds) must be integers; got DURATION=$DURATION SLICE=$SLICE"; exit 1; }
slices=$(( total_s / SLICE ))
(( slices >= 4 )) || { echo "DURATION=$DURATION gives $slices slices of ${SLICE}s; at least 4 are needed"; exit 1; }
kill_slice=$(( slices / 2 + 1 ))  # 1-based: the slice that starts at half the run
kill_after=$(awk -v s="$SLICE" 'BEGIN { printf "%.3f", s / 2 }')
url_path=/api/users/1

need wrk wrk
need nginx nginx-light
command -v setsid >/dev/null || { echo "setsid (util-linux) is needed"; exit 1; }
build_manifold

printf '{"id":1,"name":"Ada Lovelace","email":"ada@example.com","tier":"gold"}' > "$work/www/user.json"
chmod -R a+rX "$work"

# start_backend NAME PORT: nginx (one worker) in its own process group, the
# static JSON on every path. Sets backend_pgid (= the master's pid).
start_backend() {
  local name=$1 port=$2
  start_nginx "$name" "server { listen 127.0.0.1:$port reuseport; location / { root $work/www; default_type application/json; try_files /user.json =404; } }" 1 setsid
  backend_pgid=$nginx_pid
}

# kill_backend PGID: SIGKILL to the backend's whole process group (master and
# worker in one call: no worker is left holding the listening socket).
kill_backend() { kill -KILL -- "-$1" 2>/dev/null || true; }

# stop_pids PID...: SIGTERM, then wait for them (a variant's processes, so
# the next variant starts from nothing).
stop_pids() {
  local p
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

retries_yaml='retries: { max: 2, on: [connect, "502", "503", "504"], budget: 20% }'
wide_yaml="retries: { max: 2, on: [connect, \"502\", \"503\", \"504\"], budget: $WIDE_BUDGET }"
health_yaml='health: { passive: { failures: 3, window: 10s, eject_for: 30s, max_ejected: 50% } }'
# write_config DIR RETRIES HEALTH PORT1 PORT2 PORT3: the config (the upstream
# "pool" of the three ports and the route). RETRIES: 0 none, 1 retries_yaml,
# 2 wide_yaml; HEALTH: 1 health_yaml.
write_config() {
  local dir=$1 retries=$2 health=$3 p1=$4 p2=$5 p3=$6
  mkdir -p "$dir"
  {
    echo "upstreams:"
    echo "  - name: pool"
    echo "    targets: [{ url: \"http://127.0.0.1:$p1\" }, { url: \"http://127.0.0.1:$p2\" }, { url: \"http://127.0.0.1:$p3\" }]"
    (( retries == 1 )) && echo "    $retries_yaml"
    (( retries == 2 )) && echo "    $wide_yaml"
    (( health )) && echo "    $health_yaml"
    echo "routes:"
    echo "  - { name: failover, path: \"/api/users/{*rest}\", upstream: pool, timeout: 5s }"
  } > "$dir/bench.yaml"
}

# Does this build take `health`? manifold validate says so before any load.
health_supported=1
write_config "$work/probe" 1 1 18210 18211 18212
if ! "$MANIFOLD_BIN" validate "$work/probe" > "$work/logs/validate-health.log" 2>&1; then
  if grep -qi 'not built yet' "$work/logs/validate-health.log"; then
    health_supported=0
  else
    echo "manifold validate refused the config:"; cat "$work/logs/validate-health.log"; exit 1
  fi
fi
(( health_supported )) || echo "health checks not supported by this build: retries only (manifold validate: $( (grep -m1 -i 'health' "$work/logs/validate-health.log" || head -n1 "$work/logs/validate-health.log") | sed 's/^[^ ]*: //'))"

# parse_wrk: "req/s p99_ms requests non2xx connect read write timeout" from wrk --latency output.
parse_wrk() {
  awk '
    function ms(v, n) { n = v + 0; if (v ~ /us$/) return n / 1000; if (v ~ /ms$/) return n; if (v ~ /m$/) return n * 60000; if (v ~ /s$/) return n * 1000; return n }
    /Requests\/sec/ { rps = $2 }
    $1 == "99%" { p99 = ms($2) }
    / requests in / { n = $1 }
    /Non-2xx or 3xx responses/ { non = $NF }
    /Socket errors/ { gsub(/,/, ""); c = $4; r = $6; w = $8; t = $10 }
    END { printf "%.0f %.3f %d %d %d %d %d %d\n", rps, p99, n, non, c, r, w, t }'
}

# metric_sum FILE NAME FILTER: the sum of the samples of metric NAME whose
# labels match the regex FILTER.
metric_sum() {
  awk -v name="$2" -v filter="$3" '$1 ~ "^" name "({|$)" && $1 ~ filter { s += $NF } END { printf "%d", s }' "$1"
}

# run_variant LABEL RETRIES HEALTH BASE_PORT: three backends on BASE..BASE+2,
# the gateway on BASE+3 (admin BASE+4), a warm-up, then the slices with the
# kill of the first backend. Fills the summary and slice tables. When the
# gateway refuses `health` at start (a build whose validate let it through),
# sets refused_health=1 and returns without measuring.
summary_rows='' window_rows='' detail=''
run_variant() {
  local label=$1 retries=$2 health=$3 base=$4
  local p1=$base p2=$(( base + 1 )) p3=$(( base + 2 )) port=$(( base + 3 )) admin=$(( base + 4 ))
  local dir=$work/config-$base b1 b2 b3 mf i line rps p99 n non c r w t killer=''
  local -a s_rps=() s_p99=() s_n=() s_non=() s_sock=()
  echo
  echo "== $label: backends :$p1 :$p2 :$p3, gateway :$port; $slices slices of ${SLICE}s, SIGKILL to :$p1 ${kill_after}s into slice $kill_slice"
  start_backend "b$p1" "$p1"; b1=$backend_pgid
  start_backend "b$p2" "$p2"; b2=$backend_pgid
  start_backend "b$p3" "$p3"; b3=$backend_pgid
  write_config "$dir" "$retries" "$health" "$p1" "$p2" "$p3"
  start_manifold "$port" "$admin" "$MANIFOLD_BIN" "$dir" "manifold-$base"
  mf=$manifold_pid
  for i in "$p1" "$p2" "$p3"; do wait_for "http://127.0.0.1:$i$url_path"; done
  for _ in $(seq 1 100); do
    kill -0 "$mf" 2>/dev/null || break
    curl -sf -o /dev/null "http://127.0.0.1:$port$url_path" && break
    sleep 0.1
  done
  if ! kill -0 "$mf" 2>/dev/null; then
    if (( health )) && grep -qi 'not built yet' "$work/logs/manifold-$base.log"; then
      echo "the gateway refused health at start: $(grep -m1 -i 'not built yet' "$work/logs/manifold-$base.log")"
      stop_pids "$b1" "$b2" "$b3"
      refused_health=1
      return 0
    fi
    echo "the gateway exited:"; tail -n 20 "$work/logs/manifold-$base.log"; exit 1
  fi
  wait_for "http://127.0.0.1:$port$url_path"
  wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" "http://127.0.0.1:$port$url_path" >/dev/null
  local t0 t_kill=''
  t0=$(date +%s.%N)
  printf '%-6s %-8s %9s %9s %8s %8s %s\n' slice start req/s p99 requests non-2xx "socket errors (connect/read/write/timeout)"
  for (( i = 1; i <= slices; i++ )); do
    if (( i == kill_slice )); then
      ( sleep "$kill_after"; kill_backend "$b1"; date +%s.%N > "$work/kill-$base" ) &
      killer=$!
    fi
    local s_start
    s_start=$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { printf "%.2f", a - b }')
    line=$(wrk -t"$THREADS" -c"$CONNS" -d"${SLICE}s" --timeout 2s --latency "http://127.0.0.1:$port$url_path" | parse_wrk)
    read -r rps p99 n non c r w t <<<"$line"
    if [[ -n "$killer" ]]; then wait "$killer" || true; killer=''; t_kill=$(awk -v a="$(cat "$work/kill-$base")" -v b="$t0" 'BEGIN { printf "%.2f", a - b }'); fi
    s_rps+=("$rps") s_p99+=("$p99") s_n+=("$n") s_non+=("$non") s_sock+=("$c/$r/$w/$t")
    printf '%-6s %-8s %9s %7.2fms %8s %8s %s%s\n' "$i" "${s_start}s" "$rps" "$p99" "$n" "$non" "$c/$r/$w/$t" "$( (( i == kill_slice )) && echo "   <- SIGKILL :$p1 at ${t_kill}s")"
  done
  kill -0 "$mf" 2>/dev/null || { echo "the gateway died during the run:"; tail -n 20 "$work/logs/manifold-$base.log"; exit 1; }
  # What the gateway counted (its view of the same run, warm-up included).
  curl -sf "http://127.0.0.1:$admin/metrics" > "$work/metrics-$base" || : > "$work/metrics-$base"
  stop_pids "$mf" "$b2" "$b3"
  # The pool's numbers: sums over the slices; p99 before the kill = median of
  # the slices before it; the kill slice's and the next slice's own p99.
  local tot_n=0 tot_non=0 tot_c=0 tot_r=0 tot_w=0 tot_t=0 sc sr sw st
  for (( i = 0; i < slices; i++ )); do
    IFS=/ read -r sc sr sw st <<<"${s_sock[i]}"
    tot_n=$(( tot_n + s_n[i] )) tot_non=$(( tot_non + s_non[i] ))
    tot_c=$(( tot_c + sc )) tot_r=$(( tot_r + sr )) tot_w=$(( tot_w + sw )) tot_t=$(( tot_t + st ))
  done
  local before_p99 before_rps after_non=0 k=$(( kill_slice - 1 ))
  before_p99=$(printf '%s\n' "${s_p99[@]:0:k}" | median_of_lines)
  before_rps=$(printf '%s\n' "${s_rps[@]:0:k}" | median_of_lines)
  for (( i = k + 1; i < slices; i++ )); do after_non=$(( after_non + s_non[i] )); done
  local next_p99=nan
  (( k + 1 < slices )) && next_p99=${s_p99[k+1]}
  local gw_5xx fail_connect fail_closed fail_other retr refused warns
  gw_5xx=$(metric_sum "$work/metrics-$base" 'manifold_requests_total' '5xx')
  fail_connect=$(metric_sum "$work/metrics-$base" 'manifold_upstream_failures_total' 'cause="connect"')
  fail_closed=$(metric_sum "$work/metrics-$base" 'manifold_upstream_failures_total' 'cause="closed"')
  fail_other=$(( $(metric_sum "$work/metrics-$base" 'manifold_upstream_failures_total' '') - fail_connect - fail_closed ))
  retr=$(metric_sum "$work/metrics-$base" 'manifold_upstream_retries_total' '')
  refused=$(metric_sum "$work/metrics-$base" 'manifold_upstream_retries_refused_total' '')
  warns=$(grep -c -i 'warn' "$work/logs/manifold-$base.log" || true)
  summary_rows+=$'\n'"$(printf '| %s | %d | %d | %d/%d/%d/%d | %s | %.2fms | %.2fms | %sms | %d | %s |' \
    "$label" "$tot_n" "$tot_non" "$tot_c" "$tot_r" "$tot_w" "$tot_t" "$before_rps" "$before_p99" "${s_p99[k]}" \
    "$( [[ $next_p99 == nan ]] && echo nan || printf '%.2f' "$next_p99")" "$after_non" "${s_non[k]} (req/s ${s_rps[k]})")"
  for (( i = k - 2; i <= k + 3 && i < slices; i++ )); do
    (( i >= 0 )) || continue
    window_rows+=$'\n'"| $label | $(( i + 1 ))$( (( i == k )) && echo " (kill)") | ${s_rps[i]} | $(printf '%.2f' "${s_p99[i]}")ms | ${s_n[i]} | ${s_non[i]} | ${s_sock[i]} |"
  done
  detail+=$'\n'"- $label: the gateway counted $gw_5xx 5xx answers (wrk: $tot_non non-2xx over the slices); upstream failures: connect $fail_connect, closed $fail_closed, other $fail_other; retries sent $retr, refused by the budget $refused; $warns warn lines in its log$( [[ -n "$t_kill" ]] && echo "; SIGKILL at ${t_kill}s")."
  echo "gateway: $gw_5xx 5xx answers counted (wrk: $tot_non non-2xx); upstream failures connect=$fail_connect closed=$fail_closed other=$fail_other; retries=$retr refused=$refused; log: $warns warn lines"
  grep -m3 -i 'warn' "$work/logs/manifold-$base.log" | cut -c1-300 | sed 's/^/  log: /' || true
  grep -E '^manifold_upstream_(failures|retries|retries_refused)_total' "$work/metrics-$base" | sed 's/^/  metric: /' || true
}

refused_health=0
if (( health_supported )); then
  run_variant "retries + passive health" 1 1 18210
  if (( refused_health )); then
    health_supported=0
    echo "health checks not supported by this build: retries only"
  fi
fi
if (( ! health_supported )); then run_variant "retries only" 1 0 18210; fi
(( health_supported )) && run_variant "passive health, no retries" 0 1 18215
run_variant "no retries" 0 0 18220
(( BUDGET_ROW )) && run_variant "retries, budget $WIDE_BUDGET, no health (diagnostic)" 2 0 18225

table="| variant | requests | non-2xx | socket errors (c/r/w/t) | req/s before | p99 before | p99 kill slice | p99 next slice | non-2xx after the kill slice | non-2xx in the kill slice |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |$summary_rows"
window="| variant | slice | req/s | p99 | requests | non-2xx | socket errors (c/r/w/t) |
| --- | --- | --- | --- | --- | --- | --- |$window_rows"
notes="Each variant: three nginx backends (one worker each, own process group) behind one fresh gateway process, wrk -t$THREADS -c$CONNS after a $WARMUP warm-up, then $slices back-to-back ${SLICE}s wrk slices (--timeout 2s); SIGKILL to the first backend's master and worker ${kill_after}s into slice $kill_slice. p99 before: the median of the slices before the kill slice. Socket errors: wrk's connect/read/write/timeout counts (client to gateway). retries: \`$retries_yaml\`; health: \`$health_yaml\`."
(( BUDGET_ROW )) && notes+=" The diagnostic row: \`$wide_yaml\`, to tell the budget's refusals from what retries can do."
(( health_supported )) || notes+=" Health checks not supported by this build ($("$MANIFOLD_BIN" --version 2>/dev/null || echo "$MANIFOLD_BIN")): retries only."
out="$table"$'\n\n'"Slices around the kill:"$'\n\n'"$window"$'\n\n'"The gateway's own counts (/metrics, warm-up included):$detail"$'\n\n'"$notes"
echo; echo "$out"
record "Failover (bench/failover.sh): SIGKILL of one of 3 targets under load" "$out" ", wrk -t$THREADS -c$CONNS, ${SLICE}s slices over $DURATION"
