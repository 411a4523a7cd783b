"""The public surface of fleetbus.sdk is sorted, pinned, and what docs/sdk.md imports; the
agent's transport and codec seams work with the in-memory transport shipped in the package."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import fleetbus.sdk

ROOT = Path(__file__).resolve().parents[2]


def test_all_is_sorted_pinned_and_exactly_what_the_package_exports() -> None:
    names = fleetbus.sdk.__all__
    assert list(names) == sorted(names)
    exported = {
        name
        for name, value in vars(fleetbus.sdk).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    } - {"annotations", "import_module", "Any"}
    lazy = set(fleetbus.sdk._FROM_PROVIDERS)
    assert exported | lazy == set(names)
    for name in names:
        assert getattr(fleetbus.sdk, name) is not None


def test_importing_the_sdk_loads_no_provider() -> None:
    code = (
        "import sys, fleetbus.sdk; "
        "print(any(m.startswith('fleetbus.providers') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_docs_sdk_imports_only_from_the_package_root_and_only_public_names() -> None:
    text = (ROOT / "docs" / "sdk.md").read_text()
    imports = re.findall(r"^\s*from (fleetbus[\w.]*) import", text, flags=re.MULTILINE)
    assert imports, "docs/sdk.md imports nothing from fleetbus"
    assert set(imports) == {"fleetbus.sdk"}
    lists = re.findall(r"from fleetbus\.sdk import (\([^)]*\)|[^\n]*)", text)
    used = {name.strip(" ()\n,") for names in lists for name in names.split(",")} - {""}
    assert used <= set(fleetbus.sdk.__all__)
    assert {"CommandPublisher", "VehicleAgent", "MemoryTransport", "QKDProvider"} <= used
