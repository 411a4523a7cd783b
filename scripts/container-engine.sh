#!/usr/bin/env bash
# A Docker engine, a compose CLI and the images docker-compose.yml names, on a machine that
# may have none of them and cannot reach public container registries.
#
#   scripts/container-engine.sh start   install what is missing, start dockerd if none answers,
#                                       build the base images that cannot be pulled
#   scripts/container-engine.sh stop    stop the dockerd this script started (and only that)
#   scripts/container-engine.sh status  say what answers
#
# Images that cannot be pulled are built here and tagged with the public names, so Dockerfile
# and docker-compose.yml stay unchanged for users who can pull:
#   fleetbus-local/debian:bookworm   debootstrap --variant=minbase bookworm + docker import
#   python:3.11-slim                 Debian's Python 3.11 on it (scripts/containers/python),
#                                    trusting the host's extra CAs (/usr/local/share/ca-certificates)
#   apache/kafka:4.1.1               the Maven Central Kafka jars on Debian's JRE 17
#                                    (scripts/containers/kafka)
# Each local image carries a label with the hash of its build inputs; it is rebuilt only when
# they change. The engine keeps images in /var/lib/docker, so later runs on the machine reuse
# them. dockerd runs with no bridge network and no iptables rules: every container here uses
# host networking and binds 127.0.0.1 (docs/deployment.md).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${FLEETBUS_CACHE:-$HOME/.cache/fleetbus}"
STATE="$CACHE/container-engine"
PIDFILE="$STATE/dockerd.pid"
KAFKA_VERSION="${FLEETBUS_KAFKA_IMAGE_VERSION:-4.1.1}"
DEBIAN_BASE="fleetbus-local/debian:bookworm"
LABEL="org.fleetbus.local-build"

