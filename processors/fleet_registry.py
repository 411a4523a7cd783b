"""Who is who in the fleet for policy: operators and their roles, vehicles and their groups,
actions and their criticality.

Vehicles, groups and capabilities come from the key directory's records (the fleet root vouches
for them); an optional registry file (JSON or YAML, ``keys_dir/fleet.json`` by default) adds
operator roles, vehicle attributes, extra group memberships and the action catalogue.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import itertools
import json
import threading
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from fleetbus.bus.directory import (
    DEFAULT_VEHICLE_BUCKETS,
    DirectoryHead,
    RecordFile,
    RecordIndex,
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
from fleetbus.bus.topics import kafka_partition

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
#: Key-directory kinds the registry treats as vehicles (command targets, group members).
_VEHICLE_KINDS = frozenset({"vehicle", "edge"})


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
    """Operators, actions and the vehicles the registry file names (``vehicles``: what the file
    adds), over a ``DirectoryRoster`` of the key directory's principals (``roster``): a vehicle
    is looked up when a decision needs it (``vehicle``), never listed whole, so a worker of a
    10^6-vehicle fleet holds no object per vehicle (docs/policy.md, "Fleet scale")."""

    operators: dict[str, Operator] = field(default_factory=dict)
    vehicles: dict[str, Vehicle] = field(default_factory=dict)
    actions: dict[str, ActionSpec] = field(default_factory=dict)
    roster: DirectoryRoster | None = None
    # Derived indexes (group sizes, members per partition), computed once per roster change.
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def criticality(self, action: str) -> str | None:
        spec = self.actions.get(action)
        return None if spec is None else spec.criticality

    def vehicle(self, vehicle_id: str) -> Vehicle | None:
        """The vehicle (or edge unit): its directory record's groups and capabilities with what
        the registry file adds, or the file's entry alone; None if neither knows it."""
        extra = self.vehicles.get(vehicle_id)
        entry = None if self.roster is None else self.roster.entry(vehicle_id)
        if entry is None or entry.kind not in _VEHICLE_KINDS:
            return extra
        extra = extra or Vehicle(vehicle_id)
        return Vehicle(
            vehicle_id,
            groups=frozenset(entry.groups) | extra.groups,
            capabilities=frozenset(entry.capabilities) | extra.capabilities,
            attributes={"kind": entry.kind, **dict(extra.attributes)},
        )

    def groups(self) -> dict[str, list[str]]:
        """Every group and its members: a listing of the whole fleet (tools and tests; the
        stages ask ``group_size`` and ``partition_members``)."""
        ids = set(self.vehicles)
        if self.roster is not None:
            ids.update(e.principal_id for e in self.roster.vehicle_entries())
        out: dict[str, list[str]] = {}
        for vid in sorted(ids):
            vehicle = self.vehicle(vid)
            for group in vehicle.groups if vehicle is not None else ():
                out.setdefault(group, []).append(vid)
        return out

    def group_names(self) -> list[str]:
        names = {g for v in self.vehicles.values() for g in v.groups}
        if self.roster is not None:
            names.update(self.roster.group_names())
        return sorted(names)

    def group_members(self, group: str) -> list[str]:
        return self.groups().get(group, [])

    def _fresh(self) -> None:
        """Empty the derived indexes if the roster changed since they were computed."""
        generation = None if self.roster is None else self.roster.generation
        if self._cache.get("generation", generation) != generation:
            self._cache.clear()
        self._cache["generation"] = generation

    def _cached(self, key: Any, compute: Any) -> Any:
        self._fresh()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _file_only(self, group: str) -> list[str]:
        """Members the registry file adds to ``group`` that the directory does not put there."""
        out = []
        for vid, extra in self.vehicles.items():
            if group in extra.groups:
                entry = None if self.roster is None else self.roster.entry(vid)
                if entry is None or entry.kind not in _VEHICLE_KINDS or group not in entry.groups:
                    out.append(vid)
        return out

    def group_size(self, group: str) -> int:
        """How many vehicles ``group`` has: what the authorize stage needs of a group (its Cedar
        context and "no vehicles"), counted per profile by the roster, not per vehicle."""

        def count() -> int:
            listed = 0 if self.roster is None else self.roster.group_count(group)
            return listed + len(self._file_only(group))

        self._fresh()
        key = ("size", group)
        if key not in self._cache:
            size = count()
            if not size:  # not remembered: any name a command carries would be
                return 0
            self._cache[key] = size
        return int(self._cache[key])

    def partition_members(self, group: str, partition: int, partitions: int) -> list[str]:
        """The members of ``group`` whose records Kafka puts on ``partition`` of a topic keyed
        by vehicle id (``partitions`` partitions): what one seal-stage partition expands a
        group command to. From the roster's rows of that partition's bucket when buckets are
        partitions; computed once per roster change and partition."""

        def members() -> list[str]:
            found = (
                set()
                if self.roster is None
                else set(self.roster.members(group, partition, partitions))
            )
            found.update(
                vid
                for vid in self._file_only(group)
                if kafka_partition(vid.encode(), partitions) == partition
            )
            return sorted(found)

        return list(self._cached(("members", group, partition, partitions), members))

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
        """This registry over key-directory records (``KeyRecord`` or ``RosterEntry``): a roster
        of them, unchecked (they come verified from a directory)."""
        roster = DirectoryRoster(None)
        roster.add(records)
        return self.with_roster(roster)

    def with_roster(self, roster: DirectoryRoster) -> FleetRegistry:
        """This registry over ``roster``: vehicles and edge units with their groups and
        capabilities (looked up, never copied), dispatchers and approvers with roles from
        their kind. The file's entries add to what the directory says; they never remove a
        directory group or capability."""
        merged = FleetRegistry(
            operators=dict(self.operators),
            vehicles=dict(self.vehicles),
            actions=dict(self.actions),
            roster=roster,
        )
        for entry in roster.operator_entries():
            if entry.kind in _ROLES_BY_KIND:
                extra_op = merged.operators.get(entry.principal_id)
                roles = _ROLES_BY_KIND[entry.kind] if extra_op is None else extra_op.roles
                merged.operators[entry.principal_id] = Operator(entry.principal_id, roles)
        return merged


