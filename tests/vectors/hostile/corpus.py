"""Load the hostile-input corpus (``cases/<target>/<name>.json``) and its fleet (``fleet/``).

Shared by ``tests/unit/test_hostile_corpus.py`` (cases through the stage logic and a
VehicleAgent, no Kafka) and ``tests/integration/test_hostile_pipeline.py`` (real broker, real
worker). The case format is described in ``generate.py``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases"
FLEET = HERE / "fleet"

#: Targets the worker reads (authorize, track, telemetry stages) and the one a vehicle reads.
BUS_TARGETS = ("commands.requested", "commands.approvals", "commands.responses", "telemetry.raw")
VEHICLE_TARGET = "commands.outbound"
#: The compacted key topic, as a loader following it sees it (a ``KeyDirectory``).
KEYS_TARGET = "keys"
#: Outcomes that are not reason codes: accepted, or waiting for approvals.
NON_REJECTIONS = ("ok", "pending")


@dataclass(frozen=True)
class Case:
    name: str
    target: str
    category: str
    description: str
    expect: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    setup: tuple[str, ...]
    dlq_of: str | None
    after_approval_window: bool

    @property
    def hostile(self) -> bool:
        return self.expect not in NON_REJECTIONS


def _value(doc: dict[str, Any]) -> bytes | None:
    if "value_gen" in doc:
        return b"".join(bytes.fromhex(part) * int(times) for part, times in doc["value_gen"])
    raw = doc["value"]
    return None if raw is None else bytes.fromhex(raw)


def load_meta() -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((HERE / "corpus.json").read_text())
    return meta


def load_cases() -> dict[str, Case]:
    """Every case by name, in the generator's order (setup cases come before their users)."""
    out: dict[str, Case] = {}
    for entry in load_meta()["order"]:
        doc = json.loads((CASES / f"{entry}.json").read_text())
        out[doc["name"]] = Case(
            name=doc["name"],
            target=doc["target"],
            category=doc["category"],
            description=doc["description"],
            expect=doc["expect"],
            key=None if doc["key"] is None else bytes.fromhex(doc["key"]),
            value=_value(doc),
            headers=tuple((h, bytes.fromhex(v)) for h, v in doc["headers"]),
            setup=tuple(doc["setup"]),
            dlq_of=doc.get("dlq_of"),
            after_approval_window=bool(doc.get("after_approval_window", False)),
        )
    return out


def copy_fleet(dest: Path) -> Path:
    """Copy the corpus fleet to ``dest`` with private key files at mode 0600; return ``dest``."""
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in FLEET.iterdir():
        target = dest / path.name
        shutil.copyfile(path, target)
        target.chmod(0o600 if path.suffix == ".key" else 0o644)
    return dest
