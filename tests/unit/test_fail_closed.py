"""Fail closed, and honest error classes (issue 14, items 1, 5 and 7).

- A profile that policy or a vehicle's capabilities pick but this worker cannot serve is a
  refusal, never a fall-through to a weaker profile.
- Our own faults are ``internal`` (alerted), not ``malformed``; a signer key whose validity has
  not begun is ``not_yet_valid``, not ``unknown_signer``.
- Outcome metrics count when the transaction commits, so a retried batch counts once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from fleetbus.bus.commands import Command, SignedCommand, Target
from fleetbus.bus.directory import FleetRoot, KeyDirectory, issue_key
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.bus.settings import FleetbusSettings, ProfileRule, ProfileSettings
from fleetbus.observability.metrics import (
    AUDIT_RECORDS,
    DLQ_RECORDS,
    INTERNAL_ERRORS,
    KEYPATH_FAILOVER,
    RECORDS,
)
from fleetbus.processors import eos
from fleetbus.processors.app import build_pipeline
from fleetbus.processors.audit import AuditChain, AuditEvent
from fleetbus.processors.eos import DeadLetter, InputRecord, Output, PartitionState, StageResult
from fleetbus.processors.fleet_registry import FleetRegistry
from fleetbus.processors.policy import PolicyEngine
from fleetbus.processors.stages import AuthorizedCommand, AuthorizeStage, PipelineTopics
from tests.support.envelope import unconnected
from tests.support.pipeline import DISPATCHER, SEALER, TestFleet, make_test_fleet

EDGE = "EDGE-1"


# --- item 1: an unservable profile is a refusal ------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> TestFleet:
    fleet = make_test_fleet(tmp_path, vehicles=1)
    fleet.add_edge_unit(EDGE, qkd_sae_id="sae-edge-1")  # capability "qkd"
    return fleet


def settings(fleet: TestFleet, **overrides: Any) -> FleetbusSettings:
    """No ``qkd_kme_url``: the worker has no QKD provider."""
    return FleetbusSettings(keys_dir=str(fleet.keys_dir), sealer_principal=SEALER, **overrides)


def seal_logic(fleet: TestFleet, **overrides: Any) -> Any:
    pipeline = build_pipeline(settings(fleet, **overrides))
    return next(stage.logic for stage in pipeline.stages if stage.stage == "seal")


def authorized(fleet: TestFleet, vehicle: str, action: str, criticality: str) -> InputRecord:
    command = Command.create(issuer=DISPATCHER, target=Target(vehicle=vehicle), action=action)
    signed = SignedCommand.sign(command, fleet.signer(DISPATCHER))
    value = AuthorizedCommand(
        command.id,
        vehicle,
        DISPATCHER,
        action,
        criticality,
        command.issued_at,
        command.expires_at,
        signed.encode(),
    ).encode()
    return InputRecord("fleet.commands.authorized", 0, 0, command.id.encode(), value)


def outcome(logic: Any, record: InputRecord) -> tuple[list[str], list[str]]:
    """(topics written, reasons of the audit events) of sealing one record."""
    result = logic.process(record, PartitionState(), time.time())
    topics = [o.topic.removeprefix("fleet.") for o in result.outputs]
    return topics, [e.reason for e in result.audit if e.reason]


def test_enclave_without_a_kme_is_refused_not_sealed_under_standard(fleet: TestFleet) -> None:
    logic = seal_logic(fleet)
    labels = {
        "profile": "enclave",
        "from_path": "qkd-etsi014+xwing",
        "to_path": "none",
        "reason": "provider_not_configured",
    }
    before = KEYPATH_FAILOVER.labels(**labels)._value.get()

    topics, reasons = outcome(logic, authorized(fleet, EDGE, "unlock_doors", "high"))

    assert "commands.outbound" not in topics
    assert "commands.rejected" in topics
    assert reasons[-1] == "key_path_exhausted"
    # Counted and audited like a failover to nothing, so FleetbusKeyPathExhausted fires.
    assert "provider_not_configured" in reasons
    assert KEYPATH_FAILOVER.labels(**labels)._value.get() == before + 1
    # What the profile allows is still served: routine commands to the same unit go out.
    topics, _ = outcome(logic, authorized(fleet, EDGE, "ping", "routine"))
    assert "commands.outbound" in topics


def test_a_no_fallback_profile_is_never_served_from_its_second_path(fleet: TestFleet) -> None:
    profiles = FleetbusSettings().profiles
    profiles["enclave"] = ProfileSettings(
        key_paths=["qkd-etsi014+xwing", "xwing"], allow_fallback=False, minimum_path="xwing"
    )
    logic = seal_logic(fleet, profiles=profiles)
    assert "enclave" not in logic.profiles
    topics, reasons = outcome(logic, authorized(fleet, EDGE, "unlock_doors", "high"))
    assert "commands.outbound" not in topics
    assert reasons[-1] == "key_path_exhausted"


def test_a_rule_naming_an_undefined_profile_stops_the_worker(fleet: TestFleet) -> None:
    rules = [ProfileRule(profile="enclve", criticality="high"), ProfileRule(profile="pqc")]
    with pytest.raises(ConfigError, match="enclve"):
        build_pipeline(settings(fleet, profile_rules=rules))


def test_a_profile_path_below_its_own_minimum_stops_the_worker(fleet: TestFleet) -> None:
    profiles = FleetbusSettings().profiles
    profiles["pqc"] = ProfileSettings(key_paths=["xwing", "x25519"], minimum_path="xwing")
    with pytest.raises(ConfigError, match="x25519 are below its minimum_path xwing"):
        build_pipeline(settings(fleet, profiles=profiles))


# --- item 5: internal is not malformed; not_yet_valid is not unknown_signer ---------------


def test_a_fleetbus_error_without_a_reason_is_internal() -> None:
    assert FleetbusError("forgot the reason").reason is ReasonCode.INTERNAL
    assert FleetbusError("bad", reason=ReasonCode.MALFORMED).reason is ReasonCode.MALFORMED


class Forward:
    """Forwards each input; a record with value b"bug" hits a bug in the stage."""

    name = "forward-test"

    def input_topics(self) -> list[str]:
        return ["in"]

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if record.value == b"bug":
            raise KeyError("a bug of ours, not bad input")
        return StageResult(
            outputs=[Output("out", record.key, record.value)],
            audit=[AuditEvent(actor="bus", event="forwarded")],
        )

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        return StageResult()


def raw(offset: int, value: bytes) -> Any:
    return type(
        "Raw",
        (),
        {"topic": "in", "partition": 0, "offset": offset, "key": b"k", "value": value,
         "timestamp": 0, "headers": None},
    )()  # fmt: skip


def runner(producer: Any = None) -> eos.TransactionalStage:
    stage = unconnected(Forward(), max_backoff_s=0.0)
    if producer is not None:
        stage._parts[0] = eos._Partition(0, producer, PartitionState(), AuditChain("t-0"))
        assigned = {TopicPartition("in", 0)}
        stage._assigned.update(assigned)
        stage._consumer = type(
            "Consumer",
            (),
            {"seek": lambda self, tp, offset: None, "assignment": lambda self: assigned},
        )()
    return stage


def test_an_exception_in_stage_logic_is_internal_and_counted_not_malformed() -> None:
    stage = runner()
    part = type("Part", (), {"state": PartitionState()})()
    before = INTERNAL_ERRORS.labels(stage="forward-test")._value.get()
    result = stage._compute(part, [raw(0, b"ok"), raw(1, b"bug")])
    [letter] = [DeadLetter.decode(o.value or b"") for o in result.outputs if o.topic == "dlq"]
    assert letter.reason is ReasonCode.INTERNAL
    assert letter.detail == "KeyError"  # the type only: an exception text may hold secrets
    assert INTERNAL_ERRORS.labels(stage="forward-test")._value.get() == before + 1


def _fleet_with_future_dispatcher() -> tuple[KeyDirectory, Any]:
    root = FleetRoot.generate("ed25519")
    now = time.time()
    issued = issue_key(
        root,
        principal_id="dispatch-late",
        kind="dispatcher",
        signature_suite="ed25519",
        not_before=now + 3600,
        not_after=now + 7200,
    )
    directory = KeyDirectory(root.public)
    directory.ingest_all([issued.signed])
    return directory, issued.key_file


def test_an_issuer_key_not_yet_valid_is_reported_as_such() -> None:
    directory, key_file = _fleet_with_future_dispatcher()
    topics = PipelineTopics.from_settings(FleetbusSettings().topics)
    registry = FleetRegistry.from_mapping({}).with_directory_records(directory.records())
    stage = AuthorizeStage(
        topics=topics,
        directory=directory,
        policy=PolicyEngine(registry),
        approvals_required=1,
        approval_window_s=60,
        clock_skew_s=30,
        max_lifetime_s=86400,
        max_message_bytes=32 * 1024,
    )
    command = Command.create(issuer="dispatch-late", target=Target(vehicle="V-1"), action="ping")
    value = SignedCommand.sign(command, key_file.signer()).encode()
    record = InputRecord(topics.requested, 0, 0, command.id.encode(), value)
    result = stage.process(record, PartitionState(), time.time())
    assert {e.reason for e in result.audit if e.reason} == {"not_yet_valid"}


# --- item 7: outcome metrics count on commit -----------------------------------------------


class FlakyProducer:
    """A transactional producer whose first ``failures`` transactions abort."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.committed: list[str] = []
        self._sent: list[str] = []

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        self._sent = []
        yield
        if self.failures:
            self.failures -= 1
            raise KafkaError("transaction aborted")
        self.committed += self._sent

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._transaction()

    async def send(self, topic: str, **_: Any) -> None:
        self._sent.append(topic)

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        pass


