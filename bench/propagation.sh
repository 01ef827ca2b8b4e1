#!/usr/bin/env bash
# Propagation benchmark: three nodes on one Postgres database; a route is
# created through node 1's admin API, and the time until every node serves
# it is measured, 100 times. Prints p50, p99 and max (target: p99 < 500 ms).
#
#   bench/propagation.sh
#   RECORD=1 bench/propagation.sh    # also append to bench/RESULTS.md
#   COUNT=300 bench/propagation.sh
#
# Needs the local Postgres (MANIFOLD_BENCH_DATABASE_URL, default
# postgres://postgres@127.0.0.1:5432) and python3; loopback ports 18300-18312.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
BASE=${MANIFOLD_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
DB=manifold_bench_propagation
COUNT=${COUNT:-100}

build_manifold
psql "$BASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
trap 'cleanup; psql "$BASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
MANIFOLD_DATABASE_URL="$BASE/$DB" ./target/release/manifold migrate >/dev/null

for i in 0 1 2; do
  MANIFOLD_LOG=warn MANIFOLD_DATABASE_URL="$BASE/$DB" ./target/release/manifold serve \
    --proxy-listen "127.0.0.1:1830$i" --admin-listen "127.0.0.1:1831$i" \
    --snapshot-path "$work/snap-$i.json" > "$work/logs/node-$i.log" 2>&1 &
  pids+=($!)
done
for i in 0 1 2; do wait_for "http://127.0.0.1:1831$i/status/ready"; done

# The backend every new route points at: the admin API of node 1 answers
# 200 on /status/ready, which is all a probe needs.
result=$(COUNT=$COUNT python3 - <<'PY'
import json, os, time, urllib.request, urllib.error
count = int(os.environ["COUNT"])
proxies = [f"http://127.0.0.1:1830{i}" for i in range(3)]
admin = "http://127.0.0.1:18310"
def status(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return 0
times = []
for n in range(count):
    route = {"name": f"r{n}", "path": f"/p{n}", "upstream": "http://127.0.0.1:18310", "path_rewrite": "/status/ready"}
    req = urllib.request.Request(f"{admin}/routes", data=json.dumps(route).encode(), headers={"content-type": "application/json"}, method="POST")
    start = time.perf_counter()
    urllib.request.urlopen(req, timeout=5).read()
    pending = set(proxies)
    while pending:
        for p in list(pending):
            if status(f"{p}/p{n}") == 200:
                pending.discard(p)
        if time.perf_counter() - start > 10:
            raise SystemExit(f"route {n} not everywhere after 10 s: {pending}")
    times.append((time.perf_counter() - start) * 1000)
times.sort()
pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
print(f"{pick(0.5):.1f} {pick(0.99):.1f} {times[-1]:.1f}")
PY
)
read -r p50 p99 max <<<"$result"
table="| writes | p50 | p99 | max | target |
| --- | --- | --- | --- | --- |
| $COUNT | $p50 ms | $p99 ms | $max ms | p99 < 500 ms |

Time from sending the write to node 1 until all three nodes serve the new route (includes the write itself)."
echo; echo "$table"
record "Propagation (bench/propagation.sh): 3 nodes, one Postgres" "$table" ""
