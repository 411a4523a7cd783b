"""What the demo runs (``DemoOptions``) and the fleet it makes on disk: the principals, their
keys and the signed directory (``build_demo_keys``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fleetbus.bus.directory import (
    ROOT_SUITE,
    FleetRoot,
    issue_key,
    save_key_file,
    sign_directory,
    write_directory_file,
)
from fleetbus.bus.errors import ConfigError
from fleetbus.bus.keyfolder import KeyFolder

SEALER: Final = "bus-sealer"
DISPATCHER: Final = "dispatch-1"
APPROVER: Final = "dispatch-2"
INTRUDER: Final = "intruder"
HUB_SAE: Final = "sae-hub"
DISPATCH_SUITE: Final = "composite-mldsa65-ed25519"
DAY_S: Final = 86400.0
FLEET_READY: Final = "fleetbus-fleet ready"


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs. ``vehicles`` counts cars (PQC and legacy); edge units come on top."""

    vehicles: int = 200
    legacy: int | None = None  # default: vehicles // 10
    edge_units: int = 4
    commands: int = 300
    partitions: int = 2
    approval_window_s: float = 8.0
    outage_s: float = 10.0
    qkd_recovery_timeout_s: float = 60.0
    final_timeout_s: float = 120.0
    seed: int = 7

    @property
    def legacy_count(self) -> int:
        return self.vehicles // 10 if self.legacy is None else self.legacy

    def check(self) -> None:
        if self.vehicles < 4:
            raise ConfigError("the demo needs at least 4 vehicles")
        if not 0 <= self.legacy_count < self.vehicles - 2:
            raise ConfigError("--legacy must leave at least 3 PQC vehicles")
        if self.edge_units < 2:
            raise ConfigError("the demo needs at least 2 edge units")
        if self.commands < 10:
            raise ConfigError("the demo needs at least 10 routine commands")


@dataclass
class DemoFleet:
    """The principals the demo made in ``keys_dir`` (a ``fleetbus keys``-style folder)."""

    keys_dir: Path
    pqc: list[str]
    legacy: list[str]
    edge: list[str]
    edge_sae: dict[str, str]
    groups: dict[str, list[str]]

    @property
    def vehicles(self) -> list[str]:
        return sorted([*self.pqc, *self.legacy])


def build_demo_keys(keys_dir: Path, options: DemoOptions) -> DemoFleet:
    """Fleet root, bus sealer, two operators, an intruder (signed by another root), vehicles
    (PQC: xwing + x25519 KEMs; legacy: x25519 only) and QKD-connected edge units."""
    now = time.time()
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = FleetRoot.generate(ROOT_SUITE)
    save_key_file(KeyFolder(keys_dir).root_key, root.key_file())
    KeyFolder(keys_dir).root_pub.write_bytes(root.public.to_bytes())

    def issue(principal: str, kind: str, suite: str, *, by: FleetRoot = root, **extra: Any) -> Any:
        return issue_key(
            by, principal_id=principal, kind=kind, signature_suite=suite,
            not_before=now - DAY_S, not_after=now + 30 * DAY_S, **extra,
        )  # fmt: skip

    issued = [
        issue(SEALER, "sealer", ROOT_SUITE, kems=("xwing", "x25519")),
        issue(DISPATCHER, "dispatcher", DISPATCH_SUITE),
        issue(APPROVER, "approver", DISPATCH_SUITE),
    ]
    ids = [f"V-{n:04d}" for n in range(1, options.vehicles + 1)]
    # Legacy vehicles are spread evenly over the fleet (and so over both groups).
    step = options.vehicles / options.legacy_count if options.legacy_count else 0.0
    legacy = {ids[int(step * (i + 1)) - 1] for i in range(options.legacy_count)}
    groups: dict[str, list[str]] = {"north": [], "south": [], "depot": []}
    for index, vid in enumerate(ids):
        group = "north" if index % 2 == 0 else "south"
        groups[group].append(vid)
        kems = ("x25519",) if vid in legacy else ("xwing", "x25519")
        issued.append(issue(vid, "vehicle", "ed25519", kems=kems, groups=[group]))
    edge_sae: dict[str, str] = {}
    for n in range(1, options.edge_units + 1):
        eid = f"E-{n:02d}"
        edge_sae[eid] = f"sae-depot-{n:02d}"
        groups["depot"].append(eid)
        issued.append(
            issue(eid, "edge", "ed25519", kems=("xwing", "x25519"), qkd_sae_id=edge_sae[eid],
                  groups=["depot"])
        )  # fmt: skip
    # A well-formed key whose record another root signed: not in the directory.
    intruder = issue(INTRUDER, "dispatcher", "ed25519", by=FleetRoot.generate("ed25519"))
    # A new root starts a new history: head 1, whatever an earlier demo left in the folder.
    head, records = sign_directory(root, [i.signed for i in issued])
    write_directory_file(KeyFolder(keys_dir).directory, head, records)
    for item in [*issued, intruder]:
        save_key_file(KeyFolder(keys_dir).private_key(item.key_file.principal_id), item.key_file)
    return DemoFleet(
        keys_dir=keys_dir,
        pqc=[v for v in ids if v not in legacy],
        legacy=sorted(legacy),
        edge=sorted(edge_sae),
        edge_sae=edge_sae,
        groups=groups,
    )
