#!/usr/bin/env bash
# The test command: set up everything, lint, type-check, then run the whole suite against real
# services (a Kafka broker the fixtures provision, a real KME over mTLS, a Docker engine from
# scripts/container-engine.sh for the image, compose and testcontainers tests).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh

say() { printf '\033[1m[test]\033[0m %s\n' "$*" >&2; }
start=$(date +%s)

say "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
say "mypy --strict"
.venv/bin/mypy -p fleetbus.bus -p fleetbus.sdk -p fleetbus.cli -p fleetbus.devtools -p fleetbus.kmesim -p fleetbus.providers -p fleetbus.processors -p fleetbus.observability
# A Docker engine and the base images for the container tests (the image, docker compose up,
# the testcontainers Kafka). Under CI a missing engine fails those tests; locally they skip.
say "container engine"
trap './scripts/container-engine.sh stop' EXIT
./scripts/container-engine.sh start || say "warning: no container engine; container tests skip"

say "pytest (unit, contract, integration against real Kafka and KME, containers)"
status=0
.venv/bin/python -m pytest "$@" || status=$?
say "finished in $(( $(date +%s) - start ))s with exit code $status"
if pgrep -f 'kafka\.Kafka .*pytest-of-' >/dev/null 2>&1; then
    say "error: a Kafka broker is still running after the tests"
    status=1
fi
# Every container a test starts is named fbtest* (compose projects too) and removed by its
# fixture; one still there is a leak, whatever runs in it.
if docker info >/dev/null 2>&1 && [[ -n "$(docker ps --all --quiet --filter name=fbtest)" ]]; then
    say "error: containers left after the tests:"
    docker ps --all --filter name=fbtest >&2
    status=1
fi
exit $status
