"""Wire format v2 in the pipeline, without Kafka: the seal stage writes establishment + message
to vehicles announcing ``wire2``, the vehicle agent keeps epochs, answers ``epoch_unknown`` and
answers in v2 keyed by vehicle id, the response stage verifies those answers and re-delivers
the establishment, and nothing is executed twice (docs/wire-format.md V2.7, V2.10).

Over 500 lines because the v2 cases share one fleet, the stage builders and a recording vehicle.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest

from fleetbus.bus.commands import Command, SignedCommand, StatusEvent, Target, TelemetryBatch
from fleetbus.bus.directory import FleetRoot
from fleetbus.bus.envelope_v2 import (
    Direction,
    Message,
    ParsedEstablishment,
    decode_record,
    record_version,
)
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import (
    Encapsulation,
    KeyPath,
    KeyProvider,
    KeyProviderError,
    PrivateKeySet,
    RecipientKeys,
)
from fleetbus.bus.registry import load_key_provider
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.observability.metrics import held_until_commit
from fleetbus.processors.eos import DeadLetter, InputRecord, PartitionState, StageResult
from fleetbus.processors.fleet_registry import FleetRegistry
from fleetbus.processors.policy import PolicyEngine
from fleetbus.processors.stages import (
    AuthorizedCommand,
    PipelineTopics,
    ProfileChoice,
    ResponseStage,
    SealStage,
    TelemetryStage,
    UplinkOpener,
    profile_from_settings,
)
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
from fleetbus.providers.sealing import EnvelopeOpener, EnvelopeSealer, EpochPolicy
from fleetbus.providers.sealing_v2 import EpochOpener, EpochSealer
from fleetbus.sdk.transport import MemoryTransport
from fleetbus.sdk.vehicle import HandlerResult, VehicleAgent, VehicleIdentity
from tests.support.envelope import Fleet, fleet_of, issuer
from tests.support.responses import ResponsePath

NOW = time.time() - 7200
SETTINGS = FleetbusSettings()
TOPICS = PipelineTopics.from_settings(SETTINGS.topics)
SUITE = "ed25519"


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    root = FleetRoot.generate(SUITE)
    issue = issuer(root, SUITE, NOW)
    kems = ["xwing", "x25519"]
    issued = [
        issue("bus-sealer", "sealer", kems=kems, capabilities=["wire2"]),
        issue("dispatch-1", "dispatcher"),
        issue("V-1", "vehicle", kems=kems, capabilities=["wire2"]),
        issue("V-3", "vehicle", kems=kems),
    ]
    return fleet_of(root, issued)


def seal_stage(fleet: Fleet, wire_version: int = 2) -> SealStage:
    runner = KeyPathRunner({n: load_key_provider(n) for n in ("xwing", "x25519")})
    profiles = {
        name: profile_from_settings(name, p.key_paths, p.allow_fallback, p.minimum_path, SUITE)
        for name, p in SETTINGS.profiles.items()
        if not any("qkd" in path for path in p.key_paths)
    }
    rules = [ProfileChoice("standard")]
    profiles["standard"] = profile_from_settings("standard", ["xwing"], True, "xwing", SUITE)
    profile_sealer = ProfileSealer(runner, retries=0, sleep=lambda _: None)
    signer = fleet.files["bus-sealer"].signer()
    return SealStage(
        topics=TOPICS,
        directory=fleet.directory,
        sealer=EnvelopeSealer("bus-sealer", signer, profile_sealer),
        profiles=profiles,
        rules=rules,
        clock_skew_s=30,
        sealer_v2=EpochSealer(
            "bus-sealer", signer, profile_sealer, epochs=EpochPolicy(300, 1000), clock=lambda: NOW
        ),
        wire_version=wire_version,
    )


def response_stage(fleet: Fleet) -> ResponseStage:
    runner = KeyPathRunner({n: load_key_provider(n) for n in ("xwing", "x25519")})

    def one(minimum: str) -> EnvelopeOpener:
        return EnvelopeOpener(
            fleet.files["bus-sealer"].key_set(),
            fleet.directory,
            runner,
            KeyPath.parse(minimum),
            check_replay=False,
            clock=lambda: NOW,
        )

    def v2(minimum: str) -> EpochOpener:
        return EpochOpener(
            fleet.files["bus-sealer"].key_set(), fleet.directory, runner,
            KeyPath.parse(minimum), direction=Direction.UPLINK, clock=lambda: NOW,
        )  # fmt: skip

    return ResponseStage(
        topics=TOPICS,
        opener=UplinkOpener(fleet.directory, one("xwing"), one("x25519"), clock=lambda: NOW),
        clock_skew_s=30,
        max_message_bytes=64 * 1024,
        sealer_principal="bus-sealer",
        v2_openers=(v2("xwing"), v2("x25519")),
    )


_offsets = iter(range(10**6))


def authorized(fleet: Fleet, vehicle: str, action: str = "ping") -> InputRecord:
    command = Command.create(
        issuer="dispatch-1", target=Target(vehicle=vehicle), action=action, ttl_s=600, now=NOW
    )
    cmd = SignedCommand.sign(command, fleet.files["dispatch-1"].signer())
    value = AuthorizedCommand(
        command.id, vehicle, "dispatch-1", action, "routine", command.issued_at,
        command.expires_at, cmd.encode(),
    ).encode()  # fmt: skip
    return InputRecord(TOPICS.authorized, 0, next(_offsets), command.id.encode(), value)


def outputs(result: StageResult, topic: str) -> list[Any]:
    return [o for o in result.outputs if o.topic == topic]


class Vehicles:
    """A VehicleAgent fed by hand: what it executes and what it sends."""

    def __init__(
        self, fleet: Fleet, tmp_path: Path, clock: Callable[[], float] = lambda: NOW
    ) -> None:
        self.executed: Counter[str] = Counter()
        self.transport = MemoryTransport()
        self.agent = VehicleAgent(
            SETTINGS,
            vehicles=[VehicleIdentity.from_key_file(fleet.files[v]) for v in ("V-1", "V-3")],
            directory=fleet.directory,
            minimum_path="xwing",
            handlers={"ping": self.handle},
            store_path=tmp_path / "agent.sqlite",
            clock=clock,
            transport=self.transport,
        )

    @property
    def sent(self) -> list[tuple[str, str, bytes]]:
        """What the agent sent: (topic, key, value)."""
        return [(r.topic, (r.key or b"").decode(), r.value or b"") for r in self.transport.sent]

    def handle(self, command: Any) -> HandlerResult:
        self.executed[command.id] += 1
        return HandlerResult(200, "ok")

    def feed(self, value: bytes, key: bytes) -> None:
        errors = self.agent.stats.errors
        self.transport.feed(TOPICS.outbound, key, value)
        assert self.agent.poll_once(0) == 1
        assert self.agent.stats.errors == errors  # nothing raised inside the agent

    def statuses(self) -> list[tuple[str, bytes]]:
        return [
            (key, value)
            for topic, key, value in self.sent
            if topic == TOPICS.responses and record_version(value) == 2
        ]


def test_seal_stage_writes_v2_to_wire2_vehicles_with_establishment_first(fleet: Fleet) -> None:
    stage = seal_stage(fleet)
    first = stage.process(authorized(fleet, "V-1"), PartitionState(), NOW)
    est, message = outputs(first, TOPICS.outbound)
    assert (est.key, message.key) == (b"V-1", b"V-1")
    assert isinstance(decode_record(est.value), ParsedEstablishment)
    assert isinstance(decode_record(message.value), Message)
    assert message.headers == ()  # the command id is not in a Kafka header any more
    [copy] = outputs(first, TOPICS.responses)
    assert (copy.key, copy.value) == (b"V-1", est.value)
    assert first.audit[-1].detail["wire"] == 2
    second = stage.process(authorized(fleet, "V-1"), PartitionState(), NOW)
    [only] = outputs(second, TOPICS.outbound)
    assert isinstance(decode_record(only.value), Message)
    assert not outputs(second, TOPICS.responses)
    assert len(only.value) < 600  # vs ~1.3 KB + a KEM ciphertext for v1 on xwing
    # Not announced: v1.
    legacy = stage.process(authorized(fleet, "V-3"), PartitionState(), NOW)
    [v1] = outputs(legacy, TOPICS.outbound)
    assert record_version(v1.value) == 1
    assert v1.headers[0][0] == "fleetbus-command-id"
    # The setting off: v1 even for a wire2 vehicle.
    [off] = outputs(
        seal_stage(fleet, wire_version=1).process(authorized(fleet, "V-1"), PartitionState(), NOW),
        TOPICS.outbound,
    )
    assert record_version(off.value) == 1


def test_an_aborted_establishment_is_sent_again(fleet: Fleet) -> None:
    stage = seal_stage(fleet)
    with held_until_commit():  # the transaction aborts: the held updates are dropped
        aborted = stage.process(authorized(fleet, "V-1"), PartitionState(), NOW)
    assert len(outputs(aborted, TOPICS.outbound)) == 2
    with held_until_commit() as held:
        again = stage.process(authorized(fleet, "V-1"), PartitionState(), NOW)
    for update in held:
        update()
    assert len(outputs(again, TOPICS.outbound)) == 2  # same epoch, establishment again
    after = stage.process(authorized(fleet, "V-1"), PartitionState(), NOW)
    assert len(outputs(after, TOPICS.outbound)) == 1


def test_vehicle_opens_executes_once_and_answers_redelivery(fleet: Fleet, tmp_path: Path) -> None:
    stage, vehicles = seal_stage(fleet), Vehicles(fleet, tmp_path)
    result = stage.process(authorized(fleet, "V-1"), PartitionState(), NOW)
    for out in outputs(result, TOPICS.outbound):
        vehicles.feed(out.value, out.key)
    assert list(vehicles.executed.values()) == [1]
    assert vehicles.agent.stats.epochs == 1
    answers = [s for s in vehicles.sent if s[0] == TOPICS.responses]
    # The bus announces wire2: the vehicle's uplink epoch for answers, then the answer.
    assert [(key, type(decode_record(v))) for _, key, v in answers] == [
        ("V-1", ParsedEstablishment),
        ("V-1", Message),
    ]
    vehicles.feed(outputs(result, TOPICS.outbound)[-1].value, b"V-1")  # redelivered
    assert list(vehicles.executed.values()) == [1]
    again = [s for s in vehicles.sent if s[0] == TOPICS.responses][2:]
    # Answered again, without the establishment the broker has acknowledged.
    assert [(key, type(decode_record(v))) for _, key, v in again] == [("V-1", Message)]


def response_path(fleet: Fleet) -> ResponsePath:
    """The response and track stages in a row, with a fresh response-stage state."""
    stage = response_stage(fleet)
    return ResponsePath(
        topics=TOPICS,
        opener=stage.opener,
        clock_skew_s=30,
        max_message_bytes=64 * 1024,
        sealer_principal="bus-sealer",
        v2_openers=stage.v2_openers,
    )


def test_v2_answers_are_verified_by_vehicle_and_reach_the_track_stage_by_command(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Issue 13: the answer travels in v2 keyed by vehicle id; the response stage opens it in
    the vehicle's uplink epoch, refuses its copies and forwards it keyed by command id; the
    track stage turns it into the command's outcome."""
    seal, vehicles = seal_stage(fleet), Vehicles(fleet, tmp_path)
    path = response_path(fleet)
    track_state = PartitionState()
    auth = authorized(fleet, "V-1")
    cid = (auth.key or b"").decode()
    assert not path.process(auth, track_state, NOW).outputs
    for out in outputs(seal.process(auth, PartitionState(), NOW), TOPICS.outbound):
        vehicles.feed(out.value, out.key)
    (_, _, est), (_, _, message) = [s for s in vehicles.sent if s[0] == TOPICS.responses]

    def feed(key: bytes, value: bytes) -> StageResult:
        return path.process(
            InputRecord(TOPICS.responses, 0, next(_offsets), key, value), track_state, NOW
        )

    def reason(result: StageResult) -> str:
        return DeadLetter.decode(outputs(result, TOPICS.dlq)[0].value).reason.value

    assert reason(feed(b"V-1", message)) == "epoch_unknown"  # before its establishment
    assert feed(b"V-1", est).outputs == []
    assert reason(feed(cid.encode(), message)) == "malformed"  # v2 is keyed by the vehicle
    flipped = message[:-1] + bytes([message[-1] ^ 1])
    assert reason(feed(b"V-1", flipped)) == "tampered"
    answered = feed(b"V-1", message)
    [status] = outputs(answered, TOPICS.status)
    event = StatusEvent.decode(status.value)
    assert (event.command_id, str(event.state), event.vehicle_id) == (cid, "succeeded", "V-1")
    assert [a.detail.get("key_path") for a in answered.audit] == ["xwing"]
    assert reason(feed(b"V-1", message)) == "replayed"  # the epoch's window
    # The same answer sealed again (after a redelivery): a new sequence, the same message id.
    vehicles.feed(
        outputs(seal.process(auth, PartitionState(), NOW), TOPICS.outbound)[-1].value, b"V-1"
    )
    (_, key, resent) = [s for s in vehicles.sent if s[0] == TOPICS.responses][-1]
    assert reason(feed(key.encode(), resent)) == "replayed"
    # The response stage's state holds the vehicle's epoch and ids, keyed by the vehicle.
    assert all("V-1" in k or "bus-sealer" in k for k, _ in path.response_state().items())