def test_a_batch_retried_after_an_abort_is_counted_once() -> None:
    producer = FlakyProducer(failures=1)
    stage = runner(producer)
    ok = RECORDS.labels(stage="forward-test", outcome="ok")
    dlq = DLQ_RECORDS.labels(stage="forward-test", reason="internal")
    audited = AUDIT_RECORDS.labels(event="forwarded")
    before = (ok._value.get(), dlq._value.get(), audited._value.get())
    batch = [raw(0, b"a"), raw(1, b"bug"), raw(2, b"b")]

    async def twice() -> None:
        for _ in range(2):  # aborted, then read again from the committed offset and committed
            await stage._process_batch(TopicPartition("in", 0), batch, stage._generation)

    asyncio.run(twice())

    assert producer.committed.count("out") == 2
    assert producer.committed.count("dlq") == 1
    after = (ok._value.get(), dlq._value.get(), audited._value.get())
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 2]


# --- item 4: co-partitioned topics must agree on their partition count ---------------------


class Cluster:
    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self.counts.get(topic)
        return None if n is None else set(range(n))


class MetadataConsumer:
    """What ``_check_copartitioned`` reads of an AIOKafkaConsumer: its client's metadata."""

    def __init__(self, counts: dict[str, int]) -> None:
        async def fetch_all_metadata() -> Cluster:
            return Cluster(counts)

        self._client = type("Client", (), {"fetch_all_metadata": staticmethod(fetch_all_metadata)})

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class Track(Forward):
    name = "track-test"

    def input_topics(self) -> list[str]:
        return ["authorized", "status", "responses"]


