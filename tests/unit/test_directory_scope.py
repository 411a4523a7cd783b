"""A worker's key directory scoped to its partitions (``directory_scope`` partitions, issue 12):
which buckets it holds as assignments change, what it loads and drops, and what a vehicle
outside them meets. Without Kafka: the key-topic re-read is fed from a list. The same on the
real broker: ``tests/integration/test_directory_scope_live.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from fleetbus.bus.commands import Telemetry
from fleetbus.bus.directory import (
    DirectoryScope,
    FleetRoot,
    IssuedKey,
    KeyDirectory,
    SignedDirectoryHead,
    head_to_kafka,
    issue_key,
    load_directory,
    record_set,
    to_kafka,
    write_directory_file,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import KeyPath
from fleetbus.bus.registry import load_key_provider
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.bus.topics import kafka_partition
from fleetbus.observability.metrics import DIRECTORY_SCOPE_FALLBACK, DIRECTORY_VEHICLES_HELD
from fleetbus.processors.eos import DeadLetter, InputRecord, PartitionState, StageResult
from fleetbus.processors.fleet_registry import DirectoryRoster, FleetRegistry
from fleetbus.processors.keytopic import KeyTopicService, PartitionBuckets
from fleetbus.processors.stages import (
    PipelineTopics,
    TelemetryStage,
    UplinkOpener,
    profile_from_settings,
)
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
from fleetbus.providers.sealing import EnvelopeOpener, EnvelopeSealer
from fleetbus.sdk.keytopic import KeyTopicFollower, KeyTopicItem
from tests.support.envelope import fleet_of, issuer, unconnected

T0 = 1_800_000_000.0
DAY = 86400.0
PARTITIONS = 4


def _issue(root: FleetRoot, principal: str, kind: str = "vehicle", **kw: object) -> IssuedKey:
    return issue_key(
        root,
        principal_id=principal,
        kind=kind,
        signature_suite="ed25519",
        not_before=T0 - DAY,
        not_after=T0 + 30 * DAY,
        **kw,  # type: ignore[arg-type]
    )


class Fleet:
    """A root, a dispatcher and vehicles on every one of ``PARTITIONS`` buckets, written to a
    directory file whose head has ``buckets`` buckets."""

    def __init__(self, tmp_path: Path, buckets: int = PARTITIONS) -> None:
        self.root = FleetRoot.generate()
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.path = tmp_path / "directory.cbor"
        self.dispatcher = _issue(self.root, "dispatch-1", kind="dispatcher")
        self.vehicles: dict[str, IssuedKey] = {}
        for i in range(24):
            vid = f"V-{i:04d}"
            self.vehicles[vid] = _issue(self.root, vid, groups=["depot"])
        self.buckets = buckets
        self.seq = 0
        self.whole = KeyDirectory(self.root.public)
        self.whole.ingest_all([self.dispatcher.signed, *(v.signed for v in self.vehicles.values())])
        self.head = self.next_head()
        write_directory_file(self.path, self.head, self.whole.signed_records())

    def next_head(self) -> SignedDirectoryHead:
        self.seq += 1
        head = self.whole.compute_head(seq=self.seq, at=T0, vehicle_buckets=self.buckets)
        return self.root.sign_head(head)

    def bucket(self, vid: str) -> int:
        return record_set(self.vehicles[vid].signed.record, PARTITIONS) - 1

    def on(self, bucket: int) -> str:
        return next(v for v in sorted(self.vehicles) if self.bucket(v) == bucket)

    def revoke(self, vid: str) -> list[KeyTopicItem]:
        """The revocation of ``vid``'s key and the head after it, as key-topic items."""
        signed = self.root.sign(self.vehicles[vid].signed.record.revocation(at=T0))
        self.whole.ingest(signed)
        items = [to_kafka(signed), head_to_kafka(self.next_head())]
        return [KeyTopicItem("keys", 0, n, k, v) for n, (k, v) in enumerate(items)]


def _worker(fleet: Fleet, topic: list[KeyTopicItem]) -> tuple[KeyDirectory, PartitionBuckets]:
    directory = load_directory(
        fleet.path, fleet.root.public, scope=DirectoryScope(buckets=frozenset())
    )
    settings = FleetbusSettings(partitions=PARTITIONS, directory_scope="partitions")
    buckets = PartitionBuckets(settings, directory, fleet.path)

    def reread(follower: KeyTopicFollower) -> None:
        for item in topic:
            follower.apply(item)
        follower.finish_catch_up()

    buckets.reread_topic = reread  # type: ignore[method-assign]
    return directory, buckets


