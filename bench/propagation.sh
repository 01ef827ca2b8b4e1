#!/usr/bin/env bash
# Propagation benchmark: a three-node cluster from deploy/local-cluster.sh
# (database mode, one Postgres database); a route is created through node
# 1's admin API, and the time until every node serves it is measured, COUNT
# (100) times. Prints p50, p99 and max (target: p99 < 500 ms).
#
#   bench/propagation.sh
#   RECORD=1 bench/propagation.sh    # also append to bench/RESULTS.md
#   COUNT=300 bench/propagation.sh
#   MANIFOLD_BIN=/abs/path/manifold bench/propagation.sh   # that binary, not rebuilt
#
# Needs the local Postgres (MANIFOLD_BENCH_DATABASE_URL, default
# postgres://postgres@127.0.0.1:5432, trust auth; the database
# manifold_bench_propagation is created and dropped), Redis at REDIS_URL
# (redis://127.0.0.1:6379, a fresh key prefix; empty: none) and python3;
# loopback ports 18300-18321. The cluster is stopped with SIGTERM and the
# database dropped however the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
PG=${MANIFOLD_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
COUNT=${COUNT:-100}

command -v python3 >/dev/null || need python3 python3
build_manifold
load_start=$(cut -d" " -f1 /proc/loadavg)   # the machine is shared: say how busy it was
start_cluster propagation 18300

# The backend every new route points at: the admin API of node 1 answers
# 200 on /status/ready, which is all a probe needs.
# (In the background, so that a signal stops it at once: see bench/lib.sh.)
COUNT=$COUNT PROXIES="${node_proxy[*]}" ADMIN="${node_admin[0]}" python3 - > "$work/result" <<'PY' &
import json, os, time, urllib.request, urllib.error
count = int(os.environ["COUNT"])
proxies = [f"http://127.0.0.1:{p}" for p in os.environ["PROXIES"].split()]
admin = f"http://127.0.0.1:{os.environ['ADMIN']}"
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
    route = {"name": f"r{n}", "path": f"/p{n}", "upstream": admin, "path_rewrite": "/status/ready"}
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
pids+=($!)
wait $!
read -r p50 p99 max < "$work/result"
met=$(awk -v p="$p99" 'BEGIN { print (p < 500 ? "yes" : "**no**") }')
table="| writes | p50 | p99 | max | target | met |
| --- | --- | --- | --- | --- | --- |
| $COUNT | $p50 ms | $p99 ms | $max ms | p99 < 500 ms | $met |

Time from sending the write to node 1 until all three nodes serve the new route (includes the write itself); nodes started by deploy/local-cluster.sh. Load average (1 min) at start: $load_start.${NOTE:+ $NOTE}"
echo; echo "$table"
record "Propagation (bench/propagation.sh): 3 nodes (deploy/local-cluster.sh), one Postgres" "$table" ""
