"""Who is who in the fleet for policy: operators and their roles, vehicles and their groups,
actions and their criticality.

Vehicles, groups and capabilities come from the key directory's records (the fleet root vouches
for them); an optional registry file (JSON or YAML, ``keys_dir/fleet.json`` by default) adds
operator roles, vehicle attributes, extra group memberships and the action catalogue.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from fleetbus.bus.directory import (
    RootPublicKey,
    SignedKeyRecord,
    from_kafka,
    kafka_key,
    open_directory_file,
    principal_set,
    set_digest,
    verify_signed_head,
)
from fleetbus.bus.directory.trust import verify_signed_record
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode

__all__ = [
    "CRITICALITIES",
    "DEFAULT_ACTIONS",
    "ActionSpec",
    "DirectoryRoster",
    "FleetRegistry",
    "Operator",
    "RosterEntry",
    "Vehicle",
]

CRITICALITIES = ("routine", "elevated", "high")

#: The action catalogue used when the registry file names none.
DEFAULT_ACTIONS: Mapping[str, str] = {
    "ping": "routine",
    "lock_doors": "routine",
    "set_climate": "routine",
    "push_route": "routine",
    "set_battery_profile": "elevated",
    "unlock_doors": "high",
    "disable_vehicle": "high",
    "push_firmware": "high",
}

#: Roles an operator gets from its key-directory kind when the registry file is silent.
_ROLES_BY_KIND: Mapping[str, frozenset[str]] = {
    "dispatcher": frozenset({"dispatcher"}),
    "approver": frozenset({"approver"}),
}


@dataclass(frozen=True)
class Operator:
    id: str
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Vehicle:
    id: str
    groups: frozenset[str] = frozenset()
    capabilities: frozenset[str] = frozenset()
    attributes: Mapping[str, str | int | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class ActionSpec:
    name: str
    criticality: str


@dataclass
class FleetRegistry:
    operators: dict[str, Operator] = field(default_factory=dict)
    vehicles: dict[str, Vehicle] = field(default_factory=dict)
    actions: dict[str, ActionSpec] = field(default_factory=dict)
    # Derived indexes (group sizes, members per partition); a registry is built whole and then
    # only read (a refresh builds a new one), so they are computed once.
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def criticality(self, action: str) -> str | None:
        spec = self.actions.get(action)
        return None if spec is None else spec.criticality

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for vehicle in sorted(self.vehicles.values(), key=lambda v: v.id):
            for group in vehicle.groups:
                out.setdefault(group, []).append(vehicle.id)
        return out

    def group_members(self, group: str) -> list[str]:
        return self.groups().get(group, [])

    def group_size(self, group: str) -> int:
        """How many vehicles ``group`` has: what the authorize stage needs of a group (its Cedar
        context and "no vehicles"), a count per group computed once per registry."""
        sizes = self._cache.get("sizes")
        if sizes is None:
            sizes = self._cache["sizes"] = {g: len(m) for g, m in self.groups().items()}
        return int(sizes.get(group, 0))

    def partition_members(self, group: str, partition: int, partitions: int) -> list[str]:
        """The members of ``group`` whose records Kafka puts on ``partition`` of a topic keyed
        by vehicle id (``partitions`` partitions): what one seal-stage partition expands a
        group command to. Indexed once per registry and partition count."""
        from fleetbus.bus.topics import kafka_partition

        key = ("members", partitions)
        index = self._cache.get(key)
        if index is None:
            index = {}
            for vehicle in sorted(self.vehicles.values(), key=lambda v: v.id):
                p = kafka_partition(vehicle.id.encode(), partitions)
                for g in vehicle.groups:
                    index.setdefault((g, p), []).append(vehicle.id)
            self._cache[key] = index
        return list(index.get((group, partition), []))

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any]) -> FleetRegistry:
        """Build from the registry file's document (see docs/policy.md for the format)."""
        if not isinstance(doc, Mapping):
            raise ConfigError("fleet registry: the document must be a map")
        registry = cls()
        try:
            for op_id, spec in dict(doc.get("operators") or {}).items():
                registry.operators[str(op_id)] = Operator(
                    str(op_id), frozenset(str(r) for r in spec.get("roles", []))
                )
            for v_id, spec in dict(doc.get("vehicles") or {}).items():
                registry.vehicles[str(v_id)] = Vehicle(
                    str(v_id),
                    groups=frozenset(str(g) for g in spec.get("groups", [])),
                    capabilities=frozenset(str(c) for c in spec.get("capabilities", [])),
                    attributes=dict(spec.get("attributes", {})),
                )
            actions = doc.get("actions")
            if actions is None:
                actions = {name: {"criticality": c} for name, c in DEFAULT_ACTIONS.items()}
            for name, spec in dict(actions).items():
                crit = spec if isinstance(spec, str) else str(spec.get("criticality", "routine"))
                if crit not in CRITICALITIES:
                    raise ConfigError(
                        f"fleet registry: action {name!r} has criticality {crit!r}; "
                        f"choose from {', '.join(CRITICALITIES)}"
                    )
                registry.actions[str(name)] = ActionSpec(str(name), crit)
        except ConfigError:
            raise
        except (AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"fleet registry: unexpected structure ({exc})") from None
        return registry

    @classmethod
    def load(cls, path: Path) -> FleetRegistry:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"fleet registry {path} does not exist") from None
        if path.suffix in {".yaml", ".yml"}:
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:  # pragma: no cover - PyYAML is optional
                raise ConfigError("a YAML fleet registry needs PyYAML; use JSON") from None
            doc = yaml.safe_load(text)
        else:
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"fleet registry {path}: invalid JSON ({exc.msg})") from None
        return cls.from_mapping(doc or {})

    def with_directory_records(self, records: Iterable[Any]) -> FleetRegistry:
        """Merge key-directory records (``KeyRecord``): vehicles/edge units with their groups
        and capabilities, dispatchers/approvers with roles from their kind. The file's entries
        add to what the directory says; they never remove a directory group or capability."""
        latest: dict[str, Any] = {}
        for record in records:
            current = latest.get(record.principal_id)
            if current is None or record.version > current.version:
                latest[record.principal_id] = record
        merged = FleetRegistry(
            operators=dict(self.operators), vehicles=dict(self.vehicles), actions=dict(self.actions)
        )
        for pid, record in latest.items():
            if record.kind in {"vehicle", "edge"}:
                extra = merged.vehicles.get(pid, Vehicle(pid))
                merged.vehicles[pid] = Vehicle(
                    pid,
                    groups=frozenset(record.groups) | extra.groups,
                    capabilities=frozenset(record.capabilities) | extra.capabilities,
                    attributes={"kind": record.kind, **dict(extra.attributes)},
                )
            elif record.kind in _ROLES_BY_KIND:
                extra_op = merged.operators.get(pid)
                roles = _ROLES_BY_KIND[record.kind] if extra_op is None else extra_op.roles
                merged.operators[pid] = Operator(pid, roles)
        return merged


