#!/usr/bin/env bash
# Footprint: the gateway's resident memory (RSS) idle, and while it holds
# 1,000 concurrent keep-alive client connections that have each made one
# request. Targets (issue 6): idle <= 20 MiB, 1,000 connections <= 64 MiB.
#
#   bench/footprint.sh
#   RECORD=1 bench/footprint.sh       # also append the table to bench/RESULTS.md
#   CONNECTIONS=2000 bench/footprint.sh
#   SKIP_BUILD=1 bench/footprint.sh   # measure ./target/release/manifold as it is
#   BURST=100 bench/footprint.sh       # first requests 100 at a time (default: all at once)
#   MIMALLOC_ARENA_EAGER_COMMIT=0 bench/footprint.sh   # as deploy/Dockerfile runs it
#
# Three fresh gateway processes, DB-less, default worker count (one per core):
#   1. idle: the shipped compositions/ config, IDLE_WAIT (3) s after it is ready;
#   2. CONNECTIONS keep-alive connections, each after one GET of the plain
#      route /api/users/1;
#   3. the same after one GET of the composition /v1/users/1/dashboard (three
#      backend calls each, so up to 3 x CONNECTIONS backend connections too).
# In 2 and 3 the config is compositions/ with the demo backends' addresses
# pointed at nginx (static JSON) and every timeout raised to 30 s (memory is
# measured, not latency: the burst must not end in 504s); the first requests are sent BURST at a
# time (default: all at once, the worst case), the answers are checked (200), RSS is read from /proc while all connections are open,
# then a second request on each connection proves they were still alive.
# "RSS" is VmRSS at that moment, "peak" is VmHWM (the high-water mark since
# start, which includes the first requests). The allocator's MIMALLOC_*
# settings are taken from the environment and printed with the table.
#
# Needs nginx (installed when missing) and python3; loopback ports 18410-18421.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
USERS=18411 ORDERS=18412 REVIEWS=18413 SELLERS=18414 MANIFOLD_PORT=18420 ADMIN_PORT=18421
CONNECTIONS=${CONNECTIONS:-1000}
IDLE_WAIT=${IDLE_WAIT:-3}
BURST=${BURST:-$CONNECTIONS}   # first requests in flight at once: default all of them

need nginx nginx-light
command -v python3 >/dev/null || need python3 python3
# Client sockets, the gateway's client and backend sockets, nginx's: all on
# this machine.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (( $(ulimit -n) < 4 * CONNECTIONS + 256 )); then
  echo "open-file limit $(ulimit -n) is too low for $CONNECTIONS connections"; exit 1
fi
[[ "${SKIP_BUILD:-0}" == 1 ]] || build_manifold

# kib PID FIELD: a /proc/PID/status field (VmRSS, VmHWM) in KiB.
kib() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
stop_manifold() { kill -TERM "$manifold_pid" 2>/dev/null || true; wait "$manifold_pid" 2>/dev/null || true; }

