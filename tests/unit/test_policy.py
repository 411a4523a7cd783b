"""Cedar policies: roles, criticality, approvals (pending), groups, approvers, export policy."""

from __future__ import annotations

import pytest

from fleetbus.bus.errors import ConfigError
from fleetbus.processors.fleet_registry import FleetRegistry
from fleetbus.processors.policy import DEFAULT_POLICY_DIR, PolicyEngine, load_policy_text

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    registry = FleetRegistry.from_mapping(
        {
            "operators": {
                "dispatch-1": {"roles": ["dispatcher"]},
                "boss": {"roles": ["supervisor"]},
                "dispatch-2": {"roles": ["approver"]},
            },
            "vehicles": {
                "V-1": {"groups": ["north"], "capabilities": ["pqc"]},
                "V-2": {"groups": ["north"]},
            },
        }
    )
    return PolicyEngine(registry)


def decide(
    engine: PolicyEngine,
    issuer: str,
    action: str,
    *,
    vehicle: str | None = "V-1",
    group: str | None = None,
    approvals: int = 0,
) -> tuple[str, str]:
    d = engine.decide_command(
        issuer=issuer,
        action=action,
        vehicle=vehicle,
        group=group,
        approvals=approvals,
        required_approvals=1,
        now=NOW,
    )
    return d.outcome, d.detail


def test_packaged_policies_are_found_and_parse() -> None:
    assert (DEFAULT_POLICY_DIR / "commands.cedar").exists()
    assert "approval-required" in load_policy_text()


def test_dispatcher_may_send_routine_commands(engine: PolicyEngine) -> None:
    assert decide(engine, "dispatch-1", "ping")[0] == "allow"
    assert decide(engine, "dispatch-1", "lock_doors", vehicle=None, group="north")[0] == "allow"


def test_unknown_principal_or_role_without_permission_is_denied(engine: PolicyEngine) -> None:
    outcome, detail = decide(engine, "intruder", "ping")
    assert outcome == "deny"
    assert "no policy permits" in detail
    assert decide(engine, "dispatch-2", "ping")[0] == "deny"  # an approver does not dispatch


def test_unknown_action_is_denied(engine: PolicyEngine) -> None:
    outcome, detail = decide(engine, "dispatch-1", "self_destruct")
    assert outcome == "deny"
    assert "catalogue" in detail


def test_high_criticality_is_pending_until_approved(engine: PolicyEngine) -> None:
    assert decide(engine, "dispatch-1", "unlock_doors") == (
        "pending",
        "waiting for approvals: 0 of 1",
    )
    assert decide(engine, "dispatch-1", "unlock_doors", approvals=1)[0] == "allow"
    # The approval rule binds supervisors too.
    assert decide(engine, "boss", "disable_vehicle")[0] == "pending"


def test_elevated_actions_to_groups_need_a_supervisor(engine: PolicyEngine) -> None:
    assert decide(engine, "dispatch-1", "set_battery_profile")[0] == "allow"
    assert (
        decide(engine, "dispatch-1", "set_battery_profile", vehicle=None, group="north")[0]
        == "deny"
    )
    assert decide(engine, "boss", "set_battery_profile", vehicle=None, group="north")[0] == "allow"


def test_who_may_approve(engine: PolicyEngine) -> None:
    assert engine.may_approve("dispatch-2", vehicle="V-1", group=None)
    assert engine.may_approve("boss", vehicle=None, group="north")
    assert not engine.may_approve("dispatch-1", vehicle="V-1", group=None)
    assert not engine.may_approve("intruder", vehicle="V-1", group=None)


def test_a_forbid_policy_wins_and_is_named() -> None:
    registry = FleetRegistry.from_mapping(
        {"operators": {"d": {"roles": ["dispatcher"]}}, "vehicles": {"V-1": {}}}
    )
    text = load_policy_text() + (
        '\n@id("no-firmware-by-day")\nforbid (principal, action == Action::"push_firmware", '
        "resource) when { context.hour >= 6 && context.hour < 22 };\n"
    )
    engine = PolicyEngine(registry, policy_text=text)
    noon = 1_800_000_000.0 - (1_800_000_000.0 % 86400) + 12 * 3600
    d = engine.decide_command(
        issuer="d",
        action="push_firmware",
        vehicle="V-1",
        group=None,
        approvals=1,
        required_approvals=1,
        now=noon,
    )
    assert d.outcome == "deny"
    assert "no-firmware-by-day" in d.detail
    night = noon - 10 * 3600
    d = engine.decide_command(
        issuer="d",
        action="push_firmware",
        vehicle="V-1",
        group=None,
        approvals=1,
        required_approvals=1,
        now=night,
    )
    assert d.outcome == "allow"


def test_export_policy_coarsens_location_and_drops_identity(engine: PolicyEngine) -> None:
    fields = {"lat": 52.520008, "lon": 13.404954, "speed": 12.5, "vin": "WVW123", "soc": 81}
    assert engine.export("analytics", fields) == {
        "lat": 52.52,
        "lon": 13.4,
        "speed": 12.5,
        "soc": 81,
    }
    assert engine.export("operations", fields) == fields
    assert engine.export("nobody", fields) == {}


def test_broken_policies_and_registries_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        PolicyEngine(FleetRegistry.from_mapping({}), policy_text="permit (principal,")
    with pytest.raises(ConfigError):
        FleetRegistry.from_mapping({"actions": {"x": {"criticality": "extreme"}}})


def test_a_repeated_request_is_evaluated_once_and_any_changed_input_is_evaluated_again(
    engine: PolicyEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cedarpy

    evaluated: list[dict[str, object]] = []
    real = cedarpy.is_authorized

    def counting(request: dict[str, object], *args: object, **kwargs: object) -> object:
        evaluated.append(request)
        return real(request, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cedarpy, "is_authorized", counting)
    fresh = PolicyEngine(engine.registry)
    first = decide(fresh, "dispatch-1", "unlock_doors")
    assert first[0] == "pending"
    assert decide(fresh, "dispatch-1", "unlock_doors") == first
    assert len(evaluated) == 1
    # Each changed input is a new request: approvals, principal, resource, action, hour.
    assert decide(fresh, "dispatch-1", "unlock_doors", approvals=1)[0] == "allow"
    assert decide(fresh, "intruder", "ping")[0] == "deny"
    assert decide(fresh, "dispatch-1", "unlock_doors", vehicle=None, group="north")[0] in {
        "pending",
        "allow",
    }
    assert decide(fresh, "dispatch-1", "ping")[0] == "allow"
    later = fresh.decide_command(
        issuer="dispatch-1",
        action="unlock_doors",
        vehicle="V-1",
        group=None,
        approvals=0,
        required_approvals=1,
        now=NOW + 3600,
    )
    assert later.outcome == "pending"
    assert len(evaluated) == 6
    assert decide(fresh, "intruder", "ping")[0] == "deny"
    assert decide(fresh, "dispatch-1", "unlock_doors", approvals=1)[0] == "allow"
    assert len(evaluated) == 6
