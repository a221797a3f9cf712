#!/usr/bin/env bash
# The highly available controller on this machine: a PostgreSQL of its own
# (initdb in a temp dir), three replicas (`serve --store`), and AGENTS
# simulated agents on each replica (one `simulate` process per replica).
# Prints, as a Markdown table: the time for every agent to connect (as the
# cluster's API counts them), the database's write rate and the replicas' CPU
# at idle over WINDOW seconds, commit to all APPLIED (one wave, no bake), and
# each replica's RSS. BENCHMARKS.md explains the figures.
#   bench/cluster.sh [AGENTS (default 19000)] [WINDOW (default 60)]
set -euo pipefail
cd "$(dirname "$0")/.."
per="${1:-19000}"
window="${2:-60}"
total=$((per * 3))
target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
cargo build --release --bin opamp-gitops
bin="$target/release/opamp-gitops"
work="$(mktemp -d)"
pids=()
pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$work"
    as_pg=(runuser -u postgres --)
fi
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    "${as_pg[@]}" "$pgbin/pg_ctl" -D "$work/pg" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.2f}')"; }

echo "PostgreSQL, three replicas, $per agents on each ($total in all)" >&2
port="$(free_port)"
"${as_pg[@]}" "$pgbin/initdb" -D "$work/pg" -U postgres --auth=trust -E UTF8 >/dev/null
"${as_pg[@]}" "$pgbin/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w \
    -o "-p $port -k $work -c listen_addresses=127.0.0.1" start >/dev/null
url="postgres://postgres@127.0.0.1:$port/postgres"
psql() { "$pgbin/psql" -X -A -t -h 127.0.0.1 -p "$port" -U postgres -c "$1"; }

repo="$work/repo"
mkdir -p "$repo/groups" "$repo/configs"
config() {
    printf '# %s\nreceivers:\n  otlp:\n    protocols:\n      grpc: {}\nexporters:\n  debug: {}\nservice:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [debug]\n' "$1"
}
printf 'rollout:\n  waves: [100%%]\n  bake: 0s\n  apply_timeout: 60s\n  max_failures: 0\nreconcile:\n  interval: 1h\n' >"$repo/fleet.yaml"
printf 'selector:\n  match_attributes:\n    service.name: otelcol-sim\nconfig:\n  "": configs/edge.yaml\n' >"$repo/groups/edge.yaml"
config v1 >"$repo/configs/edge.yaml"
git -C "$repo" init -q
git -C "$repo" -c user.name=bench -c user.email=bench@example.com add -A
git -C "$repo" -c user.name=bench -c user.email=bench@example.com commit -qm v1

apis=()
opamps=()
for i in 1 2 3; do
    opamp="127.0.0.1:$(free_port)"
    api="127.0.0.1:$(free_port)"
    RUST_LOG=warn "$bin" serve --repo "$repo" --state-dir "$work/r$i" --store "$url" --replica-id "r$i" \
        --opamp-listen "$opamp" --api-listen "$api" --startup-grace 0s --poll-interval 1h \
        --max-connections 19500 --max-connections-per-source 0 >"$work/r$i.log" 2>&1 &
    pids+=($!)
    opamps+=("$opamp")
    apis+=("$api")
done
replicas=("${pids[@]}")
api="${apis[0]}"
for a in "${apis[@]}"; do
    until curl -sf "http://$a/healthz" >/dev/null; do sleep 0.2; done
done

started="$(now)"
for opamp in "${opamps[@]}"; do
    "$bin" simulate --server "ws://$opamp/v1/opamp" --agents "$per" --heartbeat 30s --apply-delay 0s \
        >>"$work/simulate.log" 2>&1 &
    pids+=($!)
done
# Each replica counts its own agents.
connected() {
    local n=0 a
    for a in "${apis[@]}"; do
        n=$((n + $(curl -sf "http://$a/metrics" | awk '/^opamp_gitops_agents_connected\{transport="websocket"\}/ {print $2}')))
    done
    echo "$n"
}
until [ "$(connected)" -ge "$total" ]; do sleep 0.5; done
connect="$(since "$started")"
echo "connected in $connect s" >&2

# Waits until every agent runs the config of the repository's last commit.
applied() {
    local head
    head="$(git -C "$repo" rev-parse HEAD)"
    until curl -sf "http://$api/api/v1/groups" | jq -e --argjson n "$total" --arg c "$head" \
        '.groups[0] | .agents.applied == $n and .rollout.commit == $c' >/dev/null; do
        sleep 0.05
    done
}
applied
echo "v1 applied everywhere" >&2

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
wal() { psql "SELECT wal_bytes FROM pg_stat_wal"; }
rows() { psql "SELECT sum(tup_inserted + tup_updated + tup_deleted) FROM pg_stat_database"; }
commits() { psql "SELECT sum(xact_commit) FROM pg_stat_database"; }
sleep 5
w0="$(wal)" r0="$(rows)" c0="$(commits)"
cpu0=()
for pid in "${replicas[@]}"; do cpu0+=("$(cpu "$pid")"); done
sleep "$window"
w1="$(wal)" r1="$(rows)" c1="$(commits)"
idle_cpu=()
hz="$(getconf CLK_TCK)"
for n in 0 1 2; do
    idle_cpu+=("$(python3 -c "print(f'{($(cpu "${replicas[$n]}") - ${cpu0[$n]}) / $hz / $window * 100:.1f}')")")
done

config v2 >"$repo/configs/edge.yaml"
git -C "$repo" -c user.name=bench -c user.email=bench@example.com commit -qam v2
from="$(now)"
for a in "${apis[@]}"; do curl -sf -X POST "http://$a/api/v1/sync" >/dev/null; done
applied
rollout="$(since "$from")"

rss() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
echo
echo "| figure | value |"
echo "|---|---:|"
echo "| agents | $total ($per per replica) |"
echo "| all agents connected | $connect s |"
echo "| database at idle, rows written | $(python3 -c "print(f'{($r1 - $r0) / $window:.1f}')") per s |"
echo "| database at idle, transactions | $(python3 -c "print(f'{($c1 - $c0) / $window:.1f}')") per s |"
echo "| database at idle, WAL | $(python3 -c "print(f'{($w1 - $w0) / $window / 1024:.1f}')") KiB per s |"
echo "| replicas' CPU at idle (heartbeat 30 s) | ${idle_cpu[0]}%, ${idle_cpu[1]}%, ${idle_cpu[2]}% of a core |"
echo "| commit → all APPLIED | $rollout s |"
echo "| replicas' RSS | $(rss "${replicas[0]}"), $(rss "${replicas[1]}"), $(rss "${replicas[2]}") MiB |"
echo "| an agent's row (JSON, as stored) | $(psql "SELECT round(avg(pg_column_size(record))) FROM opamp_agents") bytes |"
echo "| leader | $(curl -sf "http://$api/api/v1/cluster" | jq -r .leader) |"
