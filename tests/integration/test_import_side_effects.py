"""Importing the contract and the CLI loads no provider: checked in a fresh interpreter (a
subprocess), since the test session itself has imported everything by then."""

from __future__ import annotations


def test_bus_imports_no_provider() -> None:
    import subprocess
    import sys

    code = (
        "import sys, fleetbus.bus, fleetbus.cli.main; "
        "print(any(m.startswith('fleetbus.providers') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
