"""``python -m fleetbus.devtools.demo fleet SPEC.json``: the demo's simulated fleet process."""

from __future__ import annotations

import sys
from pathlib import Path

from fleetbus.devtools.demo.agents import run_fleet

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "fleet":
        sys.exit(run_fleet(Path(sys.argv[2])))
    sys.exit("usage: python -m fleetbus.devtools.demo fleet SPEC.json")
