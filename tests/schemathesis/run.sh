#!/usr/bin/env bash
# The admin API fuzzed from its own /openapi.json with schemathesis (PyPI):
# a gateway in database mode (a database of its own, dropped afterwards),
# with an admin token; every operation gets EXAMPLES generated requests
# (valid and invalid ones). It fails on any 5xx answer, and on a 4xx whose
# body is not SPEC §5's {"message": ...} (hooks.py).
#
#   tests/schemathesis/run.sh [MANIFOLD_BIN]     # default target/debug/manifold
#   EXAMPLES=50 tests/schemathesis/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${1:-$root/target/debug/manifold}
examples=${EXAMPLES:-10}
venv=$root/target/schemathesis-venv
if [[ ! -x $venv/bin/st ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis>=4.32,<5"
fi
base=${MANIFOLD_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db=manifold_schemathesis_$$
server=${base%/*}
psql "$base" -qc "CREATE DATABASE $db" >/dev/null
work=$(mktemp -d)
pid=
cleanup() {
  [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  psql "$base" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
admin=$(port)
proxy=$(port)
token=schemathesis-token
export MANIFOLD_DATABASE_URL=$server/$db MANIFOLD_LOG=warn
"$bin" migrate >/dev/null
"$bin" serve --proxy-listen "127.0.0.1:$proxy" --admin-listen "127.0.0.1:$admin" --admin-token "$token" \
  --snapshot-path "$work/snapshot.json" >"$work/gateway.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$admin/status/ready" && break
  sleep 0.1
done
cd "$work"
status=0
SCHEMATHESIS_HOOKS=hooks PYTHONPATH=$here "$venv/bin/st" run "http://127.0.0.1:$admin/openapi.json" \
  -H "Authorization: Bearer $token" --max-examples "$examples" --seed 1 --workers 1 --no-shrink \
  --checks not_a_server_error,admin_error_shape --suppress-health-check all --warnings off || status=$?
if [[ $status -ne 0 ]]; then
  echo "--- the gateway's log:"
  tail -n 40 "$work/gateway.log"
fi
exit $status
