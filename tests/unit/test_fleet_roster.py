"""The fleet-wide roster without an object per vehicle (issue 12): the compact table read from
a directory file, the registry's lookups over it, Cedar entities per decision, and the record
index that lets a worker's directory read only the sets it holds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fleetbus.bus.directory import (
    DirectoryScope,
    FleetRoot,
    IssuedKey,
    KeyDirectory,
    load_directory,
    open_directory_file,
    to_kafka,
    write_directory_file,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.topics import kafka_partition
from fleetbus.processors.fleet_registry import DirectoryRoster, FleetRegistry
from fleetbus.processors.policy import PolicyEngine
from tests.support.envelope import issuer

T0 = time.time()
BUCKETS = 4


def _issue(root: FleetRoot, principal: str, kind: str = "vehicle", **kw: object) -> IssuedKey:
    return issuer(root, "ed25519", T0)(principal, kind, **kw)


def _group(i: int) -> str:
    return f"depot-{i % 3}"


class Fleet:
    """40 vehicles in three depots (every fifth with the qkd capability), an edge unit, a
    dispatcher, and one vehicle rotated to a version 2 that left its depot for ``north``."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = FleetRoot.generate()
        self.path = tmp_path / "directory.cbor"
        issued = [_issue(self.root, "dispatch-1", kind="dispatcher")]
        issued.append(_issue(self.root, "E-1", kind="edge", groups=["depot-0"]))
        self.ids = [f"V-{i:04d}" for i in range(40)]
        for i, vid in enumerate(self.ids):
            caps = ["qkd"] if i % 5 == 0 else []
            issued.append(_issue(self.root, vid, groups=[_group(i)], capabilities=caps))
        issued.append(_issue(self.root, "V-0007", version=2, groups=["north"]))
        self.directory = KeyDirectory(self.root.public)
        self.directory.ingest_all([i.signed for i in issued])
        head = self.root.sign_head(
            self.directory.compute_head(seq=1, at=T0, vehicle_buckets=BUCKETS)
        )
        write_directory_file(self.path, head, self.directory.signed_records())

    def members(self, group: str) -> set[str]:
        out = {v for i, v in enumerate(self.ids) if _group(i) == group and v != "V-0007"}
        out |= {"E-1"} if group == "depot-0" else set()
        return out | ({"V-0007"} if group == "north" else set())


def test_the_roster_table_answers_for_every_vehicle_without_an_entry_per_vehicle(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path)
    roster = DirectoryRoster.from_file(fleet.path, fleet.root.public)
    # Vehicles are rows of the table; only set 0's principals are entries.
    assert {e.principal_id for e in roster.operator_entries()} == {"dispatch-1"}
    assert {e.principal_id for e in roster.vehicle_entries()} == {*fleet.ids, "E-1"}
    for i, vid in enumerate(fleet.ids):
        entry = roster.entry(vid)
        assert entry is not None
        assert entry.kind == "vehicle"
        if vid == "V-0007":  # the latest version of a rotated vehicle, not the first
            assert (entry.version, entry.groups) == (2, ("north",))
        else:
            assert (entry.version, entry.groups) == (1, (_group(i),))
            assert ("qkd" in entry.capabilities) is (i % 5 == 0)
    assert roster.entry("V-9999") is None
    assert roster.entry("V-000") is None  # a prefix of an id is not the id
    for group in ("depot-0", "depot-1", "depot-2", "north"):
        assert roster.group_count(group) == len(fleet.members(group))
        for partitions in (BUCKETS, 3):  # the bucket's rows, or every row hashed again
            found = set()
            for p in range(partitions):
                part = roster.members(group, p, partitions)
                assert all(kafka_partition(v.encode(), partitions) == p for v in part)
                found |= set(part)
            assert found == fleet.members(group)
    assert roster.group_names() == {"depot-0", "depot-1", "depot-2", "north"}