def test_a_stage_whose_inputs_differ_in_partitions_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counts = {"authorized": 4, "status": 4, "responses": 8, "state": 4}
    monkeypatch.setattr(eos, "AIOKafkaConsumer", lambda **_: MetadataConsumer(counts))
    stage = unconnected(Track())
    with pytest.raises(ConfigError) as refused:
        asyncio.run(stage.run())
    message = str(refused.value)
    assert "stage track-test" in message
    assert "authorized has 4, status has 4, responses has 8, state has 4" in message


def test_equal_counts_and_missing_topics_are_not_a_mismatch() -> None:
    from fleetbus.bus.topics import check_copartitioned

    check_copartitioned("stage seal", {"authorized": 4, "state": 4, "not-yet-created": None})
    with pytest.raises(ConfigError, match="a has 2, b has 3"):
        check_copartitioned("stage x", {"a": 2, "b": 3})


# --- item 7: a vehicle gateway confined to its vehicles' partitions -----------------------


def test_outbound_partition_is_where_the_seal_stages_producer_puts_a_vehicle() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from fleetbus.sdk.vehicle import outbound_partition

    for partitions in (1, 2, 3, 4, 12, 64):
        everything = list(range(partitions))
        for n in range(500):
            vid = f"V-{n:04d}"
            produced = DefaultPartitioner()(vid.encode(), everything, everything)
            assert outbound_partition(vid, partitions) == produced


class FakeConsumer:
    """A kafka-python consumer that records how it was asked to read."""

    partitions = 4

    def __init__(self, *topics: str, **_: Any) -> None:
        self.topics = topics
        self.assigned: list[list[Any]] = []

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(FakeConsumer.partitions))

    def assign(self, partitions: list[Any]) -> None:
        self.assigned.append(partitions)

    def close(self, **_: Any) -> None:
        pass


