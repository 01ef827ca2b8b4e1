#!/usr/bin/env bash
# The strict request-head check's cost (issue 16 item 1: target ≤ 2% of
# plain-proxy throughput): the same source built twice, once as shipped and
# once with MANIFOLD_BASE_BIN=... set to a build whose connections hand every
# byte to hyper unchecked (MANIFOLD_BENCH_UNCHECKED_HEADS, see
# src/server/conn_io.rs), measured in alternating rounds by bench/proxy.sh:
# the "manifold" row is the checked build, "manifold (base)" the unchecked
# one. Only the manifold crate is rebuilt (cargo tracks the variable), twice.
#
#   bench/head-check.sh                  # proxy.sh's defaults (5 rounds)
#   ROUNDS=9 bench/head-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
unchecked_dir=$(mktemp -d)
trap 'rm -rf "$unchecked_dir"' EXIT
echo "building the unchecked comparison binary"
MANIFOLD_BENCH_UNCHECKED_HEADS=1 cargo build --release --quiet
cp target/release/manifold "$unchecked_dir/manifold-unchecked"
echo "rebuilding the shipped binary"
cargo build --release --quiet
MANIFOLD_BASE_BIN="$unchecked_dir/manifold-unchecked" bench/proxy.sh
