#!/usr/bin/env bash
# Builds the pinned OpAMP supervisor and a small OpenTelemetry Collector
# distribution into interop/bin/:
#
#   interop/bin/opampsupervisor  the supervisor, pinned by interop/supervisor/go.mod + go.sum
#   interop/bin/builder          the OpenTelemetry Collector Builder (ocb), BUILDER_VERSION
#   interop/bin/otelcol          the collector described by interop/otelcol-builder.yaml
#
# Needs Go >= 1.25 and the Go module proxy, nothing else. Modules and compiled
# packages go to Go's usual caches (go env GOMODCACHE / GOCACHE), so a second
# run is quick; a binary that is newer than all of its inputs is not rebuilt at
# all. FORCE=1 interop/build.sh (or --force) rebuilds everything.
set -euo pipefail

# Keep in step with the versions in otelcol-builder.yaml: the builder refuses a
# manifest whose collector core release differs from its own.
BUILDER_VERSION=v0.149.0
SUPERVISOR_MODULE=github.com/open-telemetry/opentelemetry-collector-contrib/cmd/opampsupervisor

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="$HERE/bin"
BUILD="$HERE/build"
FORCE="${FORCE:-0}"
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h | --help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

# Never download a Go toolchain: use the go on PATH (the modules need >= 1.25).
export GOTOOLCHAIN=local
# The builder's generated module lives inside this git work tree; do not stamp
# VCS information into the binaries (it needs git and differs per checkout).
export GOFLAGS=-buildvcs=false
# Go builds run at low priority so they do not starve other work on the machine.
GO=(nice -n 10 go)

start=$SECONDS
step() { printf '==> [%4ss] %s\n' "$((SECONDS - start))" "$*"; }

# up_to_date TARGET INPUT...: TARGET exists and is newer than every INPUT.
up_to_date() {
  local target=$1 input
  shift
  [[ $FORCE == 1 || ! -x $target ]] && return 1
  for input in "$@"; do
    [[ $input -nt $target ]] && return 1
  done
  return 0
}

command -v go >/dev/null || { echo "build.sh: go is not on PATH (Go >= 1.25 is needed)" >&2; exit 1; }
step "using $(go version) (GOMODCACHE=$(go env GOMODCACHE), GOCACHE=$(go env GOCACHE))"
mkdir -p "$BIN" "$BUILD"

# --- OpAMP supervisor -------------------------------------------------------
# Its go.mod has replace directives, so `go install …@version` refuses it. It is
# a `tool` of the module in interop/supervisor instead: building its package
# from there ignores those directives and takes every version from our go.sum.
supervisor_inputs=("$HERE/supervisor/go.mod" "$HERE/supervisor/go.sum" "${BASH_SOURCE[0]}")
if up_to_date "$BIN/opampsupervisor" "${supervisor_inputs[@]}"; then
  step "opampsupervisor is up to date ($BIN/opampsupervisor)"
else
  sup_version="$(cd "$HERE/supervisor" && go list -m -f '{{.Version}}' "$SUPERVISOR_MODULE")"
  step "opampsupervisor $sup_version: downloading modules (those go.mod lists)"
  (cd "$HERE/supervisor" && "${GO[@]}" mod download)
  step "opampsupervisor $sup_version: compiling"
  (cd "$HERE/supervisor" &&
    "${GO[@]}" build -trimpath -ldflags='-s -w' -o "$BIN/opampsupervisor.new" "$SUPERVISOR_MODULE")
  mv -f "$BIN/opampsupervisor.new" "$BIN/opampsupervisor"
  step "opampsupervisor $sup_version: built $BIN/opampsupervisor"
fi

# --- OpenTelemetry Collector Builder ------------------------------------------
builder_version() { go version -m "$BIN/builder" 2>/dev/null | awk '$1 == "mod" { print $3 }'; }
if [[ $FORCE != 1 && -x $BIN/builder && "$(builder_version)" == "$BUILDER_VERSION" ]]; then
  step "builder $BUILDER_VERSION is up to date ($BIN/builder)"
else
  step "builder $BUILDER_VERSION: installing"
  GOBIN="$BIN" "${GO[@]}" install -trimpath "go.opentelemetry.io/collector/cmd/builder@$BUILDER_VERSION"
  step "builder $BUILDER_VERSION: installed $BIN/builder"
fi

# --- collector distribution ---------------------------------------------------
otelcol_inputs=("$HERE/otelcol-builder.yaml" "$BIN/builder" "${BASH_SOURCE[0]}")
if up_to_date "$BIN/otelcol" "${otelcol_inputs[@]}"; then
  step "otelcol is up to date ($BIN/otelcol)"
else
  step "otelcol: generating sources in $BUILD/otelcol, downloading modules and compiling (the first time takes minutes)"
  # The builder writes the sources to dist::output_path (./build/otelcol,
  # relative to interop/), then runs `go mod tidy`, `go mod download` and
  # `go build -trimpath -ldflags='-s -w'` there; nice and GOFLAGS pass on to them.
  rm -rf "$BUILD/otelcol"
  (cd "$HERE" && nice -n 10 "$BIN/builder" --config otelcol-builder.yaml)
  install -m 0755 "$BUILD/otelcol/otelcol" "$BIN/otelcol"
  step "otelcol: built $BIN/otelcol"
fi

"$BIN/otelcol" --version | sed 's/^/    /'
step "done: $(cd "$BIN" && ls opampsupervisor builder otelcol | tr '\n' ' ')"