def test_a_confined_agent_assigns_only_its_vehicles_partitions_and_follows_repartitions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import kafka

    from fleetbus.sdk.vehicle import VehicleAgent, outbound_partition

    fleet = make_test_fleet(tmp_path, vehicles=3)
    monkeypatch.setattr(kafka, "KafkaConsumer", FakeConsumer)
    monkeypatch.setattr(kafka, "KafkaProducer", lambda **_: object())
    settings = FleetbusSettings(vehicle_confine_partitions=True)
    outbound = settings.topics.full(settings.topics.commands_outbound)
    mine = ["V-0001", "V-0003"]
    agent = VehicleAgent(
        settings,
        vehicles=fleet.vehicles(mine),
        directory=fleet.directory,
        minimum_path="xwing",
        handlers={},
        store_path=tmp_path / "agent.sqlite",
    )
    try:
        agent.transport.connect()
        consumer = agent.transport.consumer  # type: ignore[attr-defined]
        assert consumer.topics == ()  # no group subscription to the whole topic
        [first] = consumer.assigned
        assert {(tp.topic, tp.partition) for tp in first} == {
            (outbound, outbound_partition(v, 4)) for v in mine
        }
        agent.transport.connect()
        assert len(consumer.assigned) == 1  # unchanged topic: no reassignment
        FakeConsumer.partitions = 7
        agent.transport.connect()
        assert {tp.partition for tp in consumer.assigned[-1]} == {
            outbound_partition(v, 7) for v in mine
        }
    finally:
        FakeConsumer.partitions = 4
        agent.store.close()


# --- item 1, the sweep: a missing setting never widens whom we trust ------------------------


def test_a_kme_url_without_its_ca_and_client_files_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="qkd_ca_file, qkd_cert_file, qkd_key_file"):
        FleetbusSettings(qkd_kme_url="https://kme.example:8443")
    with pytest.raises(ValidationError, match="but qkd_ca_file are not"):
        FleetbusSettings(
            qkd_kme_url="https://kme.example:8443", qkd_cert_file="c.pem", qkd_key_file="c.key"
        )


def test_the_qkd_provider_never_falls_back_to_the_system_trust_store(tmp_path: Path) -> None:
    from fleetbus.bus.keys import KeyProviderError
    from fleetbus.devtools.kme_pki import make_test_pki
    from fleetbus.providers.qkd import QKDProvider

    client = make_test_pki(tmp_path, ["sae-hub"], admin=False).saes["sae-hub"]
    with pytest.raises(KeyProviderError, match="system trust store") as refused:
        QKDProvider(
            kme_url="https://kme.example:8443",
            kme_id="KME-A",
            sae_id="sae-hub",
            ca_file="",
            cert_file=client.cert,
            key_file=client.key,
        )
    assert refused.value.reason is ReasonCode.CONFIG


class BatchThatFails:
    """A batch stage with a bug: its batch path counts outcomes and then raises."""

    name = "batch-bug-test"

    def input_topics(self) -> list[str]:
        return ["in"]

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        return eos.dead_letter_result(self.name, "dlq", record, ReasonCode.MALFORMED, "x", now=now)

    def process_batch(
        self, records: list[InputRecord], state: PartitionState, now: float
    ) -> list[StageResult | Exception]:
        for record in records:
            self.process(record, state, now)
        raise RuntimeError("a bug after the outcomes were counted")

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        return StageResult()


def test_a_failed_batch_redone_one_by_one_counts_each_record_once() -> None:
    from fleetbus.observability.metrics import held_until_commit

    stage = unconnected(BatchThatFails())
    part = type("Part", (), {"state": PartitionState()})()
    dlq = DLQ_RECORDS.labels(stage="batch-bug-test", reason="malformed")
    internal = INTERNAL_ERRORS.labels(stage="batch-bug-test")
    before = (dlq._value.get(), internal._value.get())
    with held_until_commit() as held:
        result = stage._compute(part, [raw(0, b"a"), raw(1, b"b")])
    for update in held:  # the transaction commits
        update()
    assert [o.topic for o in result.outputs] == ["dlq", "dlq"]
    assert (dlq._value.get() - before[0], internal._value.get() - before[1]) == (2, 1)