# 1. Idle, with the shipped config verbatim.
cp compositions/*.yaml "$work/config/"
start_manifold $MANIFOLD_PORT $ADMIN_PORT
wait_for "http://127.0.0.1:$ADMIN_PORT/status/ready"
sleep "$IDLE_WAIT"
idle_rss=$(kib "$manifold_pid" VmRSS)
idle_peak=$(peak_rss_mib "$manifold_pid")
threads=$(awk '$1 == "Threads:" {print $2}' "/proc/$manifold_pid/status")
stop_manifold

# Backends for 2 and 3: static JSON on four ports, the demo services' answers.
printf '{"id":1,"name":"Ada Lovelace","email":"ada@example.com","seller_id":10,"tier":"gold"}' > "$work/www/user.json"
printf '{"user_id":"1","items":[{"id":"o-1001","total":42.5,"status":"shipped","product_id":"p-1"},{"id":"o-1002","total":12.0,"status":"delivered","product_id":"p-2"},{"id":"o-1003","total":99.9,"status":"processing","product_id":"p-3"}]}' > "$work/www/orders.json"
printf '{"user_id":"1","items":[{"product_id":"p-1","stars":5,"text":"Exactly as described."},{"product_id":"p-2","stars":4,"text":"Good value."}],"average":4.5}' > "$work/www/reviews.json"
printf '{"id":10,"name":"Analytical Engines Ltd","country":"GB","rating":4.8}' > "$work/www/seller.json"
chmod -R a+rX "$work"
server() { echo "server { listen 127.0.0.1:$1 reuseport backlog=4096; location / { root $work/www; default_type application/json; try_files /$2 =404; } }"; }
start_nginx backends "$(server $USERS user.json) $(server $ORDERS orders.json) $(server $REVIEWS reviews.json) $(server $SELLERS seller.json)"
wait_for "http://127.0.0.1:$USERS/users/1"
for f in "$work"/config/*.yaml; do
  # Memory is measured here, not latency: timeouts long enough that every
  # call of the burst completes on a busy 2-core machine.
  sed -i -E -e "s/127\.0\.0\.1:9101/127.0.0.1:$USERS/g" -e "s/127\.0\.0\.1:9102/127.0.0.1:$ORDERS/g" -e "s/127\.0\.0\.1:9103/127.0.0.1:$REVIEWS/g" \
    -e "s/127\.0\.0\.1:9104/127.0.0.1:$SELLERS/g" \
    -e "s/timeout: [0-9]+(ms|s)/timeout: 30s/" "$f"
done

# hold PATH: writes "rss_kib hwm_kib first_ok second_ok" to $work/hold.out
# for CONNECTIONS connections to a fresh gateway, each after one GET of PATH.
# (Run in this shell, not a subshell: each gateway is stopped before the
# next one binds the same port.)
hold() {
  local path=$1
  start_manifold $MANIFOLD_PORT $ADMIN_PORT
  wait_for "http://127.0.0.1:$MANIFOLD_PORT$path"
  sleep 1
  PID=$manifold_pid PORT=$MANIFOLD_PORT URL_PATH=$path N=$CONNECTIONS BURST=$BURST python3 - > "$work/hold.out" <<'PY'
import asyncio, os, sys

pid, port, path, n = int(os.environ["PID"]), int(os.environ["PORT"]), os.environ["URL_PATH"], int(os.environ["N"])
burst = int(os.environ["BURST"])
request = f"GET {path} HTTP/1.1\r\nHost: footprint.test\r\nAccept: application/json\r\n\r\n".encode()

def status_kib(field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

async def exchange(reader, writer):
    """One request on a kept-alive connection; the answer's status, body read whole."""
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    if headers.get("connection", "").lower() == "close":
        return -1
    return status

async def main():
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(n)))
    gate = asyncio.Semaphore(burst)
    async def gated(r, w):
        async with gate:
            return await exchange(r, w)
    first = await asyncio.gather(*(gated(r, w) for r, w in conns), return_exceptions=True)
    await asyncio.sleep(2)           # every connection open and idle, kept alive
    rss, hwm = status_kib("VmRSS"), status_kib("VmHWM")
    second = await asyncio.gather(*(exchange(r, w) for r, w in conns), return_exceptions=True)
    for _, w in conns:
        w.close()
    ok = lambda rs: sum(1 for s in rs if s == 200)
    def counts(rs):
        c = {}
        for s in rs:
            k = str(s) if isinstance(s, int) else type(s).__name__
            c[k] = c.get(k, 0) + 1
        return ",".join(f"{k}:{v}" for k, v in sorted(c.items()))
    print(rss, hwm, ok(first), ok(second), counts(first), counts(second))

asyncio.run(main())
PY
  stop_manifold
}

echo "idle: $(mib "$idle_rss") MiB; holding $CONNECTIONS connections (plain route, then composition)"
hold /api/users/1
read -r plain_rss plain_hwm plain_ok plain_again plain_statuses plain_statuses2 < "$work/hold.out"
hold /v1/users/1/dashboard
read -r comp_rss comp_hwm comp_ok comp_again comp_statuses comp_statuses2 < "$work/hold.out"

alloc=$( { env | grep '^MIMALLOC_' || true; } | sort | tr '\n' ' ' | sed 's/ $//')
alloc=${alloc:-mimalloc defaults}
verdict() { awk -v v="$1" -v t="$2" 'BEGIN { print (v / 1024 <= t) ? "yes" : "**no**" }'; }
table="| state | RSS | peak RSS | target | met |
| --- | --- | --- | --- | --- |
| idle: DB-less, compositions/, ${IDLE_WAIT} s after ready | $(mib "$idle_rss") MiB | $idle_peak MiB | ≤ 20 MiB | $(verdict "$idle_rss" 20) |
| $CONNECTIONS keep-alive connections, each after GET /api/users/1 (plain route) | $(mib "$plain_rss") MiB | $(mib "$plain_hwm") MiB | ≤ 64 MiB | $(verdict "$plain_rss" 64) |
| $CONNECTIONS keep-alive connections, each after GET /v1/users/1/dashboard (composition, 3 calls) | $(mib "$comp_rss") MiB | $(mib "$comp_hwm") MiB | ≤ 64 MiB | $(verdict "$comp_rss" 64) |

One gateway process per row, $threads threads ($(nproc) proxy workers, one per core), allocator settings: ${alloc}; RSS read while every connection was open, peak is VmHWM including the first requests, $BURST at a time. Answers 200 on the first request of each connection: plain $plain_ok/$CONNECTIONS, composition $comp_ok/$CONNECTIONS; on a second request after the measurement (still kept alive): plain $plain_again/$CONNECTIONS, composition $comp_again/$CONNECTIONS."
echo; echo "$table"
if (( plain_ok != CONNECTIONS || comp_ok != CONNECTIONS || plain_again != CONNECTIONS || comp_again != CONNECTIONS )); then
  echo "some requests failed: the numbers above do not describe $CONNECTIONS live connections"
  echo "statuses (first request; second): plain $plain_statuses; $plain_statuses2, composition $comp_statuses; $comp_statuses2"
  tail -n 5 "$work/logs/manifold.log"; exit 1
fi
record "Footprint (bench/footprint.sh)" "$table" ""