say() { printf '\033[1m[container-engine]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

engine_answers() { docker info >/dev/null 2>&1; }

compose_cli() {
    if docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif command -v docker-compose >/dev/null 2>&1; then
        echo "docker-compose"
    fi
}

apt_install() {
    say "installing Debian packages: $*"
    export DEBIAN_FRONTEND=noninteractive
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_missing() {
    local need=()
    command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
    [[ -n "$(compose_cli)" ]] || need+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
    if ((${#need[@]})); then
        command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get"
        apt_install "${need[@]}"
    fi
}

start_engine() {
    if engine_answers; then
        say "a Docker engine already answers; using it"
        return
    fi
    [[ $(id -u) -eq 0 ]] || die "no Docker engine answers and starting dockerd needs root"
    mkdir -p "$STATE"
    say "starting dockerd (no bridge, no iptables; log: $STATE/dockerd.log)"
    # setsid: the engine outlives this script, and `stop` ends it by the pid recorded here.
    setsid dockerd --bridge=none --iptables=false --ip-masq=false \
        >>"$STATE/dockerd.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    local i
    for ((i = 0; i < 120; i++)); do
        engine_answers && { say "dockerd answers (pid $(cat "$PIDFILE"))"; return; }
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
        sleep 0.5
    done
    tail -n 20 "$STATE/dockerd.log" >&2 || true
    die "dockerd did not answer"
}

stop_engine() {
    [[ -f "$PIDFILE" ]] || { say "no dockerd started by this script"; return; }
    local pid
    pid=$(cat "$PIDFILE")
    # A stale pid file may name a process that reused the number: end only a dockerd.
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "dockerd" ]]; then
        say "stopping dockerd (pid $pid)"
        kill -TERM "$pid"
        local i
        for ((i = 0; i < 120; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -0 "$pid" 2>/dev/null && die "dockerd (pid $pid) did not stop"
    fi
    rm -f "$PIDFILE"
}

# Hash of a build context's files (names and contents) plus any extra words.
inputs_hash() {
    local dir=$1
    shift
    { (cd "$dir" && find . -type f ! -path './libs/*' -print0 | sort -z | xargs -0 sha256sum); echo "$*"; } \
        | sha256sum | cut -d' ' -f1
}

image_label() { docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true; }

# True when the image is there: built by us from these inputs, or pulled/built elsewhere.
have_image() {
    local image=$1 want=$2 got
    docker image inspect "$image" >/dev/null 2>&1 || return 1
    got=$(image_label "$image")
    [[ -z "$got" || "$got" == "$want" ]]
}

try_pull() {
    [[ "${FLEETBUS_LOCAL_IMAGES:-}" == "1" ]] && return 1
    say "pulling $1"
    timeout 60 docker pull -q "$1" >/dev/null 2>&1
}

build_debian_base() {
    local want="debootstrap-minbase-bookworm"
    have_image "$DEBIAN_BASE" "$want" && return
    local tarball="$STATE/debian-bookworm-minbase.tar"
    if [[ ! -s "$tarball" ]]; then
        local root
        root=$(mktemp -d)
        say "debootstrap --variant=minbase bookworm (about 30 s)"
        debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$STATE/debootstrap.log" 2>&1 \
            || { tail -n 20 "$STATE/debootstrap.log" >&2; rm -rf "$root"; die "debootstrap failed"; }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
    fi
    say "importing $DEBIAN_BASE"
    docker import -c "LABEL $LABEL=$want" -c 'CMD ["/bin/bash"]' "$tarball" "$DEBIAN_BASE" >/dev/null
}

# build_local IMAGE CONTEXT [extra hash words]: pull, else build from the local context.
build_local() {
    local image=$1 context=$2 want
    shift 2
    want=$(inputs_hash "$context" "$@")
    have_image "$image" "$want" && return
    try_pull "$image" && return
    build_debian_base
    say "building $image locally from $context"
    local log="$STATE/build-${image//[\/:]/-}.log"
    docker build --network host --label "$LABEL=$want" -t "$image" "$context" >"$log" 2>&1 \
        || { tail -n 30 "$log" >&2; die "building $image failed (log: $log)"; }
}

kafka_jars() {
    # The jars go into a build context of their own under the cache (they are not committed).
    local context="$STATE/kafka-$KAFKA_VERSION"
    if [[ ! -f "$context/libs/.complete" ]]; then
        command -v mvn >/dev/null 2>&1 || apt_install maven
        say "resolving Kafka $KAFKA_VERSION jars (broker and tools) from Maven Central"
        rm -rf "$context"
        mkdir -p "$context"
        mvn -B -q -Dstyle.color=never -f scripts/containers/kafka/pom.xml -Dkafka.version="$KAFKA_VERSION" \
            dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$context/libs.tmp" >&2
        mv "$context/libs.tmp" "$context/libs"
        touch "$context/libs/.complete"
    fi
    find "$context" -mindepth 1 -maxdepth 1 ! -name libs -exec rm -rf {} +
    cp -a scripts/containers/kafka/. "$context/"
    echo "$context"
}

python_context() {
    local context="$STATE/python"
    rm -rf "$context"
    mkdir -p "$context/extra-ca"
    cp -a scripts/containers/python/. "$context/"
    # Debian's pip uses the system store: the host's extra CAs let it through the same egress.
    find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' -exec cp {} "$context/extra-ca/" \; \
        2>/dev/null || true
    echo "$context"
}

build_images() {
    build_local python:3.11-slim "$(python_context)"
    local context
    if ! have_image "apache/kafka:$KAFKA_VERSION" "$(inputs_hash scripts/containers/kafka "$KAFKA_VERSION")"; then
        context=$(kafka_jars)
        build_local "apache/kafka:$KAFKA_VERSION" "$context" "$KAFKA_VERSION"
    fi
    say "images ready: python:3.11-slim apache/kafka:$KAFKA_VERSION"
}

case "${1:-start}" in
    start)
        install_missing
        start_engine
        build_images
        say "compose CLI: $(compose_cli)"
        ;;
    stop) stop_engine ;;
    status)
        if engine_answers; then say "engine answers; compose CLI: $(compose_cli)"; else say "no engine"; exit 1; fi
        ;;
    *) die "usage: $0 start|stop|status" ;;
esac