def _serves(directory: KeyDirectory, fleet: Fleet, vid: str) -> bool:
    """True if ``vid``'s key verifies here; False if it is unknown (anything else fails)."""
    key_id = fleet.vehicles[vid].signed.record.key_id
    try:
        directory.verifier_for(vid, key_id, at=T0)
    except FleetbusError as exc:
        if exc.reason is not ReasonCode.UNKNOWN_SIGNER:
            raise
        return False
    return True


def test_the_scope_is_the_union_of_the_vehicle_keyed_stages_partitions(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    directory, buckets = _worker(fleet, [])

    async def scenario() -> None:
        await buckets.assigned("seal", frozenset({0, 1}))
        await buckets.assigned("telemetry", frozenset({1, 2}))
        assert directory.scope.buckets == frozenset({0, 1, 2})
        # A revocation alone drops nothing: the assignment that ends the rebalance does.
        await buckets.revoked("seal", frozenset())
        assert directory.scope.buckets == frozenset({0, 1, 2})
        await buckets.assigned("seal", frozenset({3}))
        # Bucket 1 stays (telemetry still holds it); bucket 0 goes.
        assert directory.scope.buckets == frozenset({1, 2, 3})
        # While another stage's group is between revocation and assignment, nothing goes:
        # the bucket it gave up may come back to it.
        await buckets.revoked("telemetry", frozenset())
        await buckets.revoked("seal", frozenset())
        await buckets.assigned("seal", frozenset({3}))
        assert directory.scope.buckets == frozenset({1, 2, 3})
        await buckets.assigned("telemetry", frozenset({1}))
        assert directory.scope.buckets == frozenset({1, 3})

    asyncio.run(scenario())
    held = {v for v in fleet.vehicles if _serves(directory, fleet, v)}
    assert held == {v for v in fleet.vehicles if fleet.bucket(v) in {1, 3}}
    assert DIRECTORY_VEHICLES_HELD._value.get() == len(held)
    # Set 0 is always held.
    directory.verifier_for("dispatch-1", fleet.dispatcher.signed.record.key_id, at=T0)


def test_a_vehicle_of_a_revoked_partition_meets_an_unknown_key(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    directory, buckets = _worker(fleet, [])
    vid = fleet.on(2)

    async def scenario() -> None:
        await buckets.assigned("seal", frozenset({2}))
        assert _serves(directory, fleet, vid)
        assert directory.recipient_keys(vid, at=T0).principal_id == vid
        await buckets.revoked("seal", frozenset())
        await buckets.assigned("seal", frozenset())

    asyncio.run(scenario())
    assert not _serves(directory, fleet, vid)
    with pytest.raises(FleetbusError) as exc:
        directory.recipient_keys(vid, at=T0)
    assert exc.value.reason is ReasonCode.UNKNOWN_KEY_ID
    assert directory.vehicles_held() == 0
    # The follower skips its records now: they stay unknown, never a stale copy.
    follower = KeyTopicFollower(directory, role="worker")
    follower.finish_catch_up()
    key, value = to_kafka(fleet.vehicles[vid].signed)
    assert follower.apply(KeyTopicItem("keys", 0, 0, key, value)) == "skipped"
    assert not _serves(directory, fleet, vid)


def test_a_bucket_taken_but_not_loaded_refuses_its_keys_rather_than_guessing(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path)
    directory = load_directory(
        fleet.path, fleet.root.public, scope=DirectoryScope(buckets=frozenset())
    )
    vid = fleet.on(1)
    directory.hold_buckets({1})
    directory.ingest(fleet.vehicles[vid].signed)  # one record of the set, not all of it
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for(vid, fleet.vehicles[vid].signed.record.key_id, at=T0)
    assert exc.value.reason is ReasonCode.DIRECTORY_ROLLBACK


def test_a_revocation_on_the_key_topic_applies_to_held_vehicles(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    directory, buckets = _worker(fleet, [])
    vid = fleet.on(0)
    asyncio.run(buckets.assigned("responses", frozenset({0})))
    assert _serves(directory, fleet, vid)
    follower = KeyTopicFollower(directory, role="worker")
    follower.finish_catch_up()
    for item in fleet.revoke(vid):
        assert follower.apply(item) == "applied"
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for(vid, fleet.vehicles[vid].signed.record.key_id, at=T0)
    assert exc.value.reason is ReasonCode.SIGNER_REVOKED
    # The other vehicles of the bucket match the new head.
    other = next(v for v in sorted(fleet.vehicles) if fleet.bucket(v) == 0 and v != vid)
    assert _serves(directory, fleet, other)


def test_a_bucket_loaded_later_gets_the_revocations_the_file_does_not_have(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path)
    vid = fleet.on(3)
    topic = fleet.revoke(vid)  # published after the file was written
    directory, buckets = _worker(fleet, topic)
    follower = KeyTopicFollower(directory, role="worker")
    for item in topic:  # the worker's catch-up: bucket 3 is not held, the head is
        follower.apply(item)
    follower.finish_catch_up()
    assert directory.head is not None
    assert directory.head.seq == 2
    asyncio.run(buckets.assigned("seal", frozenset({3})))
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for(vid, fleet.vehicles[vid].signed.record.key_id, at=T0)
    assert exc.value.reason is ReasonCode.SIGNER_REVOKED
    other = next(v for v in sorted(fleet.vehicles) if fleet.bucket(v) == 3 and v != vid)
    assert _serves(directory, fleet, other)
    assert directory.unsettled_sets() == []


def test_another_bucket_count_falls_back_to_the_whole_fleet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = Fleet(tmp_path, buckets=8)
    directory, buckets = _worker(fleet, [])
    with caplog.at_level(logging.WARNING):
        asyncio.run(buckets.assigned("seal", frozenset({0})))
    assert buckets.fallback
    assert DIRECTORY_SCOPE_FALLBACK._value.get() == 1
    assert "8 vehicle buckets but the topics have 4 partitions" in caplog.text
    assert all(_serves(directory, fleet, v) for v in fleet.vehicles)


def test_the_worker_falls_back_at_start_and_keeps_the_registry_fleet_wide(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fleetbus.processors.app import load_worker_directory

    fleet = Fleet(tmp_path, buckets=8)
    settings = FleetbusSettings(
        partitions=PARTITIONS, directory_scope="partitions", data_dir=str(tmp_path / "state")
    )
    with caplog.at_level(logging.WARNING):
        directory, roster = load_worker_directory(settings, fleet.root.public, fleet.path)
    assert directory.scope.buckets is None
    assert directory.vehicles_held() == len(fleet.vehicles)
    assert DIRECTORY_SCOPE_FALLBACK._value.get() == 1
    assert "8 vehicle buckets but the topics have 4 partitions" in caplog.text

    scoped = Fleet(tmp_path / "p")
    settings = settings.model_copy(update={"data_dir": str(tmp_path / "p-state")})
    directory, roster = load_worker_directory(settings, scoped.root.public, scoped.path)
    assert directory.scope.buckets == frozenset()
    assert directory.vehicles_held() == 0
    assert DIRECTORY_SCOPE_FALLBACK._value.get() == 0
    registry = FleetRegistry().with_roster(roster)
    assert set(registry.group_members("depot")) == set(scoped.vehicles)
    assert registry.group_size("depot") == len(scoped.vehicles)
    assert all(registry.vehicle(v) is not None for v in scoped.vehicles)


def test_the_roster_takes_only_newer_records_that_the_root_signed(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    roster = DirectoryRoster(fleet.root.public)
    roster.add(r.record for r in fleet.whole.signed_records())
    live = _issue(fleet.root, "V-live", groups=["depot"])
    assert roster.note_kafka(*to_kafka(live.signed))
    forged = _issue(FleetRoot.generate(), "V-forged")
    assert not roster.note_kafka(*to_kafka(forged.signed))
    assert not roster.note_kafka(b"V-x/k", b"\xff not cbor")
    # An equal version changes nothing and is not even verified (what a restart re-reads).
    assert roster.note_kafka(*to_kafka(fleet.vehicles["V-0001"].signed))
    ids = {e.principal_id for e in roster.entries()}
    assert "V-live" in ids
    assert "V-forged" not in ids


def test_a_runner_reports_its_partitions_before_it_opens_them() -> None:
    from aiokafka.structs import TopicPartition

    log: list[str] = []

    class Listener:
        async def revoked(self, stage: str, partitions: frozenset[int]) -> None:
            log.append(f"revoked {stage} {sorted(partitions)}")

        async def assigned(self, stage: str, partitions: frozenset[int]) -> None:
            log.append(f"assigned {stage} {sorted(partitions)}")

    class Logic:
        name = "seal"

        def input_topics(self) -> list[str]:
            return ["in"]

        def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
            return StageResult()

        def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
            return StageResult()

    async def scenario() -> None:
        stage = unconnected(Logic(), max_backoff_s=0.0, assignment_listener=Listener())

        async def opened(number: int, *, rewind: bool = True) -> bool:
            log.append(f"open {number}")
            return False

        async def positions(tps: object) -> dict[TopicPartition, int]:
            return {}

        stage._open = opened  # type: ignore[method-assign]
        stage._committed_positions = positions  # type: ignore[method-assign]
        stage._consumer = type("C", (), {"assignment": lambda self: set()})()
        await stage._on_assigned([TopicPartition("in", 0), TopicPartition("in", 2)])
        await stage._on_revoked([TopicPartition("in", 0)])

    asyncio.run(scenario())
    assert log == ["assigned seal [0, 2]", "open 0", "open 2", "revoked seal [2]"]


def test_the_roster_reads_the_whole_file_against_its_head(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    roster = DirectoryRoster.from_file(fleet.path, fleet.root.public)
    assert {e.principal_id for e in roster.entries()} == {"dispatch-1", *fleet.vehicles}
    # A file missing one record (e.g. a newer version withheld) is refused, not half-read.
    records = fleet.whole.signed_records()
    write_directory_file(fleet.path, fleet.head, records[1:])
    with pytest.raises(FleetbusError) as exc:
        DirectoryRoster.from_file(fleet.path, fleet.root.public)
    assert exc.value.reason is ReasonCode.DIRECTORY_ROLLBACK
    with pytest.raises(FleetbusError) as exc:
        DirectoryRoster.from_file(fleet.path, FleetRoot.generate().public)
    assert exc.value.reason is ReasonCode.BAD_SIGNATURE


def test_the_telemetry_stage_refuses_a_vehicle_outside_the_scope_as_an_unknown_signer(
    tmp_path: Path,
) -> None:
    now = time.time() - 7200
    root = FleetRoot.generate("ed25519")
    issue = issuer(root, "ed25519", now)
    kems = ["xwing", "x25519"]
    vehicles = [f"V-{i}" for i in range(8)]
    fleet = fleet_of(
        root,
        [
            issue("bus-sealer", "sealer", kems=kems),
            *(issue(v, "vehicle", kems=kems) for v in vehicles),
        ],
    )
    head = root.sign_head(fleet.directory.compute_head(seq=1, at=now, vehicle_buckets=PARTITIONS))
    write_directory_file(tmp_path / "directory.cbor", head, fleet.directory.signed_records())
    scoped = load_directory(
        tmp_path / "directory.cbor", root.public, scope=DirectoryScope(buckets=frozenset())
    )
    runner = KeyPathRunner({n: load_key_provider(n) for n in kems})

    def one(minimum: str) -> EnvelopeOpener:
        return EnvelopeOpener(
            fleet.files["bus-sealer"].key_set(),
            scoped,
            runner,
            KeyPath.parse(minimum),
            clock=lambda: now,
            skew_s=30.0,
            max_lifetime_s=900.0,
            check_replay=False,
        )

    topics = PipelineTopics.from_settings(FleetbusSettings().topics)
    stage = TelemetryStage(
        topics=topics,
        opener=UplinkOpener(scoped, one("xwing"), one("x25519"), clock=lambda: now),
        policy=fleet.policy,
        consumer="analytics",
        max_message_bytes=32768,
        clock_skew_s=30.0,
    )

    def bucket(vid: str) -> int:
        return kafka_partition(vid.encode(), PARTITIONS)

    held = vehicles[0]
    scoped.hold_buckets({bucket(held)})
    scoped.ingest_committed(
        [s for s in fleet.directory.signed_records() if s.record.kind == "vehicle"], head
    )
    outside = next(v for v in vehicles if bucket(v) != bucket(held))

    def telemetry(vid: str, offset: int) -> StageResult:
        sealer = EnvelopeSealer(vid, fleet.files[vid].signer(), ProfileSealer(runner))
        profile = profile_from_settings("up", ["xwing"], False, "xwing", "ed25519")
        payload = Telemetry(vehicle_id=vid, at=now, fields={"speed": 1.0}).encode()
        recipient = scoped.recipient_keys("bus-sealer", at=now)
        value = sealer.seal(
            "tel", topics.telemetry_raw, recipient, f"t-{offset}", "tel", payload, now,
            now + 300, profile,
        )  # fmt: skip
        record = InputRecord(topics.telemetry_raw, bucket(vid), offset, vid.encode(), value)
        return stage.process(record, PartitionState(), now)

    served = telemetry(held, 0)
    assert any(o.topic == topics.telemetry_verified for o in served.outputs), served
    refused = telemetry(outside, 1)
    letters = [DeadLetter.decode(o.value or b"") for o in refused.outputs if o.topic == topics.dlq]
    assert [d.reason for d in letters] == [ReasonCode.UNKNOWN_SIGNER]


def test_buckets_loaded_as_partitions_move_are_held_by_position_and_released_whole(
    tmp_path: Path,
) -> None:
    """Each bucket load reads the same open file, so its vehicles are held as positions in it
    (not parsed records), also for a bucket taken after the first; released, they are gone,
    lookups and the held count agree."""
    fleet = Fleet(tmp_path)
    directory, buckets = _worker(fleet, [])
    first, second = fleet.on(1), fleet.on(2)

    async def take(*parts: int) -> None:
        await buckets.assigned("seal", frozenset(parts))

    asyncio.run(take(1))
    asyncio.run(take(1, 2))
    for vid in (first, second):
        key_id = fleet.vehicles[vid].signed.record.key_id
        assert isinstance(directory._by_key_id[key_id], int), vid  # a position, not a parse
        assert _serves(directory, fleet, vid)
    held = {v for v in fleet.vehicles if fleet.bucket(v) in {1, 2}}
    assert directory.vehicles_held() == len(held)
    asyncio.run(buckets.revoked("seal", frozenset()))
    asyncio.run(take(2))
    assert not _serves(directory, fleet, first)
    assert _serves(directory, fleet, second)
    assert directory.vehicles_held() == len({v for v in held if fleet.bucket(v) == 2})


class _RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def send_and_wait(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> None:
        self.sent.append((topic, value))


def test_a_refused_key_topic_item_is_dead_lettered_once_however_often_it_is_re_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused item is refused at every reading: by the running follower, then by each re-read
    of the topic for a bucket taken again. It is dead-lettered (and audited) once per process,
    by its partition and offset; the same bytes at another offset are another item."""
    fleet = Fleet(tmp_path)
    vid = fleet.on(1)
    forged = _issue(FleetRoot.generate(), vid)  # the vehicle's id, signed by another root
    key, value = to_kafka(forged.signed)
    topic: list[KeyTopicItem] = []
    directory, buckets = _worker(fleet, topic)
    settings = FleetbusSettings(partitions=PARTITIONS, directory_scope="partitions")
    service = KeyTopicService(settings, directory, clock=lambda: T0)
    # As build_pipeline wires them: the bucket re-reads report through the service's follower.
    buckets.on_refused = service.follower.on_refused
    service.follower.finish_catch_up()
    producer = _RecordingProducer()
    service._producer = producer  # type: ignore[assignment]

    async def rebalance() -> None:
        await buckets.revoked("seal", frozenset())
        await buckets.assigned("seal", frozenset())  # bucket 1 dropped
        await buckets.assigned("seal", frozenset({1}))  # taken again: the topic re-read
        await service._report()

    async def scenario() -> None:
        await buckets.assigned("seal", frozenset({1}))
        topic.append(KeyTopicItem("keys", 0, 0, key, value))
        assert service.follower.apply(topic[-1]) == "refused"  # live, bucket 1 held
        await service._report()
        await rebalance()
        await rebalance()
        topic.append(KeyTopicItem("keys", 0, 1, key, value))  # published again
        assert service.follower.apply(topic[-1]) == "refused"
        await service._report()
        await rebalance()

    with caplog.at_level(logging.WARNING, logger="fleetbus.sdk.keytopic"):
        asyncio.run(scenario())
    # Refused at every reading: live, then at each re-read that came after it.
    assert caplog.text.count("refused keys[0]@0: bad_signature") == 4
    assert caplog.text.count("refused keys[0]@1: bad_signature") == 2
    dlq = settings.topics.full(settings.topics.dlq)
    letters = [DeadLetter.decode(v) for t, v in producer.sent if t == dlq]
    assert [(d.stage, d.partition, d.offset) for d in letters] == [("keys", 0, 0), ("keys", 0, 1)]
    assert {d.reason for d in letters} == {ReasonCode.BAD_SIGNATURE}
    # Still refused at every re-read: never applied, the vehicle's own key still served.
    assert directory.scope.buckets == frozenset({1})
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for(vid, forged.signed.record.key_id, at=T0)
    assert exc.value.reason is ReasonCode.UNKNOWN_SIGNER
    assert _serves(directory, fleet, vid)
