"""The worker and the vehicle agent load the providers their key paths name (docs/key-paths.md
§0): ``oqs`` is chosen where a path names it, and fails clearly at start without liboqs."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetbus.bus.directory import (
    DIRECTORY,
    ROOT_PUB,
    FleetRoot,
    KeyDirectory,
    PrincipalKeyFile,
    issue_key,
    save_key_file,
    sign_directory,
    write_directory_file,
)
from fleetbus.bus.errors import ConfigError
from fleetbus.bus.settings import FleetbusSettings, ProfileSettings
from fleetbus.processors.app import build_pipeline
from fleetbus.providers import oqs as oqs_module

SEALER = "bus-sealer"
VEHICLE = "V-0001"


@dataclass(frozen=True)
class Fleet:
    """A keys folder with a root, the bus sealer and one vehicle (no shared test helpers)."""

    keys_dir: Path
    directory: KeyDirectory
    vehicle: PrincipalKeyFile


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    now = time.time()
    window = {"not_before": now - 3600, "not_after": now + 86400}
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir(mode=0o700)
    root = FleetRoot.generate("ed25519")
    (keys_dir / ROOT_PUB).write_bytes(root.public.to_bytes())
    sealer = issue_key(
        root, principal_id=SEALER, kind="sealer", signature_suite="ed25519",
        kems=["xwing", "x25519"], **window,
    )  # fmt: skip
    vehicle = issue_key(
        root, principal_id=VEHICLE, kind="vehicle", signature_suite="ed25519",
        kems=["xwing"], **window,
    )  # fmt: skip
    head, records = sign_directory(root, [sealer.signed, vehicle.signed])
    write_directory_file(keys_dir / DIRECTORY, head, records)
    save_key_file(keys_dir / f"{SEALER}.key", sealer.key_file)
    directory = KeyDirectory(root.public)
    directory.ingest_all([sealer.signed, vehicle.signed])
    return Fleet(keys_dir, directory, vehicle.key_file)


@pytest.fixture
def no_liboqs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oqs_module, "liboqs_available", lambda: (False, "no liboqs here"))


def test_worker_loads_oqs_when_a_profile_names_it(fleet: Fleet, no_liboqs: None) -> None:
    profiles = FleetbusSettings().profiles
    profiles["frodo"] = ProfileSettings(key_paths=["oqs+xwing", "xwing"], minimum_path="xwing")
    settings = FleetbusSettings(
        keys_dir=str(fleet.keys_dir), sealer_principal=SEALER, profiles=profiles
    )
    # Before: the worker never loaded oqs, and served "frodo" on xwing alone with a warning.
    with pytest.raises(ConfigError, match="'oqs' is unavailable: no liboqs here"):
        build_pipeline(settings)
    assert "oqs" not in sys.modules


def test_worker_without_oqs_in_a_path_does_not_load_it(fleet: Fleet, no_liboqs: None) -> None:
    settings = FleetbusSettings(keys_dir=str(fleet.keys_dir), sealer_principal=SEALER)
    pipeline = build_pipeline(settings)
    assert pipeline.stages


def test_agent_loads_oqs_when_its_uplink_path_names_it(
    fleet: Fleet, no_liboqs: None, tmp_path: Path
) -> None:
    from fleetbus.sdk.vehicle import VehicleAgent

    with pytest.raises(ConfigError, match="'oqs' is unavailable: no liboqs here"):
        VehicleAgent(
            FleetbusSettings(),
            vehicles=[fleet.vehicle],
            directory=fleet.directory,
            minimum_path="xwing",
            uplink_paths=["oqs+xwing"],
            handlers={},
            store_path=tmp_path / "agent.sqlite",
        )
    assert "oqs" not in sys.modules
