"""The public surface of fleetbus.bus is small, sorted and pinned."""

from __future__ import annotations

import fleetbus.bus


def test_all_is_sorted_and_importable() -> None:
    names = fleetbus.bus.__all__
    assert list(names) == sorted(names)
    for name in names:
        assert getattr(fleetbus.bus, name) is not None


def test_bus_imports_no_provider() -> None:
    import subprocess
    import sys

    code = (
        "import sys, fleetbus.bus, fleetbus.cli.main; "
        "print(any(m.startswith('fleetbus.providers') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