def test_a_live_record_changes_the_roster_and_its_generation(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    roster = DirectoryRoster.from_file(fleet.path, fleet.root.public)
    generation = roster.generation
    moved = _issue(fleet.root, "V-0001", version=2, groups=["north"])
    assert roster.note_kafka(*to_kafka(moved.signed))
    assert roster.generation == generation + 1
    entry = roster.entry("V-0001")
    assert entry is not None
    assert entry.groups == ("north",)
    assert roster.group_count("north") == 2
    assert roster.group_count(_group(1)) == len(fleet.members(_group(1))) - 1
    bucket = kafka_partition(b"V-0001", BUCKETS)
    assert "V-0001" in roster.members("north", bucket, BUCKETS)
    assert "V-0001" not in roster.members(_group(1), bucket, BUCKETS)
    # An older version read again (a restart's catch-up) changes nothing.
    first = next(r for r in fleet.directory.signed_records() if r.record.principal_id == "V-0002")
    assert roster.note_kafka(*to_kafka(first))
    assert roster.generation == generation + 1


def test_the_registry_merges_its_file_over_the_roster(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    roster = DirectoryRoster.from_file(fleet.path, fleet.root.public)
    registry = FleetRegistry.from_mapping(
        {
            "vehicles": {
                "V-0001": {"groups": ["north"], "attributes": {"region": "eu"}},
                "T-1": {"groups": ["north"]},  # in the file only
            }
        }
    ).with_roster(roster)
    vehicle = registry.vehicle("V-0001")
    assert vehicle is not None
    assert vehicle.groups == {_group(1), "north"}
    assert vehicle.attributes == {"kind": "vehicle", "region": "eu"}
    assert registry.vehicle("T-1") is not None
    assert registry.vehicle("dispatch-1") is None  # an operator is not a vehicle
    assert registry.operators["dispatch-1"].roles == {"dispatcher"}
    assert registry.group_size("north") == 3  # V-0007 by its record, V-0001 and T-1 by the file
    members = [v for p in range(BUCKETS) for v in registry.partition_members("north", p, BUCKETS)]
    assert sorted(members) == ["T-1", "V-0001", "V-0007"]
    assert registry.group_members("north") == ["T-1", "V-0001", "V-0007"]


def test_cedar_holds_no_entity_per_vehicle_and_decides_on_the_vehicle_it_is_asked(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path)
    roster = DirectoryRoster.from_file(fleet.path, fleet.root.public)
    policy = (
        'permit(principal, action, resource in Group::"north");\n'
        "permit(principal, action, resource) when { resource.qkd };\n"
    )
    engine = PolicyEngine(FleetRegistry.from_mapping({}).with_roster(roster), policy_text=policy)
    # Roles, the operator, four groups, the actions and field sets: no vehicle.
    listed = engine._entity_list()
    assert not [e for e in listed if e["uid"]["type"] == "Vehicle"]
    assert len(engine._entities) == len(listed)

    def allowed(vid: str) -> bool:
        return engine.decide_command(
            issuer="dispatch-1",
            action="lock_doors",
            vehicle=vid,
            group=None,
            approvals=0,
            required_approvals=0,
            now=T0,
        ).allowed

    assert allowed("V-0007")  # in north by its version 2
    assert allowed("V-0005")  # qkd
    assert not allowed("V-0001")
    assert not allowed("V-9999")  # nobody knows it: no attributes, no groups
    # A live change is decided on at once: the roster's generation empties the decision cache.
    assert roster.note_kafka(*to_kafka(_issue(fleet.root, "V-0001", version=2).signed))
    assert not allowed("V-0001")
    assert roster.note_kafka(
        *to_kafka(_issue(fleet.root, "V-0001", version=3, groups=["north"]).signed)
    )
    assert allowed("V-0001")


def test_a_directory_loads_its_sets_by_position_from_the_roster_pass(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    roster = DirectoryRoster.from_file(fleet.path, fleet.root.public)
    assert roster.file is not None
    assert roster.index is not None
    for buckets in (frozenset(), frozenset({1}), None):
        scope = DirectoryScope(buckets=buckets)
        with open_directory_file(fleet.path, scope=scope) as stream:
            streamed = sorted(i.data for i in stream.records)
        with open_directory_file(
            fleet.path, scope=scope, file=roster.file, index=roster.index
        ) as stream:
            indexed = sorted(i.data for i in stream.records)
        assert streamed == indexed
        if buckets == frozenset():  # set 0: the dispatcher and the edge unit
            assert len(indexed) == 2
    directory = load_directory(
        fleet.path,
        fleet.root.public,
        scope=DirectoryScope(buckets=frozenset({1})),
        file=roster.file,
        index=roster.index,
    )
    bucket_1 = {v for v in fleet.ids if kafka_partition(v.encode(), BUCKETS) == 1}
    assert {v for v in fleet.ids if directory.wants(v, "vehicle")} == bucket_1
    assert all(directory.latest(v) is not None for v in bucket_1)


def test_a_file_changed_in_place_after_the_roster_pass_is_refused(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    roster = DirectoryRoster.from_file(fleet.path, fleet.root.public)
    data = bytearray(fleet.path.read_bytes())
    # One byte of a vehicle's public key (what the head commits to), changed under the open file.
    key = next(iter(fleet.directory.latest("V-0005").public_keys.values()))
    at = data.index(key)
    data[at] ^= 0x01
    with open(fleet.path, "r+b") as fh:
        fh.write(bytes(data))
    with pytest.raises(FleetbusError) as exc:
        load_directory(
            fleet.path,
            fleet.root.public,
            file=roster.file,
            index=roster.index,
        )
    # Refused whichever check meets the change first (set digest, signature, parse).
    assert exc.value.reason in {
        ReasonCode.DIRECTORY_ROLLBACK,
        ReasonCode.BAD_SIGNATURE,
        ReasonCode.MALFORMED,
    }


def test_the_roster_refuses_an_unreadable_record(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    with open_directory_file(fleet.path) as stream:
        head = stream.head
        records = [i.data for i in stream.records]
    assert head is not None
    write_directory_file(fleet.path, head, [*records[:-1], b"\xa1\x66record\x41\x00"])
    with pytest.raises(FleetbusError) as exc:
        DirectoryRoster.from_file(fleet.path, fleet.root.public)
    assert exc.value.reason is ReasonCode.MALFORMED
    assert json.dumps(str(exc.value)).count("directory file") == 1


def test_a_worker_on_a_headless_file_is_told_how_to_migrate(tmp_path: Path) -> None:
    import cbor2

    from fleetbus.bus.settings import FleetbusSettings
    from fleetbus.processors.app import load_worker_directory

    fleet = Fleet(tmp_path)
    signed = fleet.directory.signed_records()
    fleet.path.write_bytes(cbor2.dumps([s.to_cbor() for s in signed]))  # the v1 file
    settings = FleetbusSettings(data_dir=str(tmp_path / "state"))
    with pytest.raises(FleetbusError) as exc:
        load_worker_directory(settings, fleet.root.public, fleet.path)
    assert exc.value.reason is ReasonCode.CONFIG
    assert "keys migrate" in str(exc.value)


def test_the_key_topic_is_read_from_the_files_head_never_from_a_newer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetbus.bus.settings import FleetbusSettings
    from fleetbus.processors.keytopic import PartitionBuckets
    from fleetbus.sdk.keytopic import KeyTopicFollower, KeyTopicReader

    fleet = Fleet(tmp_path)
    roster = DirectoryRoster.from_file(fleet.path, fleet.root.public)
    assert roster.head is not None
    file_time = roster.head.issued_at
    directory = load_directory(fleet.path, fleet.root.public, scope=DirectoryScope(frozenset()))
    settings = FleetbusSettings(partitions=BUCKETS, key_topic_read_margin_s=600.0)
    follower = KeyTopicFollower(directory, role="test")
    assert KeyTopicReader(settings, follower).since() == file_time - 600.0
    whole = settings.model_copy(update={"key_topic_read_margin_s": -1.0})
    assert KeyTopicReader(whole, follower).since() is None
    assert (
        KeyTopicReader(
            settings, KeyTopicFollower(KeyDirectory(fleet.root.public), role="t")
        ).since()
        is None
    )

    asked: list[float | None] = []
    monkeypatch.setattr(
        KeyTopicReader, "start", lambda self, timeout_s=30.0, *, since=None: asked.append(since)
    )
    # The directory takes a newer head from the topic; a bucket's re-read still starts at the
    # file's head: that bucket's records published since were not kept.
    newer = fleet.root.sign_head(
        fleet.directory.compute_head(seq=2, at=file_time + 7200, vehicle_buckets=BUCKETS)
    )
    directory.ingest_head(newer)
    PartitionBuckets(settings, directory, fleet.path, roster=roster).reread_topic(follower)
    PartitionBuckets(whole, directory, fleet.path, roster=roster).reread_topic(follower)
    PartitionBuckets(settings, directory, fleet.path).reread_topic(follower)  # no roster
    assert asked == [file_time - 600.0, 0.0, 0.0]


def test_a_new_bucket_count_re_divides_a_directory_without_parsing_its_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = Fleet(tmp_path)
    directory = load_directory(fleet.path, fleet.root.public)  # vehicles held by position
    head = fleet.root.sign_head(fleet.directory.compute_head(seq=2, at=T0, vehicle_buckets=7))
    parsed: list[str] = []
    parse = KeyDirectory._parse

    def counting(self: KeyDirectory, key_id: str, held: object, **kw: bool) -> object:
        parsed.append(key_id)
        return parse(self, key_id, held, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(KeyDirectory, "_parse", counting)
    directory.ingest_head(head)
    assert parsed == []  # a 10^6 fleet held by position is not read back under the lock
    assert directory.unsettled_sets() == []
    for vid in fleet.ids:
        assert directory.recipient_keys(vid, at=T0)


def test_group_names_nobody_is_in_are_not_remembered(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    registry = FleetRegistry().with_roster(DirectoryRoster.from_file(fleet.path, fleet.root.public))
    for n in range(100):
        assert registry.group_size(f"no-such-group-{n}") == 0
    assert registry.group_size("north") == 1
    assert len(registry._cache) == 2  # the roster's generation and north


def test_a_head_dated_ahead_of_the_clock_does_not_move_the_read_past_now(tmp_path: Path) -> None:
    from fleetbus.sdk.keytopic import read_from

    fleet = Fleet(tmp_path)
    roster = DirectoryRoster.from_file(fleet.path, fleet.root.public)
    assert roster.head is not None
    at = roster.head.issued_at
    assert read_from(roster.head, 600.0, now=at + 3600) == at - 600.0
    # A root holder's clock a day ahead: read from the reader's now less the margin.
    assert read_from(roster.head, 600.0, now=at - 86400) == at - 86400 - 600.0
    assert read_from(roster.head, -1.0, now=at) is None
    assert read_from(None, 600.0, now=at) is None