@dataclass(frozen=True)
class RosterEntry:
    """What the registry takes from a principal's latest key record (no key material)."""

    principal_id: str
    kind: str
    version: int
    groups: tuple[str, ...]
    capabilities: tuple[str, ...]


class DirectoryRoster:
    """Every principal's latest record, without keys: the fleet-wide input of the registry in a
    worker whose ``KeyDirectory`` holds only its partitions' vehicles (``directory_scope`` =
    partitions). Filled from the records of a whole directory load, then from every record of
    the key topic that would change it, each checked against the fleet root first; a record
    that changes nothing (an older or equal version: what a restart re-reads) is not verified.
    Written by the key-topic follower, read by the policy refresh's thread."""

    def __init__(self, root: RootPublicKey) -> None:
        self._root = root
        self._verifier = root.verifier()
        self._lock = threading.Lock()
        self._latest: dict[str, RosterEntry] = {}

    @classmethod
    def from_file(cls, path: Path, root: RootPublicKey) -> DirectoryRoster:
        """Every principal of a directory file (``directory.cbor``), authenticated by its head:
        each record's bytes are hashed into its set's digest, which must match the head's
        (else ``DIRECTORY_ROLLBACK``, as ``load_directory`` refuses such a file). Only the
        fields the registry needs are decoded: no public keys parsed, no signature but the
        head's verified, so a worker holding a share of the fleet does not build it whole."""
        roster = cls(root)
        # Streamed (bus.directory.open_directory_file): never the whole file in memory.
        with open_directory_file(path) as stream:
            if stream.head is None:
                raise ConfigError(f"directory file {path}: expected a head and records")
            head = verify_signed_head(stream.head, root)
            sets: list[list[tuple[str, bytes]]] = [[] for _ in head.sets]
            try:
                for item in stream.records:
                    record_cbor = cbor2.loads(item.data)["record"]
                    inner = cbor2.loads(record_cbor)
                    index = principal_set(inner["principal"], inner["kind"], head.vehicle_buckets)
                    sets[index].append((inner["kid"], hashlib.sha256(record_cbor).digest()))
                    roster._take(
                        RosterEntry(
                            inner["principal"],
                            inner["kind"],
                            inner["version"],
                            tuple(inner["groups"]),
                            tuple(inner["caps"]),
                        )
                    )
            except FleetbusError:
                raise
            except Exception:
                raise FleetbusError(
                    f"directory file {path}: a record is not readable",
                    reason=ReasonCode.MALFORMED,
                ) from None
        for index, ((count, digest), entries) in enumerate(zip(head.sets, sets, strict=True)):
            if len(entries) != count or not hmac.compare_digest(set_digest(entries), digest):
                raise FleetbusError(
                    f"directory file {path}: the records of set {index} do not match head "
                    f"{head.seq}",
                    reason=ReasonCode.DIRECTORY_ROLLBACK,
                )
        return roster

    def add(self, records: Iterable[Any]) -> None:
        """Take verified ``KeyRecord``s (a directory's ``records()``)."""
        with self._lock:
            for record in records:
                self._take(record)

    def _take(self, record: Any) -> None:
        current = self._latest.get(record.principal_id)
        if current is None or record.version > current.version:
            self._latest[record.principal_id] = RosterEntry(
                record.principal_id,
                record.kind,
                record.version,
                tuple(record.groups),
                tuple(record.capabilities),
            )

    def note_kafka(self, key: bytes | None, value: bytes | None) -> bool:
        """Take a key-topic record (not a head) if it is newer than what is known of its
        principal and verifies; False if it was refused, True otherwise (also when it changes
        nothing). Never raises: the key-topic follower reports what the directory refuses."""
        try:  # lenient look first (the version), strict parsing only for what is news
            inner = cbor2.loads(cbor2.loads(value or b"")["record"])
            principal, version = inner["principal"], inner["version"]
        except Exception:
            return False
        current = self._latest.get(principal) if isinstance(principal, str) else None
        if current is not None and isinstance(version, int) and version <= current.version:
            return True
        try:
            signed = from_kafka(value)
            if not isinstance(signed, SignedKeyRecord) or (
                key is not None and bytes(key) != kafka_key(signed.record)
            ):
                return False
            record = verify_signed_record(signed, self._root, self._verifier)
        except Exception:
            return False
        with self._lock:
            self._take(record)
        return True

    def entries(self) -> list[RosterEntry]:
        with self._lock:
            return list(self._latest.values())
