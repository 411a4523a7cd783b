"""The worker and the vehicle agent load the providers their key paths name (docs/key-paths.md
§0): ``oqs`` is chosen where a path names it, and fails clearly at start without liboqs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from integration.pipeline_support import SEALER, TestFleet, make_test_fleet

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.settings import FleetbusSettings, ProfileSettings
from fleetbus.processors.app import build_pipeline
from fleetbus.providers import oqs as oqs_module


@pytest.fixture
def fleet(tmp_path: Path) -> TestFleet:
    return make_test_fleet(tmp_path, vehicles=1)


@pytest.fixture
def no_liboqs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oqs_module, "liboqs_available", lambda: (False, "no liboqs here"))


def test_worker_loads_oqs_when_a_profile_names_it(fleet: TestFleet, no_liboqs: None) -> None:
    profiles = FleetbusSettings().profiles
    profiles["frodo"] = ProfileSettings(key_paths=["oqs+xwing", "xwing"], minimum_path="xwing")
    settings = FleetbusSettings(
        keys_dir=str(fleet.keys_dir), sealer_principal=SEALER, profiles=profiles
    )
    # Before: the worker never loaded oqs, and served "frodo" on xwing alone with a warning.
    with pytest.raises(ConfigError, match="'oqs' is unavailable: no liboqs here"):
        build_pipeline(settings)
    assert "oqs" not in sys.modules


def test_worker_without_oqs_in_a_path_does_not_load_it(fleet: TestFleet, no_liboqs: None) -> None:
    settings = FleetbusSettings(keys_dir=str(fleet.keys_dir), sealer_principal=SEALER)
    pipeline = build_pipeline(settings)
    assert pipeline.stages


def test_agent_loads_oqs_when_its_uplink_path_names_it(
    fleet: TestFleet, no_liboqs: None, tmp_path: Path
) -> None:
    from fleetbus.sdk.vehicle import VehicleAgent

    with pytest.raises(ConfigError, match="'oqs' is unavailable: no liboqs here"):
        VehicleAgent(
            FleetbusSettings(),
            vehicles=fleet.vehicles(["V-0001"]),
            directory=fleet.directory,
            minimum_path="xwing",
            uplink_paths=["oqs+xwing"],
            handlers={},
            store_path=tmp_path / "agent.sqlite",
        )
    assert "oqs" not in sys.modules
