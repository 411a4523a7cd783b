"""Every hostile-corpus case through the component that reads its topic, without Kafka.

``commands.requested`` / ``commands.approvals`` go through ``AuthorizeStage``, responses
through ``ResponseStage`` then ``TrackStage`` and telemetry through ``TelemetryStage`` (both
with the worker's ``UplinkOpener``), ``commands.outbound`` through a ``VehicleAgent``'s record
handler, ``keys`` through a ``KeyDirectory`` loaded from the corpus fleet's ``directory.cbor``.
Kafka's partitioning is simulated (murmur2 of the key over 2 partitions, each with its own
state), as the integration test's worker sees it. The clock is the corpus's fixed ``open_at``.
"""

from __future__ import annotations

import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from kafka.partitioner import murmur2

from fleetbus.bus.commands import SignedApproval, SignedCommand
from fleetbus.bus.directory import (
    KeyDirectory,
    KeyRecord,
    PrincipalKeyFile,
    RootPublicKey,
    load_directory,
)
from fleetbus.bus.envelope import decode_envelope
from fleetbus.bus.envelope_v2 import Direction
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import KeyPath
from fleetbus.bus.registry import load_key_provider
from fleetbus.bus.settings import FleetbusSettings, TopicNames
from fleetbus.processors.eos import DeadLetter, InputRecord, PartitionState, StageResult
from fleetbus.processors.fleet_registry import FleetRegistry
from fleetbus.processors.policy import PolicyEngine
from fleetbus.processors.stages import (
    AuthorizeStage,
    PipelineTopics,
    TelemetryStage,
    UplinkOpener,
)
from fleetbus.processors.uplink import UplinkLimits
from fleetbus.providers.keypath import KeyPathRunner
from fleetbus.providers.sealing import EnvelopeOpener
from fleetbus.providers.sealing_v2 import EpochOpener
from fleetbus.sdk.transport import MemoryTransport
from fleetbus.sdk.vehicle import HandlerResult, VehicleAgent, VehicleIdentity
from tests.support.responses import ResponsePath
from tests.vectors.hostile.corpus import (
    BUS_TARGETS,
    FLEET,
    KEYS_TARGET,
    VEHICLE_TARGET,
    Case,
    load_cases,
    load_meta,
)

CASES = load_cases()
META = load_meta()
NOW: float = META["open_at"]
WORKER = META["worker_settings"]
PARTITIONS = 2
TOPICS = PipelineTopics.from_settings(TopicNames(prefix=META["prefix"]))
MEMORY_LIMIT = 10 * 1024 * 1024
#: Cases the code under test does not handle yet (see docs/security-testing.md, "Findings").
KNOWN_ISSUES: dict[str, str] = {}


def partition_of(key: bytes | None) -> int:
    """Kafka's default partitioner for keyed records."""
    return (murmur2(key) & 0x7FFFFFFF) % PARTITIONS if key is not None else 0


@dataclass
class World:
    directory: KeyDirectory
    policy: PolicyEngine
    files: dict[str, PrincipalKeyFile]


@pytest.fixture(scope="module")
def world() -> World:
    root = RootPublicKey.from_bytes((FLEET / "root.pub").read_bytes())
    directory = load_directory(FLEET / "directory.cbor", root)
    files = {
        p.stem: PrincipalKeyFile.from_json(p.read_bytes()) for p in sorted(FLEET.glob("*.key"))
    }
    registry = FleetRegistry.from_mapping({}).with_directory_records(directory.records())
    return World(directory, PolicyEngine(registry), files)


def runner() -> KeyPathRunner:
    return KeyPathRunner({n: load_key_provider(n) for n in ("x25519", "xwing")})


@dataclass
class Outcome:
    """What one record did: its reason code (or ok/pending) and what went where."""

    outcome: str
    dlq: list[DeadLetter] = field(default_factory=list)
    authorized: int = 0
    executed: int = 0


