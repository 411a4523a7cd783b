"""Policy as code: Cedar (``cedarpy``) decisions for commands, approvals and telemetry export.

Policies are parsed once into a ``cedarpy.PolicySet`` and the fleet's operators, roles, groups
and actions once into a ``cedarpy.Entities`` handle; a decision adds only the vehicle it names
(looked up in the registry), so nothing is re-parsed per command and no process holds an entity
per vehicle of the fleet. The policy files and the entity model are described in
``docs/policy.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cedarpy

from fleetbus.bus.errors import ConfigError
from fleetbus.observability.metrics import POLICY_DECISIONS, on_commit
from fleetbus.processors.fleet_registry import CRITICALITIES, FleetRegistry

__all__ = [
    "APPROVAL_POLICY_ID",
    "DEFAULT_POLICY_DIR",
    "DEFAULT_TELEMETRY_FIELD_SETS",
    "CommandDecision",
    "FieldExport",
    "PolicyEngine",
    "load_policy_text",
]

#: The packaged default policies. ``resolve()`` follows the strict-editable-install link to
#: the source folder, so the .cedar files are found without being package data.
DEFAULT_POLICY_DIR: Final = Path(__file__).resolve().parent / "policies"
#: The policy whose denial alone means "waiting for approvals", not "denied".
APPROVAL_POLICY_ID: Final = "approval-required"

DEFAULT_TELEMETRY_FIELD_SETS: Mapping[str, tuple[str, ...]] = {
    "location": ("lat", "lon", "latitude", "longitude", "altitude"),
    "identity": ("vin", "driver", "driver_id", "plate"),
}


def load_policy_text(policy_dir: Path | None = None) -> str:
    """All ``*.cedar`` files of ``policy_dir`` (default: the packaged ones), in name order.

    Each file is parsed on its own first, so that an error names its file and line (cedarpy
    reports neither)."""
    folder = policy_dir or DEFAULT_POLICY_DIR
    files = sorted(folder.glob("*.cedar"))
    if not files:
        raise ConfigError(f"no *.cedar policy files in {folder}")
    for path in files:
        check_policy_file(path)
    return "\n".join(f"// --- {f.name}\n{f.read_text()}" for f in files)


def check_policy_file(path: Path) -> None:
    """Raise ``ConfigError`` ``<file>:<line>: <Cedar's message>`` when ``path`` does not parse.

    The line is the first at which the file's leading lines fail as the whole file does (a
    prefix that merely stops mid-policy fails with "unexpected end of input" instead), so it
    is the line holding the offending token.
    """
    text = path.read_text()
    try:
        cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        message = str(exc)
        lines = text.split("\n")
        for count in range(1, len(lines) + 1):
            try:
                cedarpy.PolicySet.from_str("\n".join(lines[:count]))
            except ValueError as prefix_exc:
                if str(prefix_exc) == message:
                    raise ConfigError(
                        f"{path}:{count}: Cedar policy does not parse: {message}"
                    ) from None
        raise ConfigError(f"{path}: Cedar policy does not parse: {message}") from None


@dataclass(frozen=True)
class CommandDecision:
    """``outcome``: allow, deny or pending (only the approval rule is missing)."""

    outcome: str
    criticality: str
    policies: tuple[str, ...]
    detail: str

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"


@dataclass(frozen=True)
class FieldExport:
    """How one telemetry field leaves: ``exact``, ``coarse`` or ``drop``."""

    field: str
    mode: str


def _uid(kind: str, ident: str) -> dict[str, str]:
    return {"type": kind, "id": ident}


#: (allowed, reasons, errors) of one Cedar evaluation.
_Evaluation = tuple[bool, tuple[str, ...], tuple[str, ...]]
#: Distinct requests remembered per engine (cleared when full).
_DECISION_CACHE_SIZE: Final = 4096


class PolicyEngine:
    """Cedar decisions against a fleet registry; build once per process (or per reload)."""

    def __init__(
        self,
        registry: FleetRegistry,
        *,
        policy_text: str | None = None,
        policy_dir: Path | None = None,
        telemetry_field_sets: Mapping[str, tuple[str, ...]] = DEFAULT_TELEMETRY_FIELD_SETS,
    ) -> None:
        self.registry = registry
        text = policy_text if policy_text is not None else load_policy_text(policy_dir)
        try:
            self._policies = cedarpy.PolicySet.from_str(text)
        except ValueError as exc:
            raise ConfigError(f"Cedar policies do not parse: {exc}") from None
        self._field_sets = dict(telemetry_field_sets)
        try:
            self._entities = cedarpy.Entities.from_json_str(json.dumps(self._entity_list()))
        except ValueError as exc:
            raise ConfigError(f"fleet entities do not parse: {exc}") from None
        self._export_cache: dict[tuple[str, str], str] = {}
        self._decisions: dict[tuple[Any, ...], _Evaluation] = {}
        self._generation: int | None = None

    def refresh(self, registry: FleetRegistry) -> None:
        """Decide against ``registry`` from now on (the key directory changed: a principal
        issued live gets its roles and groups). The new entities are built before anything is
        swapped, so a registry that does not parse leaves the current one in force."""
        try:
            entities = cedarpy.Entities.from_json_str(json.dumps(self._entity_list(registry)))
        except ValueError as exc:
            raise ConfigError(f"fleet entities do not parse: {exc}") from None
        self.registry = registry
        self._entities = entities
        self._decisions = {}

    def _entity_list(self, registry: FleetRegistry | None = None) -> list[dict[str, Any]]:
        reg = registry or self.registry
        entities: list[dict[str, Any]] = []
        roles = sorted({r for op in reg.operators.values() for r in op.roles})
        entities += [{"uid": _uid("Role", r), "attrs": {}, "parents": []} for r in roles]
        for op in sorted(reg.operators.values(), key=lambda o: o.id):
            entities.append(
                {
                    "uid": _uid("Operator", op.id),
                    "attrs": {},
                    "parents": [_uid("Role", r) for r in sorted(op.roles)],
                }
            )
        # Groups, not vehicles: a vehicle is added to the request's entities when a decision
        # names it (``_vehicle_entities``), so the fleet's size does not enter here.
        entities += [
            {"uid": _uid("Group", g), "attrs": {}, "parents": []} for g in reg.group_names()
        ]
        for crit in CRITICALITIES:
            entities.append({"uid": _uid("Action", crit), "attrs": {}, "parents": []})
        for spec in sorted(reg.actions.values(), key=lambda a: a.name):
            if spec.name in CRITICALITIES:
                continue
            entities.append(
                {
                    "uid": _uid("Action", spec.name),
                    "attrs": {},
                    "parents": [_uid("Action", spec.criticality)],
                }
            )
        for name in sorted(self._field_sets):
            entities.append({"uid": _uid("FieldSet", name), "attrs": {}, "parents": []})
        members: dict[str, list[str]] = {}
        for set_name, fields in self._field_sets.items():
            for f in fields:
                members.setdefault(f, []).append(set_name)
        for f, sets in sorted(members.items()):
            entities.append(
                {
                    "uid": _uid("Field", f),
                    "attrs": {},
                    "parents": [_uid("FieldSet", s) for s in sorted(sets)],
                }
            )
        return entities

    # -- decisions ------------------------------------------------------------------------

    def _decide(
        self,
        principal: dict[str, str],
        action: str,
        resource: dict[str, str],
        context: dict[str, Any],
    ) -> _Evaluation:
        # Policies and entities are fixed until a refresh or a roster change and Cedar
        # evaluation is a pure function of them and the request, so a request seen before (same
        # principal, action, resource and every context value, the hour included) has the same
        # answer: evaluated once, not skipped. Commands of a fleet repeat few request shapes.
        roster = self.registry.roster
        generation = None if roster is None else roster.generation
        if generation != self._generation:
            self._decisions, self._generation = {}, generation
        key = (
            principal["type"],
            principal["id"],
            action,
            resource["type"],
            resource["id"],
            *sorted(context.items()),
        )
        cached = self._decisions.get(key)
        if cached is not None:
            return cached
        evaluation = self._evaluate(principal, action, resource, context)
        if len(self._decisions) >= _DECISION_CACHE_SIZE:
            self._decisions.clear()
        self._decisions[key] = evaluation
        return evaluation

    def _vehicle_entities(self, resource: dict[str, str]) -> cedarpy.Entities:
        """The fleet's entities plus the request's vehicle (its groups and attributes from the
        registry's lookup); a vehicle nobody knows is added with none, as Cedar treats an
        unknown entity."""
        if resource["type"] != "Vehicle":
            return self._entities
        vehicle = self.registry.vehicle(resource["id"])
        if vehicle is None:
            return self._entities
        attrs: dict[str, Any] = {
            "pqc": "pqc" in vehicle.capabilities,
            "qkd": "qkd" in vehicle.capabilities,
        }
        for key, value in vehicle.attributes.items():
            if isinstance(value, str | bool | int):
                attrs[str(key)] = value
        entity = {
            "uid": resource,
            "attrs": attrs,
            "parents": [_uid("Group", g) for g in sorted(vehicle.groups)],
        }
        try:
            return self._entities.with_added_json_str(json.dumps([entity]))
        except ValueError as exc:
            raise ConfigError(
                f"fleet entity of vehicle {vehicle.id} does not parse: {exc}"
            ) from None

    def _evaluate(
        self,
        principal: dict[str, str],
        action: str,
        resource: dict[str, str],
        context: dict[str, Any],
    ) -> _Evaluation:
        request = {
            "principal": principal,
            "action": _uid("Action", action),
            "resource": resource,
            "context": context,
        }
        entities = self._vehicle_entities(resource)
        result = cedarpy.is_authorized(request, self._policies, entities)
        diagnostics = result.diagnostics
        names = diagnostics.id_annotations_by_reason
        reasons = tuple(names.get(pid, pid) for pid in diagnostics.reasons)
        return result.allowed, reasons, tuple(diagnostics.errors)

    def decide_command(
        self,
        *,
        issuer: str,
        action: str,
        vehicle: str | None,
        group: str | None,
        approvals: int,
        required_approvals: int,
        now: float,
    ) -> CommandDecision:
        """Allow, deny, or pending (high criticality still waiting for approvals)."""
        criticality = self.registry.criticality(action)
        if criticality is None:
            on_commit(POLICY_DECISIONS.labels(outcome="deny", reason="policy_denied").inc)
            return CommandDecision(
                "deny", "unknown", (), f"action {action!r} is not in the catalogue"
            )
        resource = _uid("Vehicle", vehicle) if vehicle is not None else _uid("Group", str(group))
        context = {
            "criticality": criticality,
            "approvals": approvals,
            "required_approvals": required_approvals,
            "hour": math.floor(now / 3600) % 24,
            "target_kind": "vehicle" if vehicle is not None else "group",
            "group_size": self.registry.group_size(group) if group else 1,
        }
        allowed, reasons, errors = self._decide(_uid("Operator", issuer), action, resource, context)
        if allowed:
            outcome, detail = "allow", "permitted by " + ", ".join(reasons)
        elif reasons and set(reasons) == {APPROVAL_POLICY_ID}:
            outcome = "pending"
            detail = f"waiting for approvals: {approvals} of {required_approvals}"
        elif reasons:
            outcome, detail = "deny", "forbidden by " + ", ".join(reasons)
        else:
            outcome = "deny"
            detail = f"no policy permits {issuer} to {action} {resource['type'].lower()}"
            if errors:
                detail += f" (policy errors: {len(errors)})"
        on_commit(
            POLICY_DECISIONS.labels(
                outcome=outcome, reason="ok" if outcome == "allow" else "policy_denied"
            ).inc
        )
        return CommandDecision(outcome, criticality, reasons, detail)

    def may_approve(self, approver: str, *, vehicle: str | None, group: str | None) -> bool:
        resource = _uid("Vehicle", vehicle) if vehicle is not None else _uid("Group", str(group))
        allowed, _, _ = self._decide(_uid("Operator", approver), "approve", resource, {})
        return allowed

    def export_mode(self, consumer: str, field: str) -> str:
        """``exact``, ``coarse`` or ``drop`` for one (consumer, field); cached (context-free)."""
        key = (consumer, field)
        cached = self._export_cache.get(key)
        if cached is not None:
            return cached
        principal, resource = _uid("Consumer", consumer), _uid("Field", field)
        if self._decide(principal, "export_exact", resource, {})[0]:
            mode = "exact"
        elif self._decide(principal, "export_coarse", resource, {})[0]:
            mode = "coarse"
        else:
            mode = "drop"
        if len(self._export_cache) < 4096:
            self._export_cache[key] = mode
        return mode

    def export(self, consumer: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """The telemetry fields ``consumer`` may see, coarsened where the policy says so."""
        out: dict[str, Any] = {}
        for name, value in fields.items():
            mode = self.export_mode(consumer, name)
            if mode == "exact":
                out[name] = value
            elif mode == "coarse":
                out[name] = _coarsen(value)
        return out


def _coarsen(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return round(float(value), 2)
    return None