@dataclass(frozen=True)
class RosterEntry:
    """What the registry takes from a principal's latest key record (no key material)."""

    principal_id: str
    kind: str
    version: int
    groups: tuple[str, ...]
    capabilities: tuple[str, ...]


class _Ids:
    """Row ``i``'s vehicle id (bytes) of a roster's table, as a sequence ``bisect`` searches."""

    def __init__(self, blob: bytes, starts: array[int]) -> None:
        self._blob, self._starts = blob, starts

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, row: int) -> bytes:
        return self._blob[self._starts[row] : self._starts[row + 1]]


class DirectoryRoster:
    """Every principal's latest record, without keys: the fleet-wide input of the registry.

    A directory file's vehicles (``from_file``) are held as a table of about 30 bytes per
    vehicle: their ids in one byte string sorted by (bucket, id), a version and a profile per
    row, a profile being one (kind, groups, capabilities) the fleet's records share. Other
    principals, records ``add``-ed and every record of the key topic that would change what is
    known (``note_kafka``, each checked against the fleet root first) are held as entries. A
    record that changes nothing (an older or equal version: what a restart re-reads) is not
    verified. Written by the key-topic follower, read by the stages' threads; ``generation``
    counts the changes (the registry's derived indexes follow it).
    """

    def __init__(
        self, root: RootPublicKey | None, vehicle_buckets: int = DEFAULT_VEHICLE_BUCKETS
    ) -> None:
        self._root = root
        self._verifier = None if root is None else root.verifier()
        self._lock = threading.Lock()
        self._latest: dict[str, RosterEntry] = {}
        self.generation = 0
        self.buckets = vehicle_buckets
        # The file's vehicles: row i is _ids[i], sorted by (bucket, id); bucket b's rows are
        # _bucket_rows[b]:_bucket_rows[b + 1].
        self._ids = _Ids(b"", array("Q", [0]))
        self._versions: array[int] = array("Q")
        self._profile_of: array[int] = array("I")
        self._profiles: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
        self._profile_rows: list[int] = []
        self._bucket_rows: array[int] = array("Q", [0] * (vehicle_buckets + 1))
        self._row_partitions: dict[int, array[int]] = {}  # partition count -> row's partition
        #: The directory file read, open, and where its records are (``load_directory``).
        self.file: RecordFile | None = None
        self.index: RecordIndex | None = None
        self.head: DirectoryHead | None = None  # the file's

    @classmethod
    def from_file(cls, path: Path, root: RootPublicKey) -> DirectoryRoster:
        """Every principal of a directory file (``directory.cbor``), authenticated by its head,
        in one pass over it (its structure read strictly, ``open_directory_file``): each
        record's bytes are hashed into its set's digest, which must match the head's (else
        ``DIRECTORY_ROLLBACK``, as ``load_directory`` refuses such a file). Only the fields the
        registry needs are decoded: no public keys parsed, no signature but the head's
        verified. The pass also notes where each record is (``index``), so the worker's
        directory then reads only the sets it holds."""
        with open_directory_file(path) as stream:  # streamed: never the whole file in memory
            if stream.head is None:
                raise ConfigError(f"directory file {path}: expected a head and records")
            head = verify_signed_head(stream.head, root)
            roster = cls(root, head.vehicle_buckets)
            roster.head = head
            index = RecordIndex()
            sets: list[list[tuple[str, bytes]]] = [[] for _ in head.sets]
            rows: list[tuple[int, bytes, int, int]] = []
            profiles: dict[tuple[str, tuple[str, ...], tuple[str, ...]], int] = {}
            try:
                for item in stream.records:
                    record_cbor = cbor2.loads(item.data)["record"]
                    inner = cbor2.loads(record_cbor)
                    principal, kind, version = inner["principal"], inner["kind"], inner["version"]
                    number = principal_set(principal, kind, head.vehicle_buckets)
                    sets[number].append((inner["kid"], hashlib.sha256(record_cbor).digest()))
                    index.add(number, item.offset, len(item.data))
                    profile = (kind, tuple(inner["groups"]), tuple(inner["caps"]))
                    if kind != "vehicle":
                        roster._take(RosterEntry(principal, kind, version, *profile[1:]))
                        continue
                    rows.append(
                        (
                            number,
                            principal.encode(),
                            version,
                            profiles.setdefault(profile, len(profiles)),
                        )
                    )
                roster._fill(rows, list(profiles))
            except FleetbusError:
                raise
            except Exception:
                raise FleetbusError(
                    f"directory file {path}: a record is not readable",
                    reason=ReasonCode.MALFORMED,
                ) from None
            roster.file = stream.file
        roster.index = index
        for number, ((count, digest), entries) in enumerate(zip(head.sets, sets, strict=True)):
            if len(entries) != count or not hmac.compare_digest(set_digest(entries), digest):
                raise FleetbusError(
                    f"directory file {path}: the records of set {number} do not match head "
                    f"{head.seq}",
                    reason=ReasonCode.DIRECTORY_ROLLBACK,
                )
        return roster

    def _fill(
        self,
        rows: list[tuple[int, bytes, int, int]],
        profiles: list[tuple[str, tuple[str, ...], tuple[str, ...]]],
    ) -> None:
        """The table from (set, id, version, profile) rows: the latest version of each id."""
        rows.sort()
        blob, starts = bytearray(), array("Q", [0])
        per_bucket = [0] * self.buckets
        counts = [0] * len(profiles)
        for i, (number, vid, version, profile) in enumerate(rows):
            if i + 1 < len(rows) and rows[i + 1][:2] == (number, vid):
                continue  # an older version of the next row's vehicle
            blob += vid
            starts.append(len(blob))
            self._versions.append(version)
            self._profile_of.append(profile)
            per_bucket[number - 1] += 1
            counts[profile] += 1
        self._ids = _Ids(bytes(blob), starts)
        self._bucket_rows = array("Q", itertools.accumulate(per_bucket, initial=0))
        self._profiles, self._profile_rows = profiles, counts

    def _row(self, principal: str) -> int | None:
        if not self._versions:
            return None
        key = principal.encode()
        bucket = kafka_partition(key, self.buckets)
        low, high = self._bucket_rows[bucket], self._bucket_rows[bucket + 1]
        row = bisect.bisect_left(self._ids, key, low, high)
        return row if row < high and self._ids[row] == key else None

    def _table_entry(self, row: int, principal: str) -> RosterEntry:
        kind, groups, capabilities = self._profiles[self._profile_of[row]]
        return RosterEntry(principal, kind, self._versions[row], groups, capabilities)

    def entry(self, principal: str) -> RosterEntry | None:
        """What is known of ``principal``'s latest record (None: nothing)."""
        live = self._latest.get(principal)
        if live is not None:  # taken only when newer than the table's row
            return live
        row = self._row(principal)
        return None if row is None else self._table_entry(row, principal)

    def add(self, records: Iterable[Any]) -> None:
        """Take verified ``KeyRecord``s (a directory's ``records()``) or ``RosterEntry``s."""
        with self._lock:
            for record in records:
                self._take(record)

    def _take(self, record: Any) -> None:
        current = self.entry(record.principal_id)
        if current is None or record.version > current.version:
            self._latest[record.principal_id] = RosterEntry(
                record.principal_id,
                record.kind,
                record.version,
                tuple(record.groups),
                tuple(record.capabilities),
            )
            self.generation += 1

    def note_kafka(self, key: bytes | None, value: bytes | None) -> bool:
        """Take a key-topic record (not a head) if it is newer than what is known of its
        principal and verifies; False if it was refused, True otherwise (also when it changes
        nothing). Never raises: the key-topic follower reports what the directory refuses."""
        try:  # lenient look first (the version), strict parsing only for what is news
            inner = cbor2.loads(cbor2.loads(value or b"")["record"])
            principal, version = inner["principal"], inner["version"]
        except Exception:
            return False
        current = self.entry(principal) if isinstance(principal, str) else None
        if current is not None and isinstance(version, int) and version <= current.version:
            return True
        if self._root is None or self._verifier is None:
            return False
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

    def vehicle_entries(self) -> Iterator[RosterEntry]:
        """Every vehicle and edge unit, one entry each (a listing of the whole fleet)."""
        live = dict(self._latest)
        for row in range(len(self._versions)):
            principal = self._ids[row].decode()
            if principal not in live:
                yield self._table_entry(row, principal)
        yield from (e for e in live.values() if e.kind in _VEHICLE_KINDS)

    def operator_entries(self) -> list[RosterEntry]:
        """Every principal that is not a vehicle or edge unit (sealers, dispatchers, approvers)."""
        return [e for e in list(self._latest.values()) if e.kind not in _VEHICLE_KINDS]

    def entries(self) -> list[RosterEntry]:
        return [*self.vehicle_entries(), *self.operator_entries()]

    def group_names(self) -> set[str]:
        names = {
            g
            for (_, groups, _), n in zip(self._profiles, self._profile_rows, strict=True)
            if n
            for g in groups
        }
        names.update(
            g for e in list(self._latest.values()) if e.kind in _VEHICLE_KINDS for g in e.groups
        )
        return names

    def group_count(self, group: str) -> int:
        """How many vehicles and edge units are in ``group``: per profile, not per vehicle."""
        count = sum(
            n for (_, g, _), n in zip(self._profiles, self._profile_rows, strict=True) if group in g
        )
        for entry in list(self._latest.values()):
            row = self._row(entry.principal_id)
            if row is not None and group in self._profiles[self._profile_of[row]][1]:
                count -= 1  # the table's row is older than this entry
            if entry.kind in _VEHICLE_KINDS and group in entry.groups:
                count += 1
        return count

    def members(self, group: str, partition: int, partitions: int) -> list[str]:
        """The vehicles and edge units of ``group`` Kafka puts on ``partition`` of a topic keyed
        by vehicle id: the rows of that bucket only when buckets are the partitions."""
        wanted = {i for i, (_, groups, _) in enumerate(self._profiles) if group in groups}
        if partitions == self.buckets:
            rows: Iterable[int] = range(
                self._bucket_rows[partition], self._bucket_rows[partition + 1]
            )
        else:  # buckets are not the partitions: every row's partition, hashed once per count
            of_row = self._row_partitions.get(partitions)
            if of_row is None:
                ids = self._ids
                of_row = array("I", (kafka_partition(ids[r], partitions) for r in range(len(ids))))
                self._row_partitions[partitions] = of_row
            rows = (r for r, p in enumerate(of_row) if p == partition)
        live = dict(self._latest)
        out = [
            vid
            for r in rows
            if self._profile_of[r] in wanted and (vid := self._ids[r].decode()) not in live
        ]
        out += [
            e.principal_id
            for e in live.values()
            if e.kind in _VEHICLE_KINDS
            and group in e.groups
            and kafka_partition(e.principal_id.encode(), partitions) == partition
        ]
        return out