class Bus:
    """The worker's five stages on partition states, as the integration test runs them."""

    def __init__(self, world: World) -> None:
        self.world = world
        sealer_keys = world.files["bus-sealer"].key_set()

        def opener(minimum: str) -> EnvelopeOpener:
            return EnvelopeOpener(
                sealer_keys,
                world.directory,
                runner(),
                KeyPath.parse(minimum),
                clock=lambda: NOW,
                max_lifetime_s=WORKER["uplink_max_lifetime_s"],
                check_replay=False,  # the stages own it, as in the worker
            )

        def uplink() -> UplinkOpener:
            return UplinkOpener(world.directory, opener("xwing"), opener("x25519"), lambda: NOW)

        self.authorize = AuthorizeStage(
            topics=TOPICS,
            directory=world.directory,
            policy=world.policy,
            approvals_required=WORKER["approvals_required"],
            approval_window_s=WORKER["approval_window_s"],
            clock_skew_s=30,
            max_lifetime_s=WORKER["replay_ttl_s"],
            max_message_bytes=32 * 1024,
        )
        limits = UplinkLimits(max_lifetime_s=WORKER["uplink_max_lifetime_s"])

        def v2(minimum: str) -> EpochOpener:
            return EpochOpener(
                sealer_keys, world.directory, runner(), KeyPath.parse(minimum),
                direction=Direction.UPLINK, clock=lambda: NOW,
                max_lifetime_s=WORKER["uplink_max_lifetime_s"],
            )  # fmt: skip

        # Responses go through the response stage, then what it verifies through the track
        # stage, as the worker runs them.
        self.track = ResponsePath(
            topics=TOPICS,
            opener=uplink(),
            clock_skew_s=30,
            max_message_bytes=32 * 1024,
            limits=limits,
            sealer_principal="bus-sealer",
            v2_openers=(v2("xwing"), v2("x25519")),
        )
        self.telemetry = TelemetryStage(
            topics=TOPICS,
            opener=uplink(),
            policy=world.policy,
            consumer="analytics",
            max_message_bytes=32 * 1024,
            limits=limits,
        )
        self.states: dict[tuple[str, int], PartitionState] = {}
        self.offsets: Counter[str] = Counter()
        self.stage_for = {
            TOPICS.requested: self.authorize,
            TOPICS.approvals: self.authorize,
            TOPICS.responses: self.track,
            TOPICS.telemetry_raw: self.telemetry,
        }

    def feed(self, case: Case, now: float = NOW) -> Outcome:
        topic = f"{META['prefix']}{case.target}"
        stage = self.stage_for[topic]
        partition = partition_of(case.key)
        state = self.states.setdefault((stage.name, partition), PartitionState())
        record = InputRecord(
            topic, partition, self.offsets[topic], case.key, case.value, 0, case.headers
        )
        self.offsets[topic] += 1
        result = stage.process(record, state, now)
        state.commit()
        return self.outcome(result)

    def tick(self, now: float) -> Outcome:
        result = StageResult()
        for (name, partition), state in self.states.items():
            if name == self.authorize.name:
                result.extend(self.authorize.tick(partition, state, now))
                state.commit()
        return self.outcome(result)

    @staticmethod
    def outcome(result: StageResult) -> Outcome:
        letters = [DeadLetter.decode(o.value) for o in result.outputs if o.topic == TOPICS.dlq]
        authorized = sum(1 for o in result.outputs if o.topic == TOPICS.authorized)
        if letters:
            return Outcome(letters[0].reason.value, letters, authorized)
        return Outcome("pending" if result.outcome == "pending" else "ok", [], authorized)


