#!/usr/bin/env bash
# The demo command: set up everything, then run the fleetbus demo on a real local Kafka.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/fleetbus demo "$@"
