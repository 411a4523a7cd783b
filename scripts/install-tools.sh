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

# "-stamped": built with the version information helm's own Makefile links in (see below); an
# older unstamped build in the cache is left alone and no longer linked.
helm_bin="$BIN/helm-$HELM_VERSION-stamped"
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
    # `go install` alone links none of the -X variables helm's Makefile sets: `helm version`
    # then says nothing useful and the default Kubernetes version is v1.20.0, so `helm template`
    # without --kube-version refuses any chart requiring a newer one. Link the same values:
    # helm's version, and the Kubernetes minor of the client-go module it was built against.
    helm_mod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    k8s_minor=$(sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$helm_mod")
    if [[ -z "$k8s_minor" ]]; then
        say "error: no k8s.io/client-go version in $helm_mod"
        exit 1
    fi
    ldflags="-w -s -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
    done
    GOBIN="$tmp_bin" GOFLAGS="-buildvcs=false" CGO_ENABLED=0 \
        go install -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    mv "$tmp_bin/helm" "$helm_bin"
fi
ln -sfn "$(basename "$helm_bin")" "$BIN/helm"

echo "promtool=$(command -v promtool) prometheus=$(command -v prometheus) helm=$BIN/helm"
