#!/usr/bin/env bash
# The test command: set up everything, lint, type-check, then run the whole suite against real
# services (a Kafka broker the fixtures provision, a real KME over mTLS).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh

say() { printf '\033[1m[test]\033[0m %s\n' "$*" >&2; }
start=$(date +%s)

say "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
say "mypy --strict"
.venv/bin/mypy -p fleetbus.bus -p fleetbus.providers -p fleetbus.processors -p fleetbus.observability
say "pytest (unit, contract, integration against real Kafka and KME)"
status=0
.venv/bin/python -m pytest "$@" || status=$?
say "finished in $(( $(date +%s) - start ))s with exit code $status"
if pgrep -f 'kafka\.Kafka .*pytest-of-' >/dev/null 2>&1; then
    say "error: a Kafka broker is still running after the tests"
    status=1
fi
exit $status