class Vehicles:
    """A VehicleAgent (in-memory store, no Kafka) for V-0001 and V-0002."""

    def __init__(self, world: World) -> None:
        settings = FleetbusSettings(
            topics=TopicNames(prefix=META["prefix"]), replay_ttl_s=WORKER["replay_ttl_s"]
        )
        self.executed: Counter[str] = Counter()
        self.transport = MemoryTransport()
        self.agent = VehicleAgent(
            settings,
            vehicles=[VehicleIdentity.from_key_file(world.files[v]) for v in ("V-0001", "V-0002")],
            directory=world.directory,
            minimum_path="xwing",
            handlers={a: self.handle for a in ("ping", "unlock_doors")},
            store_path=":memory:",
            clock=lambda: NOW,
            transport=self.transport,  # records fed in memory; what it sends stays there
        )
        self.reasons: list[str] = []
        real_reject = self.agent._reject

        def reject(reason: ReasonCode, detail: str) -> None:
            self.reasons.append(reason.value)
            real_reject(reason, detail)

        self.agent._reject = reject  # type: ignore[method-assign]

    def handle(self, command: Any) -> HandlerResult:
        self.executed[command.id] += 1
        return HandlerResult(200, "ok")

    def feed(self, case: Case) -> Outcome:
        before_dup, before_exec = self.agent.stats.duplicates, sum(self.executed.values())
        self.reasons.clear()
        errors = self.agent.stats.errors
        self.transport.feed(
            f"{META['prefix']}{case.target}",
            case.key,
            case.value,
            partition=partition_of(case.key),
            headers=list(case.headers),
        )
        assert self.agent.poll_once(0) == 1
        assert self.agent.stats.errors == errors  # nothing raised inside the agent
        executed = sum(self.executed.values()) - before_exec
        if self.reasons:
            return Outcome(self.reasons[0], executed=executed)
        if self.agent.stats.duplicates > before_dup:
            return Outcome("replayed", executed=executed)
        return Outcome("ok", executed=executed)

    def close(self) -> None:
        self.agent.store.close()


class KeyTopic:
    """A loader following the key topic, started from the fleet's directory file (head 2)."""

    def __init__(self) -> None:
        root = RootPublicKey.from_bytes((FLEET / "root.pub").read_bytes())
        self.directory = load_directory(FLEET / "directory.cbor", root)

    def feed(self, case: Case) -> Outcome:
        """The reason ingest refuses the value with, else the reason its key is refused with."""
        try:
            item = self.directory.ingest_kafka(case.value, case.key)
            if isinstance(item, KeyRecord):
                self.directory.verifier_for(item.principal_id, item.key_id, at=NOW)
        except FleetbusError as exc:
            return Outcome(exc.reason.value)
        return Outcome("ok")


def run_case(world: World, case: Case) -> tuple[Outcome, Bus | Vehicles | KeyTopic]:
    """Feed the case's setup cases, then the case, to a fresh bus, vehicle agent or loader."""
    if case.target == KEYS_TARGET:
        keys = KeyTopic()
        for name in case.setup:
            assert keys.feed(CASES[name]).outcome == CASES[name].expect, name
        return keys.feed(case), keys
    if case.target == VEHICLE_TARGET:
        vehicles = Vehicles(world)
        for name in case.setup:
            assert vehicles.feed(CASES[name]).outcome == CASES[name].expect, name
        return vehicles.feed(case), vehicles
    bus = Bus(world)
    for name in case.setup:
        assert bus.feed(CASES[name]).outcome == CASES[name].expect, name
    outcome = bus.feed(case)
    if case.after_approval_window:
        assert outcome.outcome == "ok", outcome  # the approval alone is not rejected ...
        assert outcome.authorized == 0  # ... and authorizes nothing
        outcome = bus.tick(NOW + WORKER["approval_window_s"] + 1)
    return outcome, bus


# --- the corpus itself ---------------------------------------------------------------------


def test_corpus_size_and_reason_codes() -> None:
    hostile = [c for c in CASES.values() if c.hostile]
    assert len(hostile) >= 60
    codes = {r.value for r in ReasonCode}
    for case in CASES.values():
        assert case.expect in codes or case.expect in ("ok", "pending"), case.name
        assert case.target in (*BUS_TARGETS, VEHICLE_TARGET, KEYS_TARGET), case.name
        assert case.description, case.name
    # The attack classes the corpus must keep covering.
    categories = Counter(c.category for c in hostile)
    for needed in (
        "parse",
        "size",
        "wrong-type",
        "non-canonical",
        "version",
        "signature",
        "freshness",
        "replay",
        "downgrade",
        "header-injection",
        "merkle",
        "compression-bomb",
        "tamper",
        "rollback",
        "ordering-race",
    ):
        assert categories[needed] >= 1, needed
    for target in (*BUS_TARGETS, VEHICLE_TARGET, KEYS_TARGET):
        assert any(c.target == target for c in hostile), target


