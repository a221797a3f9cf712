#!/usr/bin/env bash
# Builds the release binaries and the naive opamp-go server (bench/naive, from
# the Go module proxy), then runs the benchmarks: the plan micro-benchmark,
# and the fleet scenarios side by side, opamp-gitops serve and the naive
# server in turn against the same simulated fleet (each server and simulate
# as separate processes on 127.0.0.1). Arguments go to the fleet benchmark, e.g.
#   bench/run.sh --scenarios ws:1000,http:500 --window 10s
# It also builds ws_floor, a bare WebSocket server's CPU per message, run by
# hand: target/release/examples/ws_floor AGENTS WINDOW_S HEARTBEAT_S.
# Results are printed as Markdown tables; BENCHMARKS.md explains them.
set -euo pipefail
cd "$(dirname "$0")/.."
target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
cargo build --release --bin opamp-gitops --example fleet_bench --example plan_bench --example ws_floor
mkdir -p "$target/bench"
go -C bench/naive build -o "$target/bench/naive-opamp" .
"$target/release/examples/plan_bench"
echo
"$target/release/examples/fleet_bench" --bin "$target/release/opamp-gitops" --naive "$target/bench/naive-opamp" "$@"