def test_lost_epoch_is_recovered_through_status_and_redelivery(
    fleet: Fleet, tmp_path: Path
) -> None:
    seal, track, vehicles = seal_stage(fleet), response_stage(fleet), Vehicles(fleet, tmp_path)
    track_state = PartitionState()
    first = seal.process(authorized(fleet, "V-1"), PartitionState(), NOW)
    # The response stage keeps the copy of the establishment (same key as the vehicle's status).
    [copy] = outputs(first, TOPICS.responses)
    kept = track.process(
        InputRecord(TOPICS.responses, 0, 1, copy.key, copy.value), track_state, NOW
    )
    assert not kept.outputs
    # The vehicle missed the establishment: it holds the message and reports the epoch.
    message = outputs(first, TOPICS.outbound)[-1]
    vehicles.feed(message.value, b"V-1")
    assert not vehicles.executed
    [(key, status)] = vehicles.statuses()
    assert key == "V-1"
    answer = track.process(
        InputRecord(TOPICS.responses, 0, 2, key.encode(), status), track_state, NOW
    )
    [redelivered] = outputs(answer, TOPICS.outbound)
    assert (redelivered.key, redelivered.value) == (b"V-1", copy.value)
    assert [e.event for e in answer.audit] == ["epoch_redelivered"]
    # A second status inside the interval is not answered again.
    again = track.process(
        InputRecord(TOPICS.responses, 0, 3, key.encode(), status), track_state, NOW
    )
    assert not again.outputs
    vehicles.feed(redelivered.value, b"V-1")
    assert list(vehicles.executed.values()) == [1]
    # Establishment once more (re-delivery is idempotent) and the message again: no second run.
    vehicles.feed(redelivered.value, b"V-1")
    vehicles.feed(message.value, b"V-1")
    assert list(vehicles.executed.values()) == [1]


