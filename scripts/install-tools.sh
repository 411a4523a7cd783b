#!/usr/bin/env bash
# Installs the tools the observability and deployment tests need, idempotently and quietly when
# they are already there:
#   - prometheus + promtool: Debian package `prometheus` (apt)
#   - helm: built from the Go module proxy with `go install`, cached in ~/.cache/fleetbus/bin
# Versions: HELM_VERSION below (v3.22.0 builds with Go 1.26); Prometheus is whatever Debian
# ships (2.42 on bookworm). Prints the paths of the tools on its last line.
set -euo pipefail

HELM_VERSION="${FLEETBUS_HELM_VERSION:-v3.22.0}"
CACHE="${FLEETBUS_CACHE:-$HOME/.cache/fleetbus}"
BIN="$CACHE/bin"

say() { printf '\033[1m[install-tools]\033[0m %s\n' "$*" >&2; }

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        say "error: prometheus/promtool missing and apt-get not available"
        exit 1
    fi
    say "installing Debian package prometheus (prometheus, promtool)"
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    # --no-install-recommends: the package would otherwise pull the node exporter and friends.
    $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The Debian package starts a system Prometheus on :9090 where systemd runs; we only want
    # the binaries, and tests start their own on free ports.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi

helm_bin="$BIN/helm-$HELM_VERSION"
if [[ ! -x "$helm_bin" ]]; then
    if ! command -v go >/dev/null 2>&1; then
        for candidate in /usr/local/go/bin/go /usr/lib/go/bin/go; do
            [[ -x "$candidate" ]] && PATH="$(dirname "$candidate"):$PATH" && break
        done
    fi
    if ! command -v go >/dev/null 2>&1; then
        say "error: helm is built with Go (go install); no go toolchain found"
        exit 1
    fi
    say "building helm $HELM_VERSION from the Go module proxy with $(go version | cut -d' ' -f3) (a few minutes, once)"
    mkdir -p "$BIN"
    tmp_bin=$(mktemp -d)
    trap 'rm -rf "$tmp_bin"' EXIT
    GOBIN="$tmp_bin" GOFLAGS="-buildvcs=false" CGO_ENABLED=0 \
        go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    mv "$tmp_bin/helm" "$helm_bin"
fi
ln -sfn "helm-$HELM_VERSION" "$BIN/helm"

echo "promtool=$(command -v promtool) prometheus=$(command -v prometheus) helm=$BIN/helm"
