#!/usr/bin/env bash
# Builds the release binaries and runs the benchmarks: the fleet scenarios
# (serve and simulate as separate processes on 127.0.0.1) and the plan
# micro-benchmark. Arguments go to the fleet benchmark, e.g.
#   bench/run.sh --scenarios ws:1000,http:500 --window 10s
# Results are printed as Markdown tables; BENCHMARKS.md explains them.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --bin opamp-gitops --example fleet_bench --example plan_bench
"$target/release/examples/plan_bench"
echo
"$target/release/examples/fleet_bench" --bin "$target/release/opamp-gitops" "$@"