def test_a_held_message_survives_a_restart_of_the_agent(fleet: Fleet, tmp_path: Path) -> None:
    """Issue 13: the held message's offset is committed once held, so the hold must be on disk:
    a new agent on the same store runs it once when the establishment comes again."""
    first = seal_stage(fleet).process(authorized(fleet, "V-1"), PartitionState(), NOW)
    establishment, message = outputs(first, TOPICS.outbound)
    before = Vehicles(fleet, tmp_path)
    before.feed(message.value, b"V-1")  # missed the establishment: held, status sent
    assert len(before.statuses()) == 1
    assert not before.executed
    before.agent.close()
    after = Vehicles(fleet, tmp_path)  # same store file, nothing read again from Kafka
    after.feed(establishment.value, b"V-1")
    assert list(after.executed.values()) == [1]
    # Its answer only: in v2, the uplink epoch's establishment and the message, on responses.
    assert {topic for topic, _key, _value in after.sent} == {TOPICS.responses}
    # Released once: the establishment again runs nothing, nor does the message itself.
    after.feed(establishment.value, b"V-1")
    after.feed(message.value, b"V-1")
    assert list(after.executed.values()) == [1]
    after.agent.close()


def test_a_repeated_held_record_does_not_starve_the_status_of_another_epoch(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Statuses go at most one per vehicle per interval; one held record fed again and again
    (a redelivery, or an insider's record with a made-up epoch) must not take every status:
    the other held epoch is asked about when the interval has passed, even with no new record."""
    clock = [NOW]
    vehicles = Vehicles(fleet, tmp_path, clock=lambda: clock[0])
    # Two sealers: two epochs, and the vehicle missed both establishments.
    first, second = (
        outputs(seal_stage(fleet).process(authorized(fleet, "V-1"), PartitionState(), NOW),
                TOPICS.outbound)[-1].value
        for _ in range(2)
    )  # fmt: skip

    def asked() -> list[bytes]:
        return [
            decode_record(value).status.epoch_id  # type: ignore[union-attr]
            for _key, value in vehicles.statuses()
        ]

    def epoch_of(value: bytes) -> bytes:
        parsed = decode_record(value)
        assert isinstance(parsed, Message)
        return parsed.header.epoch_id

    vehicles.feed(first, b"V-1")
    clock[0] += 1
    vehicles.feed(second, b"V-1")  # held; its status waits for the interval
    assert asked() == [epoch_of(first)]
    clock[0] += 10
    vehicles.feed(first, b"V-1")  # the first again: the second epoch is owed its status
    assert asked() == [epoch_of(first), epoch_of(second)]
    clock[0] += 10
    vehicles.feed(second, b"V-1")  # asked about in turn: the first, least recently asked
    clock[0] += 2
    vehicles.feed(first, b"V-1")  # inside the interval: owed
    assert len(asked()) == 3
    vehicles.agent.poll_once(0)  # no record, interval not over: still owed
    clock[0] += 10
    vehicles.agent.poll_once(0)  # no record: the owed status goes
    assert asked() == [epoch_of(first), epoch_of(second)] * 2
    assert not vehicles.executed
    vehicles.agent.close()


def test_a_hold_the_store_cannot_write_is_read_again_not_committed(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = seal_stage(fleet).process(authorized(fleet, "V-1"), PartitionState(), NOW)
    establishment, message = outputs(first, TOPICS.outbound)
    vehicles = Vehicles(fleet, tmp_path)

    def disk_full(*args: Any, **kwargs: Any) -> bool:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as patch:
        patch.setattr(vehicles.agent.store, "hold", disk_full)
        vehicles.transport.feed(TOPICS.outbound, b"V-1", message.value)
        assert vehicles.agent.poll_once(0) == 1
    assert vehicles.transport.commits == []  # not held, so not committed
    assert vehicles.agent.stats.errors == 1
    assert vehicles.agent.poll_once(0) == 1  # the same record again (no wait: timeout 0), held
    vehicles.feed(establishment.value, b"V-1")
    assert list(vehicles.executed.values()) == [1]
    vehicles.agent.close()


def test_response_stage_refuses_foreign_establishments_and_unknown_epochs(
    fleet: Fleet, tmp_path: Path
) -> None:
    track, vehicles = response_stage(fleet), Vehicles(fleet, tmp_path)
    state = PartitionState()
    first = seal_stage(fleet).process(authorized(fleet, "V-1"), PartitionState(), NOW)
    [copy] = outputs(first, TOPICS.responses)
    # Under another vehicle's key: not kept.
    wrong = track.process(InputRecord(TOPICS.responses, 0, 1, b"V-3", copy.value), state, NOW)
    [dlq] = outputs(wrong, TOPICS.dlq)
    assert DeadLetter.decode(dlq.value).reason.value == "wrong_recipient"
    # A status for an epoch this partition does not hold: audited, nothing sent.
    vehicles.feed(outputs(first, TOPICS.outbound)[-1].value, b"V-1")
    [(_key, status)] = vehicles.statuses()
    result = track.process(InputRecord(TOPICS.responses, 0, 2, b"V-1", status), state, NOW)
    assert not result.outputs
    assert [e.event for e in result.audit] == ["epoch_unknown"]
    # A status under another key than its signer's: dead-lettered.
    bad = track.process(InputRecord(TOPICS.responses, 0, 3, b"V-3", status), state, NOW)
    assert DeadLetter.decode(outputs(bad, TOPICS.dlq)[0].value).reason.value == "malformed"
    # Tampered status: bad signature.
    tampered = status[:-1] + bytes([status[-1] ^ 1])
    bad = track.process(InputRecord(TOPICS.responses, 0, 4, b"V-1", tampered), state, NOW)
    assert DeadLetter.decode(outputs(bad, TOPICS.dlq)[0].value).reason.value == "bad_signature"
    # Held establishment copies end with their epoch.
    track.process(InputRecord(TOPICS.responses, 0, 5, copy.key, copy.value), state, NOW)
    assert any(k.startswith("est/") for k, _ in state.items())
    track.tick(0, state, NOW + 400)
    assert not any(k.startswith("est/") for k, _ in state.items())


def test_wire_version_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETBUS_WIRE_VERSION", "2")
    assert FleetbusSettings().wire_version == 2
    monkeypatch.setenv("FLEETBUS_WIRE_VERSION", "3")
    with pytest.raises(ValueError, match="wire_version"):
        FleetbusSettings()


def telemetry_stage(fleet: Fleet, clock: Any = lambda: NOW) -> TelemetryStage:
    runner = KeyPathRunner({n: load_key_provider(n) for n in ("xwing", "x25519")})

    def v1(minimum: str) -> EnvelopeOpener:
        return EnvelopeOpener(
            fleet.files["bus-sealer"].key_set(), fleet.directory, runner,
            KeyPath.parse(minimum), check_replay=False, clock=lambda: NOW,
        )  # fmt: skip

    def v2(minimum: str) -> EpochOpener:
        return EpochOpener(
            fleet.files["bus-sealer"].key_set(), fleet.directory, runner,
            KeyPath.parse(minimum), direction=Direction.UPLINK, clock=clock,
        )  # fmt: skip

    return TelemetryStage(
        topics=TOPICS,
        opener=UplinkOpener(fleet.directory, v1("xwing"), v1("x25519"), clock=lambda: NOW),
        policy=PolicyEngine(
            FleetRegistry.from_mapping({}).with_directory_records(fleet.directory.records())
        ),
        consumer="analytics",
        max_message_bytes=64 * 1024,
        v2_openers=(v2("xwing"), v2("x25519")),
    )


def telemetry_records(vehicles: Vehicles) -> list[tuple[str, bytes]]:
    return [(k, v) for t, k, v in vehicles.sent if t == TOPICS.telemetry_raw]


def test_telemetry_batches_are_exported_per_reading(fleet: Fleet, tmp_path: Path) -> None:
    vehicles, stage, state = Vehicles(fleet, tmp_path), telemetry_stage(fleet), PartitionState()
    agent = vehicles.agent
    for i in range(SETTINGS.telemetry_batch_readings * 2):
        agent.add_reading("V-1", {"speed_kmh": 40 + i, "soc_pct": 80}, at=NOW + i)
    sent = telemetry_records(vehicles)
    assert [record_version(v) for _, v in sent] == [2, 2, 2]  # establishment + two batches
    assert isinstance(decode_record(sent[0][1]), ParsedEstablishment)
    exported: list[Any] = []
    for offset, (key, value) in enumerate(sent):
        result = stage.process(
            InputRecord(TOPICS.telemetry_raw, 0, offset, key.encode(), value), state, NOW
        )
        assert not outputs(result, TOPICS.dlq)
        exported += outputs(result, TOPICS.telemetry_verified)
    assert len(exported) == SETTINGS.telemetry_batch_readings * 2
    docs = [json.loads(o.value) for o in exported]
    assert {d["vehicle_id"] for d in docs} == {"V-1"}
    assert [d["at"] for d in docs] == [round((NOW + i) * 1000) / 1000 for i in range(len(docs))]
    assert agent.stats.telemetry == len(docs)
    # The same batch again: refused by the epoch's replay window in the partition state.
    again = stage.process(InputRecord(TOPICS.telemetry_raw, 0, 9, b"V-1", sent[1][1]), state, NOW)
    assert DeadLetter.decode(outputs(again, TOPICS.dlq)[0].value).reason.value == "replayed"
    # A restarted worker (no secret in memory) re-derives the epoch secret from the state.
    agent.add_reading("V-1", {"speed_kmh": 1}, at=NOW)
    agent.flush_telemetry()
    key, value = telemetry_records(vehicles)[-1]
    fresh = telemetry_stage(fleet).process(
        InputRecord(TOPICS.telemetry_raw, 0, 10, key.encode(), value), state, NOW
    )
    assert len(outputs(fresh, TOPICS.telemetry_verified)) == 1
    # The state holds the epoch's public fields and window, never its secret.
    [(ep_key, ep_raw)] = [(k, v) for k, v in state.items() if k.startswith("up/ep/")]
    assert "secret" not in cbor2.loads(ep_raw)
    stage.tick(0, state, NOW + 400)
    assert state.get(ep_key) is None


def test_telemetry_v2_rejects(fleet: Fleet, tmp_path: Path) -> None:
    vehicles, stage = Vehicles(fleet, tmp_path), telemetry_stage(fleet)
    vehicles.agent.publish_telemetry("V-1", {"speed_kmh": 3}, at=NOW)
    (_, est), (_, message) = telemetry_records(vehicles)

    def reason(key: bytes, value: bytes, state: PartitionState) -> str:
        result = stage.process(InputRecord(TOPICS.telemetry_raw, 0, 0, key, value), state, NOW)
        return DeadLetter.decode(outputs(result, TOPICS.dlq)[0].value).reason.value

    assert reason(b"V-1", message, PartitionState()) == "epoch_unknown"
    assert reason(b"V-3", est, PartitionState()) == "malformed"  # under another vehicle's key
    state = PartitionState()
    stage.process(InputRecord(TOPICS.telemetry_raw, 0, 1, b"V-1", est), state, NOW)
    flipped = message[:-1] + bytes([message[-1] ^ 1])
    assert reason(b"V-1", flipped, state) == "tampered"
    assert reason(b"V-3", message, state) == "malformed"


def test_a_mis_keyed_copy_does_not_spend_the_senders_sequence(fleet: Fleet, tmp_path: Path) -> None:
    """A copy of a batch under another vehicle's key is refused before it is opened: opening
    would record its sequence number, and the sender's own batch would then be "replayed"."""
    vehicles, stage, state = Vehicles(fleet, tmp_path), telemetry_stage(fleet), PartitionState()
    vehicles.agent.publish_telemetry("V-1", {"speed_kmh": 3}, at=NOW)
    (_, est), (_, message) = telemetry_records(vehicles)
    stage.process(InputRecord(TOPICS.telemetry_raw, 0, 1, b"V-1", est), state, NOW)
    copy = stage.process(InputRecord(TOPICS.telemetry_raw, 0, 2, b"V-3", message), state, NOW)
    assert DeadLetter.decode(outputs(copy, TOPICS.dlq)[0].value).reason.value == "malformed"
    own = stage.process(InputRecord(TOPICS.telemetry_raw, 0, 3, b"V-1", message), state, NOW)
    assert not outputs(own, TOPICS.dlq)
    assert len(outputs(own, TOPICS.telemetry_verified)) == 1


def test_a_v2_answer_rewrites_its_window_not_its_epoch(fleet: Fleet, tmp_path: Path) -> None:
    """Each message moves its epoch's replay window; the window is kept apart from the epoch
    (which holds the 1-5 kB establishment record), so a message writes a few bytes of state and
    of its changelog, not the establishment again (measured: docs/performance.md)."""
    seal, vehicles, stage = seal_stage(fleet), Vehicles(fleet, tmp_path), response_stage(fleet)
    state = PartitionState()
    for out in outputs(
        seal.process(authorized(fleet, "V-1"), PartitionState(), NOW), TOPICS.outbound
    ):
        vehicles.feed(out.value, out.key)
    (_, _, est), (_, _, message) = [s for s in vehicles.sent if s[0] == TOPICS.responses]
    stage.process(InputRecord(TOPICS.responses, 0, 1, b"V-1", est), state, NOW)
    state.commit()
    answered = stage.process(InputRecord(TOPICS.responses, 0, 2, b"V-1", message), state, NOW)
    assert outputs(answered, TOPICS.responses_verified)
    written = state.changes()
    assert not [k for k in written if k.startswith("up/ep/")]
    assert [k for k in written if k.startswith("up/ew/")]
    assert sum(len(k) + len(v or b"") for k, v in written.items()) < 200
    state.commit()
    stage.tick(0, state, NOW + 4000)  # the epoch ends: its window goes with it
    state.commit()
    assert not [k for k, _ in state.items() if k.startswith(("up/ep/", "up/ew/"))]


class _Pending:
    """A Kafka future that never completes (the broker has not acknowledged)."""

    def add_callback(self, fn: Any) -> None:
        pass


def test_a_failed_batch_keeps_its_readings_and_an_unacknowledged_establishment_is_resent(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetbus.bus.envelope import EnvelopeError
    from fleetbus.bus.errors import KafkaUnavailableError, ReasonCode

    vehicles = Vehicles(fleet, tmp_path)
    agent = vehicles.agent
    vehicle = agent._vehicles["V-1"]
    real_prepare = vehicle.uplink_v2.prepare

    def broken(request: Any) -> Any:
        raise EnvelopeError("key path down", reason=ReasonCode.KEY_PATH_EXHAUSTED)

    monkeypatch.setattr(vehicle.uplink_v2, "prepare", broken)
    n = SETTINGS.telemetry_batch_readings
    for i in range(n - 1):
        agent.add_reading("V-1", {"i": i}, at=NOW)
    with pytest.raises(KafkaUnavailableError):
        agent.add_reading("V-1", {"i": n - 1}, at=NOW)
    assert len(vehicle.readings) == n  # nothing lost
    monkeypatch.setattr(vehicle.uplink_v2, "prepare", real_prepare)
    # The broker does not acknowledge the establishment: the next batch carries it again.
    sent: list[bytes] = []

    class Unacknowledged(MemoryTransport):
        def send(self, topic: str, key: bytes, value: bytes, headers: Any) -> Any:
            sent.append(value)
            return _Pending()

    agent.transport = Unacknowledged()
    agent.flush_telemetry()
    agent.add_reading("V-1", {"i": 0}, at=NOW)
    agent.flush_telemetry()
    kinds = [type(decode_record(v)).__name__ for v in sent]
    assert kinds == ["ParsedEstablishment", "Message", "ParsedEstablishment", "Message"]
    assert TelemetryBatch.decode(decode_batch(fleet, sent[:2])).readings[-1][1] == {"i": n - 1}


def decode_batch(fleet: Fleet, records: list[bytes]) -> bytes:
    """The plaintext of a batch, opened as the bus would."""
    runner = KeyPathRunner({n: load_key_provider(n) for n in ("xwing", "x25519")})
    opener = EpochOpener(
        fleet.files["bus-sealer"].key_set(), fleet.directory, runner, KeyPath.parse("xwing"),
        direction=Direction.UPLINK, clock=lambda: NOW,
    )  # fmt: skip
    opener.open(records[0], topic=TOPICS.telemetry_raw)
    opened = opener.open(records[1], topic=TOPICS.telemetry_raw)
    return opened.payload  # type: ignore[union-attr]


class _BrokenQKD(KeyProvider):
    """A QKD provider whose link is down."""

    name = "qkd-etsi014"
    post_quantum = True

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        raise KeyProviderError("link down", reason=ReasonCode.QKD_UNAVAILABLE)

    def recover(self, key_ref: bytes, key_id: str, own: PrivateKeySet, *, context: bytes) -> bytes:
        raise KeyProviderError("link down", reason=ReasonCode.QKD_UNAVAILABLE)


def test_v2_keeps_failover_audit_and_enclave_refusal(fleet: Fleet) -> None:
    runner = KeyPathRunner(
        {"xwing": load_key_provider("xwing"), "x25519": load_key_provider("x25519"),
         "qkd-etsi014": _BrokenQKD()}
    )  # fmt: skip
    profiles = {
        name: profile_from_settings(name, p.key_paths, p.allow_fallback, p.minimum_path, SUITE)
        for name, p in SETTINGS.profiles.items()
    }
    profile_sealer = ProfileSealer(runner, retries=0, sleep=lambda _: None)
    signer = fleet.files["bus-sealer"].signer()
    stage = SealStage(
        topics=TOPICS,
        directory=fleet.directory,
        sealer=EnvelopeSealer("bus-sealer", signer, profile_sealer),
        profiles=profiles,
        rules=[ProfileChoice("enclave", "high"), ProfileChoice("standard")],
        clock_skew_s=30,
        sealer_v2=EpochSealer("bus-sealer", signer, profile_sealer, clock=lambda: NOW),
        wire_version=2,
    )
    profile_sealer.add_listener(stage.on_failover)
    routine = stage.process(authorized(fleet, "V-1"), PartitionState(), NOW)
    est, _message = outputs(routine, TOPICS.outbound)
    parsed = decode_record(est.value)
    assert isinstance(parsed, ParsedEstablishment)
    assert parsed.establishment.key_path == "xwing"  # failed over, visibly
    assert [e.event for e in routine.audit] == ["keypath_failover", "sealed"]
    high = authorized(fleet, "V-1", "unlock_doors")
    value = AuthorizedCommand.decode(high.value)
    high = InputRecord(
        high.topic, 0, high.offset, high.key,
        AuthorizedCommand(
            value.command_id, value.vehicle_id, value.issuer, value.action, "high",
            value.issued_at, value.expires_at, value.signed_command,
        ).encode(),
    )  # fmt: skip
    refused = stage.process(high, PartitionState(), NOW)
    assert not outputs(refused, TOPICS.outbound)
    assert DeadLetter.decode(outputs(refused, TOPICS.dlq)[0].value).reason.value == (
        "key_path_exhausted"
    )


def test_uplink_epochs_are_bounded_per_sender(fleet: Fleet, tmp_path: Path) -> None:
    from fleetbus.processors.uplink import EPOCHS_PER_SENDER

    stage, state = telemetry_stage(fleet), PartitionState()
    vehicles = Vehicles(fleet, tmp_path)
    agent = vehicles.agent

    def new_epoch_record() -> bytes:
        # A fresh uplink sealer: a new epoch, so a new establishment.
        vehicle = agent._vehicles["V-1"]
        vehicle.uplink_v2 = EpochSealer(
            "V-1", vehicle.identity.signer, agent._profile_sealer,
            direction=Direction.UPLINK, clock=lambda: NOW,
        )  # fmt: skip
        vehicles.transport.sent.clear()
        agent.publish_telemetry("V-1", {"x": 1}, at=NOW)
        return telemetry_records(vehicles)[0][1]

    def feed(value: bytes, now: float = NOW) -> StageResult:
        return stage.process(InputRecord(TOPICS.telemetry_raw, 0, 0, b"V-1", value), state, now)

    for _ in range(EPOCHS_PER_SENDER):
        assert not outputs(feed(new_epoch_record()), TOPICS.dlq)
    full = feed(new_epoch_record())
    assert DeadLetter.decode(outputs(full, TOPICS.dlq)[0].value).reason.value == (
        "sender_state_full"
    )
    stage.tick(0, state, NOW + 400)  # the epochs end: room again
    assert not outputs(feed(new_epoch_record(), NOW + 400), TOPICS.dlq)


def test_an_epoch_erased_when_its_late_message_arrives_frees_its_senders_slot(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Regression: a message of an ended epoch that arrives before the tick sweeps the epoch
    makes the opener erase it; the sender's epoch count dropped only in the tick, so each such
    message (a vehicle's late message, or anyone's re-published copy of one) took one of the
    sender's EPOCHS_PER_SENDER slots for good, and after eight the vehicle was locked out."""
    from fleetbus.processors.uplink import EPOCH_COUNT_PREFIX, read_count, sender_key
    from fleetbus.providers.sealing import EpochPolicy

    clock = [NOW]
    stage, state = telemetry_stage(fleet, clock=lambda: clock[0]), PartitionState()
    vehicles = Vehicles(fleet, tmp_path)
    agent = vehicles.agent
    vehicle = agent._vehicles["V-1"]
    vehicle.uplink_v2 = EpochSealer(
        "V-1", vehicle.identity.signer, agent._profile_sealer, epochs=EpochPolicy(1, 1000),
        direction=Direction.UPLINK, clock=lambda: NOW,
    )  # fmt: skip
    agent.publish_telemetry("V-1", {"x": 1}, at=NOW)
    (_, est), (_, message) = telemetry_records(vehicles)
    count_key = sender_key(EPOCH_COUNT_PREFIX, "V-1")
    stage.process(InputRecord(TOPICS.telemetry_raw, 0, 0, b"V-1", est), state, NOW)
    assert read_count(state, count_key) == 1
    clock[0] = late = NOW + 32  # past the epoch's end + skew, before the message's expiry
    result = stage.process(InputRecord(TOPICS.telemetry_raw, 0, 1, b"V-1", message), state, late)
    assert DeadLetter.decode(outputs(result, TOPICS.dlq)[0].value).reason.value == "expired"
    assert not [k for k, _ in state.items() if k.startswith(("up/ep/", "up/ew/"))]
    assert read_count(state, count_key) == 0
