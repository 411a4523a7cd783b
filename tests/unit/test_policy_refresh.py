"""A key-directory change reaches the policy without a restart: ``PolicyEngine.refresh``."""

from __future__ import annotations

from typing import Any

import pytest

from fleetbus.bus.errors import ConfigError
from fleetbus.processors.fleet_registry import FleetRegistry
from fleetbus.processors.policy import PolicyEngine

NOW = 1_800_000_000.0


def _registry(operators: dict[str, Any], vehicles: dict[str, Any]) -> FleetRegistry:
    return FleetRegistry.from_mapping({"operators": operators, "vehicles": vehicles})


def _outcome(engine: PolicyEngine, issuer: str, vehicle: str | None, group: str | None) -> str:
    return engine.decide_command(
        issuer=issuer,
        action="ping",
        vehicle=vehicle,
        group=group,
        approvals=0,
        required_approvals=1,
        now=NOW,
    ).outcome


def test_a_principal_issued_live_is_known_after_a_refresh() -> None:
    engine = PolicyEngine(
        _registry({"dispatch-1": {"roles": ["dispatcher"]}}, {"V-1": {"groups": ["north"]}})
    )
    assert _outcome(engine, "dispatch-1", "V-1", None) == "allow"
    assert _outcome(engine, "dispatch-9", "V-1", None) == "deny"  # cached as denied
    engine.refresh(
        _registry(
            {"dispatch-1": {"roles": ["dispatcher"]}, "dispatch-9": {"roles": ["dispatcher"]}},
            {"V-1": {"groups": ["north"]}, "V-2": {"groups": ["north"]}},
        )
    )
    assert _outcome(engine, "dispatch-9", "V-1", None) == "allow"
    assert "V-2" in engine.registry.vehicles
    assert engine.registry.group_members("north") == ["V-1", "V-2"]


def test_a_registry_that_does_not_parse_leaves_the_current_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = _registry({"dispatch-1": {"roles": ["dispatcher"]}}, {"V-1": {}})
    engine = PolicyEngine(before)
    monkeypatch.setattr(engine, "_entity_list", lambda registry=None: [{"uid": "not an entity"}])
    with pytest.raises(ConfigError):
        engine.refresh(_registry({}, {}))
    assert engine.registry is before
    assert _outcome(engine, "dispatch-1", "V-1", None) == "allow"