# --- every case ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_ISSUES[n], strict=True))
        if n in KNOWN_ISSUES
        else n
        for n in CASES
    ],
)
def test_case_gets_its_expected_outcome(world: World, name: str) -> None:
    case = CASES[name]
    outcome, side = run_case(world, case)
    try:
        assert outcome.outcome == case.expect, (case.description, outcome)
        if case.target == VEHICLE_TARGET:
            assert outcome.executed == (1 if case.expect == "ok" else 0)
        elif case.target == KEYS_TARGET:
            assert isinstance(side, KeyTopic)
            # Whatever was fed, the fleet's revocations hold and its head did not go back.
            assert side.directory.head is not None
            assert side.directory.head.seq == 2
            for principal in ("dispatch-revoked", "V-0099"):
                with pytest.raises(FleetbusError) as exc:
                    side.directory.current(principal, at=NOW)
                assert exc.value.reason is ReasonCode.SIGNER_REVOKED
        elif case.hostile:
            assert outcome.authorized == 0
            expected_value = CASES[case.dlq_of].value if case.dlq_of else case.value
            [letter] = [d for d in outcome.dlq if d.value == expected_value] or [None]
            assert letter is not None, "the DLQ record carries the original bytes"
            assert letter.reason.value == case.expect
    finally:
        if isinstance(side, Vehicles):
            side.close()


# --- compression bombs stay small ----------------------------------------------------------


BOMBS = [c for c in CASES.values() if c.category in ("compression-bomb", "size")]


@pytest.mark.parametrize("name", [c.name for c in BOMBS])
def test_hostile_decoding_stays_under_10_mb(name: str) -> None:
    case = CASES[name]
    data = case.value or b""
    if case.target == "commands.requested":
        decoders: list[Any] = [SignedCommand.decode, SignedApproval.decode]
    else:
        decoders = [decode_envelope]
    for decode in decoders:
        tracemalloc.start()
        try:
            with pytest.raises(FleetbusError) as caught:
                decode(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert caught.value.reason.value == case.expect
        assert peak < MEMORY_LIMIT, (name, peak)


def test_bombs_through_the_whole_stage_stay_under_10_mb(world: World) -> None:
    bus = Bus(world)
    for case in BOMBS:
        if case.target == VEHICLE_TARGET:
            continue
        tracemalloc.start()
        try:
            outcome = bus.feed(case)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert outcome.outcome == case.expect, case.name
        assert peak < MEMORY_LIMIT, (case.name, peak)


# --- the whole corpus through one bus and one agent, as the integration test feeds it -------


def test_every_case_in_corpus_order_through_one_bus(world: World) -> None:
    """No case depends on running alone: one bus, every bus case in order (the integration
    test's worker sees exactly this sequence, partitioned the same way)."""
    bus = Bus(world)
    wrong = {}
    for case in CASES.values():
        if case.target not in BUS_TARGETS or case.name in KNOWN_ISSUES:
            continue
        outcome = bus.feed(case)
        expect = "ok" if case.after_approval_window else case.expect
        if outcome.outcome != expect:
            wrong[case.name] = outcome.outcome
    assert not wrong
    timers = bus.tick(NOW + WORKER["approval_window_s"] + 1)
    assert timers.outcome == "policy_denied"  # the pending command, its window elapsed


def test_every_vehicle_case_in_corpus_order_through_one_agent(world: World) -> None:
    vehicles = Vehicles(world)
    try:
        wrong = {}
        for case in CASES.values():
            if case.target != VEHICLE_TARGET:
                continue
            outcome = vehicles.feed(case)
            if outcome.outcome != case.expect:
                wrong[case.name] = outcome.outcome
        assert not wrong
        assert sum(vehicles.executed.values()) == 1  # the control, once
    finally:
        vehicles.close()
