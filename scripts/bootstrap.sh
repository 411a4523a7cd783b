#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages, the virtualenv, fleetbus itself and
# the Apache Kafka jars. Safe to run again; it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

need_apt=()
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
    say "installing system packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

python3 - <<'PY' || { echo "fleetbus needs Python >= 3.11" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [[ ! -x .venv/bin/python ]]; then
    say "creating virtualenv .venv"
    python3 -m venv .venv
fi

# Reinstall when pyproject.toml or the set of modules changes (strict editable installs link
# each file, so a new module needs a reinstall to become importable).
stamp=".venv/.fleetbus-install-stamp"
# The rooms are the folders pyproject.toml maps to fleetbus.* packages (`package-dir`).
rooms=$(sed -n '/^\[tool.setuptools.package-dir\]/,/^\[/s/^"fleetbus\.[a-z_]*" = "\([a-z_]*\)"$/\1/p' pyproject.toml)
# shellcheck disable=SC2086 # one word per room
want=$( { cat pyproject.toml; find $rooms -name '*.py' | sort; } \
        | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    say "installing fleetbus and its dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev]" --config-settings editable_mode=strict
    echo "$want" > "$stamp"
fi

# prometheus + promtool (Debian package) and helm (built from the Go module proxy, cached).
./scripts/install-tools.sh

say "resolving Apache Kafka jars from Maven Central (cached in ~/.cache/fleetbus)"
.venv/bin/python -c 'from fleetbus.devtools.kafka import resolve_jars; v, p = resolve_jars(); print(f"Kafka {v}: {p}")'
