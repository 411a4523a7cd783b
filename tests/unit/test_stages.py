"""Stage logic without Kafka: authorize, seal (with failover), track and telemetry.

Over 500 lines because the four stages' cases share one fleet and the stage builders that
test_expiry and test_bus_latency import.
"""

from __future__ import annotations

import json
import time
from typing import Any

import cbor2
import pytest

from fleetbus.bus.commands import (
    Approval,
    Command,
    CommandState,
    Decision,
    Response,
    SignedApproval,
    SignedCommand,
    StatusEvent,
    Target,
    Telemetry,
    VerifiedResponse,
)
from fleetbus.bus.directory import FleetRoot
from fleetbus.bus.envelope import decode_envelope
from fleetbus.bus.errors import FleetbusError, ReasonCode
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
from fleetbus.bus.topics import kafka_partition
from fleetbus.observability.metrics import KEYPATH_FAILOVER
from fleetbus.processors.eos import DeadLetter, InputRecord, PartitionState, StageResult
from fleetbus.processors.stages import (
    AuthorizedCommand,
    AuthorizeStage,
    PipelineTopics,
    ProfileChoice,
    RejectedCommand,
    SealStage,
    TelemetryStage,
    TrackStage,
    UplinkOpener,
    profile_from_settings,
)
from fleetbus.processors.stages.common import FOR_SEAL, FOR_TRACK
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
from fleetbus.providers.sealing import EnvelopeOpener, EnvelopeSealer
from tests.support.envelope import Fleet, fleet_of, issuer
from tests.support.responses import ResponsePath

NOW = time.time() - 7200  # the openers get this clock too: results do not depend on run time
TOPICS = PipelineTopics.from_settings(FleetbusSettings().topics)
SUITE = "ed25519"


class BrokenQKD(KeyProvider):
    """A QKD provider whose link is down."""

    name = "qkd-etsi014"
    post_quantum = True

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        raise KeyProviderError("link down", reason=ReasonCode.QKD_UNAVAILABLE)

    def recover(self, key_ref: bytes, key_id: str, own: PrivateKeySet, *, context: bytes) -> bytes:
        raise KeyProviderError("link down", reason=ReasonCode.QKD_UNAVAILABLE)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    root = FleetRoot.generate(SUITE)
    issue = issuer(root, SUITE, NOW)
    kems = ["xwing", "x25519"]
    issued = [
        issue("bus-sealer", "sealer", kems=kems),
        issue("dispatch-1", "dispatcher"),
        issue("dispatch-2", "approver"),
        issue("V-1", "vehicle", kems=kems, groups=["north"]),
        issue("V-2", "vehicle", kems=kems, groups=["north"], qkd_sae_id="sae-v2"),
        issue("V-3", "vehicle", kems=["x25519"], groups=["south"]),
    ]
    stranger = issuer(FleetRoot.generate(SUITE), SUITE, NOW)("intruder", "dispatcher")
    return fleet_of(root, issued, outsiders=[stranger])


def authorize(fleet: Fleet, window_s: float = 60.0) -> AuthorizeStage:
    return AuthorizeStage(
        topics=TOPICS,
        directory=fleet.directory,
        policy=fleet.policy,
        approvals_required=1,
        approval_window_s=window_s,
        clock_skew_s=30,
        max_lifetime_s=86400,
        max_message_bytes=32 * 1024,
    )


def signed(
    fleet: Fleet,
    target: Target,
    action: str = "ping",
    *,
    issuer: str = "dispatch-1",
    ttl_s: float = 60,
    now: float = NOW,
) -> SignedCommand:
    command = Command.create(issuer=issuer, target=target, action=action, ttl_s=ttl_s, now=now)
    return SignedCommand.sign(command, fleet.files[issuer].signer())


_offsets = iter(range(10**6))


def _command_id_key(topic: str, value: bytes | None) -> bytes:
    """The key a well-behaved producer uses: the command id for commands, approvals and
    responses (their envelope's message id), the sending vehicle for telemetry."""
    try:
        if topic == TOPICS.requested and value is not None:
            return SignedCommand.decode(value).command.id.encode()
        if topic == TOPICS.approvals and value is not None:
            return SignedApproval.decode(value).approval.command_id.encode()
        if topic == TOPICS.responses and value is not None:
            return decode_envelope(value).header.message_id.encode()
        if topic == TOPICS.responses_verified and value is not None:
            return VerifiedResponse.decode(value).command_id.encode()
        if topic == TOPICS.telemetry_raw and value is not None:
            return decode_envelope(value).header.sender.encode()
    except Exception:  # junk stays junk; the stage under test reports it
        pass
    return b"k"


def rec(topic: str, value: bytes | None, key: bytes | None = None) -> InputRecord:
    key = key if key is not None else _command_id_key(topic, value)
    return InputRecord(topic, 0, next(_offsets), key, value)


def outs(result: StageResult, topic: str) -> list[bytes]:
    """The values ``result`` writes to ``topic``; of commands.authorized, the seal stage's copies
    (the track stage's copy, keyed by command id, is left out)."""
    values = [o.value for o in result.outputs if o.topic == topic and o.value is not None]
    if topic == TOPICS.authorized:
        values = [v for v in values if AuthorizedCommand.decode(v).reader != FOR_TRACK]
    return values


def reasons(result: StageResult) -> list[str]:
    return [DeadLetter.decode(v).reason.value for v in outs(result, TOPICS.dlq)]


def test_a_routine_command_is_authorized_once_per_vehicle(fleet: Fleet) -> None:
    stage, state = authorize(fleet), PartitionState()
    cmd = signed(fleet, Target(vehicle="V-1"))
    result = stage.process(rec(TOPICS.requested, cmd.encode()), state, NOW)
    [auth] = [AuthorizedCommand.decode(v) for v in outs(result, TOPICS.authorized)]
    assert (auth.command_id, auth.vehicle_id, auth.criticality) == (
        cmd.command.id,
        "V-1",
        "routine",
    )
    assert SignedCommand.decode(auth.signed_command) == cmd
    assert [StatusEvent.decode(v).state.value for v in outs(result, TOPICS.status)] == [
        "authorized"
    ]
    assert [e.event for e in result.audit] == ["authorized"]
    assert state.get(f"cmd/{cmd.command.id}") is not None


def test_a_vehicle_command_is_keyed_by_its_vehicle_for_the_seal_stage(fleet: Fleet) -> None:
    """The seal stage's copy goes to the vehicle's partition (its key: the vehicle id), the
    track stage's to the command's (key: the command id)."""
    cmd = signed(fleet, Target(vehicle="V-1"))
    result = authorize(fleet).process(rec(TOPICS.requested, cmd.encode()), PartitionState(), NOW)
    copies = [o for o in result.outputs if o.topic == TOPICS.authorized]
    by_reader = {AuthorizedCommand.decode(o.value).reader: o for o in copies}
    assert sorted(by_reader) == [FOR_SEAL, FOR_TRACK]
    assert len(copies) == 2
    assert (by_reader[FOR_SEAL].key, by_reader[FOR_SEAL].partition) == (b"V-1", None)
    assert by_reader[FOR_TRACK].key == cmd.command.id.encode()
    # Only the seal stage's copy carries the signed command; the track stage opens nothing.
    assert SignedCommand.decode(AuthorizedCommand.decode(by_reader[FOR_SEAL].value).signed_command)
    assert AuthorizedCommand.decode(by_reader[FOR_TRACK].value).signed_command == b""
    assert len(by_reader[FOR_TRACK].value) < len(by_reader[FOR_SEAL].value) - len(cmd.encode())
    track = TrackStage(topics=TOPICS, clock_skew_s=30, max_message_bytes=32768, retention_s=300)
    state = PartitionState()
    track.process(rec(TOPICS.authorized, by_reader[FOR_TRACK].value), state, NOW)
    entry = cbor2.loads(state.get(f"cmd/{cmd.command.id}") or b"")
    assert (entry["vehicles"], entry.get("single")) == ({"V-1": "authorized"}, True)


PARTS = 4


def group_partition_records(fleet: Fleet, group: str) -> tuple[SignedCommand, list[Any]]:
    stage = authorize(fleet)
    stage.authorized_partitions = PARTS
    cmd = signed(fleet, Target(group=group), "lock_doors")
    result = stage.process(rec(TOPICS.requested, cmd.encode()), PartitionState(), NOW)
    return cmd, [o for o in result.outputs if o.topic == TOPICS.authorized]


def test_a_group_command_is_one_record_on_every_partition_not_a_member_list(
    fleet: Fleet,
) -> None:
    cmd, copies = group_partition_records(fleet, "north")
    seal = [o for o in copies if AuthorizedCommand.decode(o.value).reader == FOR_SEAL]
    assert sorted(o.partition for o in seal) == list(range(PARTS))
    for out in seal:
        auth = AuthorizedCommand.decode(out.value)
        assert (auth.group, auth.vehicle_id) == ("north", "")
    [track] = [o for o in copies if AuthorizedCommand.decode(o.value).reader == FOR_TRACK]
    assert track.key == cmd.command.id.encode()


def partitioned_seal_stage(fleet: Fleet) -> SealStage:
    stage = seal_stage(fleet)
    stage.partitions = PARTS
    stage.group_members = fleet.policy.registry.partition_members
    return stage


def test_each_seal_partition_expands_a_group_to_its_own_vehicles(fleet: Fleet) -> None:
    """Every member is handled exactly once, by the partition Kafka puts its vehicle id on,
    with a status event naming it (sealed, or rejected: V-2 announces a QKD SAE this test's
    worker has no provider for) — how the track stage learns a group's targets."""
    _, copies = group_partition_records(fleet, "north")
    stage = partitioned_seal_stage(fleet)
    named: dict[str, int] = {}
    sealed: set[str] = set()
    for out in copies:
        record = InputRecord(TOPICS.authorized, out.partition or 0, 1, out.key, out.value)
        result = stage.process(record, PartitionState(), NOW)
        if AuthorizedCommand.decode(out.value).reader == FOR_TRACK:
            assert result.outputs == []
            continue
        for event in map(StatusEvent.decode, outs(result, TOPICS.status)):
            assert event.vehicle_id is not None
            assert event.vehicle_id not in named
            named[event.vehicle_id] = record.partition
            if event.state is CommandState.SEALED:
                sealed.add(event.vehicle_id)
        keys = {o.key for o in result.outputs if o.topic == TOPICS.outbound}
        assert keys <= {v.encode() for v, p in named.items() if p == record.partition}
    assert sorted(named) == ["V-1", "V-2"]
    assert "V-1" in sealed
    assert all(p == kafka_partition(v.encode(), PARTS) for v, p in named.items())


def test_a_vehicle_record_on_another_partition_is_refused_not_sealed(fleet: Fleet) -> None:
    """A seal-stage partition holds only its vehicles' keys: a record for a vehicle of another
    partition (not written by our authorize stage) is refused, never sealed."""
    cmd = signed(fleet, Target(vehicle="V-1"))
    seal_copy = next(
        o
        for o in authorize(fleet)
        .process(rec(TOPICS.requested, cmd.encode()), PartitionState(), NOW)
        .outputs
        if o.topic == TOPICS.authorized and AuthorizedCommand.decode(o.value).reader == FOR_SEAL
    )
    wrong = (kafka_partition(b"V-1", PARTS) + 1) % PARTS
    record = InputRecord(TOPICS.authorized, wrong, 1, seal_copy.key, seal_copy.value)
    result = partitioned_seal_stage(fleet).process(record, PartitionState(), NOW)
    assert reasons(result) == ["wrong_recipient"]
    assert outs(result, TOPICS.outbound) == []
    right = InputRecord(
        TOPICS.authorized, kafka_partition(b"V-1", PARTS), 2, seal_copy.key, seal_copy.value
    )
    result = partitioned_seal_stage(fleet).process(right, PartitionState(), NOW)
    assert len(outs(result, TOPICS.outbound)) == 1


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda f: signed(f, Target(vehicle="V-1"), issuer="intruder"), "unknown_signer"),
        (lambda f: signed(f, Target(vehicle="V-1"), issuer="dispatch-2"), "policy_denied"),
        (lambda f: signed(f, Target(vehicle="V-9")), "policy_denied"),
        (lambda f: signed(f, Target(group="nowhere")), "policy_denied"),
        (lambda f: signed(f, Target(vehicle="V-1"), ttl_s=1, now=NOW - 600), "expired"),
        (lambda f: signed(f, Target(vehicle="V-1"), now=NOW + 600), "not_yet_valid"),
        (lambda f: signed(f, Target(vehicle="V-1"), ttl_s=10 * 86400), "policy_denied"),
    ],
)
def test_rejections_have_a_reason_a_dlq_record_and_an_audit_record(
    fleet: Fleet, make: Any, reason: str
) -> None:
    cmd = make(fleet)
    result = authorize(fleet).process(rec(TOPICS.requested, cmd.encode()), PartitionState(), NOW)
    [rejected] = [RejectedCommand.decode(v) for v in outs(result, TOPICS.rejected)]
    assert rejected.reason.value == reason
    assert rejected.command_id == cmd.command.id
    assert reasons(result) == [reason]
    [status] = [StatusEvent.decode(v) for v in outs(result, TOPICS.status)]
    assert status.state.value == "rejected"
    assert status.reason is not None
    assert "rejected" in [e.event for e in result.audit]
    assert not outs(result, TOPICS.authorized)


def test_a_forged_signature_is_bad_signature_and_not_remembered(fleet: Fleet) -> None:
    cmd = signed(fleet, Target(vehicle="V-1"))
    forged = SignedCommand(cmd.command, cmd.key_id, cmd.suite, bytes(64))
    stage, state = authorize(fleet), PartitionState()
    result = stage.process(rec(TOPICS.requested, forged.encode()), state, NOW)
    assert reasons(result) == ["bad_signature"]
    # The genuine command with that id still goes through: a forgery cannot burn an id.
    result = stage.process(rec(TOPICS.requested, cmd.encode()), state, NOW)
    assert outs(result, TOPICS.authorized)


def test_a_replayed_command_id_is_rejected(fleet: Fleet) -> None:
    stage, state = authorize(fleet), PartitionState()
    cmd = signed(fleet, Target(vehicle="V-1"))
    stage.process(rec(TOPICS.requested, cmd.encode()), state, NOW)
    state.commit()
    result = stage.process(rec(TOPICS.requested, cmd.encode()), state, NOW + 1)
    assert reasons(result) == ["replayed"]
    assert not outs(result, TOPICS.authorized)


@pytest.mark.parametrize("value", [b"", b"\xff\x00junk", cbor2.dumps([1, 2, 3]), None])
def test_garbage_goes_to_the_dlq_as_malformed(fleet: Fleet, value: bytes | None) -> None:
    result = authorize(fleet).process(rec(TOPICS.requested, value), PartitionState(), NOW)
    [letter] = [DeadLetter.decode(v) for v in outs(result, TOPICS.dlq)]
    assert letter.reason is ReasonCode.MALFORMED
    assert letter.value == value
    assert letter.source_topic == TOPICS.requested
    assert not outs(result, TOPICS.rejected)


def test_oversize_input_is_oversize(fleet: Fleet) -> None:
    result = authorize(fleet).process(rec(TOPICS.requested, b"\x00" * 40000), PartitionState(), NOW)
    assert reasons(result) == ["oversize"]


def approval(
    fleet: Fleet,
    cmd: SignedCommand,
    approver: str = "dispatch-2",
    decision: Decision = Decision.APPROVE,
) -> bytes:
    a = Approval.for_command(cmd, approver=approver, decision=decision, issued_at=NOW)
    return SignedApproval.sign(a, fleet.files[approver].signer()).encode()


def test_high_criticality_waits_and_an_approval_completes_it(fleet: Fleet) -> None:
    stage, state = authorize(fleet), PartitionState()
    cmd = signed(fleet, Target(vehicle="V-1"), "unlock_doors")
    result = stage.process(rec(TOPICS.requested, cmd.encode()), state, NOW)
    assert result.outcome == "pending"
    assert not outs(result, TOPICS.authorized)
    assert "pending" in StatusEvent.decode(outs(result, TOPICS.status)[0]).detail
    # The issuer cannot approve itself, a dispatcher is no approver.
    self_approval = approval(fleet, cmd, "dispatch-1")
    assert reasons(stage.process(rec(TOPICS.approvals, self_approval), state, NOW)) == [
        "policy_denied"
    ]
    result = stage.process(rec(TOPICS.approvals, approval(fleet, cmd)), state, NOW + 1)
    [auth] = [AuthorizedCommand.decode(v) for v in outs(result, TOPICS.authorized)]
    assert auth.approvers == ("dispatch-2",)
    assert [e.event for e in result.audit][:2] == ["approved", "authorized"]
    # A late duplicate approval changes nothing.
    late = stage.process(rec(TOPICS.approvals, approval(fleet, cmd)), state, NOW + 2)
    assert not late.outputs


def test_an_approval_before_its_command_is_kept(fleet: Fleet) -> None:
    stage, state = authorize(fleet), PartitionState()
    cmd = signed(fleet, Target(vehicle="V-1"), "unlock_doors")
    stage.process(rec(TOPICS.approvals, approval(fleet, cmd)), state, NOW)
    result = stage.process(rec(TOPICS.requested, cmd.encode()), state, NOW)
    assert outs(result, TOPICS.authorized)


def test_the_window_elapses_into_a_rejection_and_a_deny_rejects(fleet: Fleet) -> None:
    stage, state = authorize(fleet, window_s=5), PartitionState()
    cmd = signed(fleet, Target(vehicle="V-1"), "push_firmware")
    stage.process(rec(TOPICS.requested, cmd.encode()), state, NOW)
    assert not stage.tick(0, state, NOW + 1).outputs
    result = stage.tick(0, state, NOW + 6)
    [rejected] = [RejectedCommand.decode(v) for v in outs(result, TOPICS.rejected)]
    assert rejected.reason is ReasonCode.POLICY_DENIED
    assert "approval window elapsed" in rejected.detail
    [letter] = [DeadLetter.decode(v) for v in outs(result, TOPICS.dlq)]
    assert letter.value == cmd.encode()  # the DLQ keeps the command's original bytes
    late = stage.process(rec(TOPICS.approvals, approval(fleet, cmd)), state, NOW + 7)
    assert not outs(late, TOPICS.authorized)

    other = signed(fleet, Target(vehicle="V-1"), "disable_vehicle")
    stage.process(rec(TOPICS.requested, other.encode()), state, NOW)
    deny = approval(fleet, other, decision=Decision.DENY)
    result = stage.process(rec(TOPICS.approvals, deny), state, NOW + 1)
    assert "denied by approver" in RejectedCommand.decode(outs(result, TOPICS.rejected)[0]).detail


def test_state_is_forgotten_once_the_id_is_too_old_to_be_accepted(fleet: Fleet) -> None:
    """Not at expiry + skew: until the id's UUIDv7 time is older than the replay window (the
    lifetime limit plus skew), when a command under it is refused for its age anyway."""
    stage, state = authorize(fleet), PartitionState()
    cmd = signed(fleet, Target(vehicle="V-1"), ttl_s=10)
    stage.process(rec(TOPICS.requested, cmd.encode()), state, NOW)
    state.commit()
    stage.tick(0, state, NOW + 100)
    assert state.changes() == {}
    forgotten = NOW + 86400 + 30 + 1  # max_lifetime_s + clock_skew_s of ``authorize``
    stage.tick(0, state, forgotten)
    assert state.changes() == {f"cmd/{cmd.command.id}": None}


# --- seal -------------------------------------------------------------------------------


def seal_stage(fleet: Fleet, *, qkd: KeyProvider | None = None) -> SealStage:
    providers: dict[str, KeyProvider] = {n: load_key_provider(n) for n in ("xwing", "x25519")}
    if qkd is not None:
        providers[qkd.name] = qkd
    runner = KeyPathRunner(providers)
    settings = FleetbusSettings()
    profiles = {
        name: profile_from_settings(name, p.key_paths, p.allow_fallback, p.minimum_path, SUITE)
        for name, p in settings.profiles.items()
    }
    rules = [ProfileChoice(r.profile, r.criticality, r.capability) for r in settings.profile_rules]
    profile_sealer = ProfileSealer(runner, retries=0, sleep=lambda _: None)
    sealer = EnvelopeSealer("bus-sealer", fleet.files["bus-sealer"].signer(), profile_sealer)
    stage = SealStage(
        topics=TOPICS,
        directory=fleet.directory,
        sealer=sealer,
        profiles=profiles,
        rules=rules,
        clock_skew_s=30,
    )
    profile_sealer.add_listener(stage.on_failover)
    return stage


def authorized(
    fleet: Fleet, vehicle: str, action: str = "ping", criticality: str = "routine"
) -> bytes:
    cmd = signed(fleet, Target(vehicle=vehicle), action)
    return AuthorizedCommand(
        cmd.command.id,
        vehicle,
        "dispatch-1",
        action,
        criticality,
        cmd.command.issued_at,
        cmd.command.expires_at,
        cmd.encode(),
    ).encode()


def open_as(fleet: Fleet, vehicle: str, envelope: bytes, minimum: str = "x25519") -> Any:
    runner = KeyPathRunner({n: load_key_provider(n) for n in ("xwing", "x25519")})
    opener = EnvelopeOpener(
        fleet.files[vehicle].key_set(),
        fleet.directory,
        runner,
        KeyPath.parse(minimum),
        clock=lambda: NOW,
    )
    return opener.open(envelope, topic=TOPICS.outbound)


def test_seal_picks_pqc_for_pqc_vehicles_and_legacy_visibly_otherwise(fleet: Fleet) -> None:
    stage = seal_stage(fleet)
    result = stage.process(rec(TOPICS.authorized, authorized(fleet, "V-1")), PartitionState(), NOW)
    [out] = [o for o in result.outputs if o.topic == TOPICS.outbound]
    assert out.key == b"V-1"
    opened = open_as(fleet, "V-1", out.value or b"", minimum="xwing")
    assert opened.key_path.name == "xwing"
    assert opened.sender == "bus-sealer"
    assert SignedCommand.decode(opened.payload).command.target.vehicle == "V-1"
    assert StatusEvent.decode(outs(result, TOPICS.status)[0]).state.value == "sealed"

    legacy = stage.process(rec(TOPICS.authorized, authorized(fleet, "V-3")), PartitionState(), NOW)
    [env] = outs(legacy, TOPICS.outbound)
    assert open_as(fleet, "V-3", env).key_path.name == "x25519"
    assert "legacy" in StatusEvent.decode(outs(legacy, TOPICS.status)[0]).detail
    assert legacy.audit[-1].detail["legacy"] is True


def test_qkd_outage_fails_over_to_xwing_with_metric_and_audit(fleet: Fleet) -> None:
    stage = seal_stage(fleet, qkd=BrokenQKD())
    labels = {
        "profile": "standard",
        "from_path": "qkd-etsi014+xwing",
        "to_path": "xwing",
        "reason": "qkd_unavailable",
    }
    before = KEYPATH_FAILOVER.labels(**labels)._value.get()
    result = stage.process(rec(TOPICS.authorized, authorized(fleet, "V-2")), PartitionState(), NOW)
    [env] = outs(result, TOPICS.outbound)
    assert open_as(fleet, "V-2", env, minimum="xwing").key_path.name == "xwing"
    assert KEYPATH_FAILOVER.labels(**labels)._value.get() == before + 1
    assert [e.event for e in result.audit] == ["keypath_failover", "sealed"]


def test_enclave_without_qkd_is_rejected_not_downgraded(fleet: Fleet) -> None:
    stage = seal_stage(fleet, qkd=BrokenQKD())
    value = authorized(fleet, "V-2", "unlock_doors", "high")
    result = stage.process(rec(TOPICS.authorized, value), PartitionState(), NOW)
    assert not outs(result, TOPICS.outbound)
    assert reasons(result) == ["key_path_exhausted"]
    assert RejectedCommand.decode(outs(result, TOPICS.rejected)[0]).vehicle_id == "V-2"


def test_seal_refuses_expired_and_malformed_records(fleet: Fleet) -> None:
    stage = seal_stage(fleet)
    assert reasons(stage.process(rec(TOPICS.authorized, b"junk"), PartitionState(), NOW)) == [
        "malformed"
    ]
    result = stage.process(
        rec(TOPICS.authorized, authorized(fleet, "V-1")), PartitionState(), NOW + 3600
    )
    assert reasons(result) == ["expired"]


# --- track and telemetry -------------------------------------------------------------------


def uplink(fleet: Fleet) -> UplinkOpener:
    runner = KeyPathRunner({n: load_key_provider(n) for n in ("xwing", "x25519")})

    def one(minimum: str) -> EnvelopeOpener:
        return EnvelopeOpener(
            fleet.files["bus-sealer"].key_set(),
            fleet.directory,
            runner,
            KeyPath.parse(minimum),
            clock=lambda: NOW,
            max_lifetime_s=900,
            check_replay=False,  # the stages own the replay check, as the worker builds them
        )

    return UplinkOpener(fleet.directory, one("xwing"), one("x25519"), clock=lambda: NOW)


def vehicle_envelope(
    fleet: Fleet, vehicle: str, kind: str, topic: str, mid: str, payload: bytes, path: str = "xwing"
) -> bytes:
    runner = KeyPathRunner({n: load_key_provider(n) for n in ("xwing", "x25519")})
    sealer = EnvelopeSealer(vehicle, fleet.files[vehicle].signer(), ProfileSealer(runner))
    profile = profile_from_settings("up", [path], False, path, SUITE)
    recipient = fleet.directory.recipient_keys("bus-sealer", at=NOW)
    return sealer.seal(kind, topic, recipient, mid, "response", payload, NOW, NOW + 60, profile)


def test_track_turns_responses_into_final_states_and_expires_the_rest(fleet: Fleet) -> None:
    stage, state = (
        ResponsePath(topics=TOPICS, opener=uplink(fleet), clock_skew_s=30, max_message_bytes=32768),
        PartitionState(),
    )
    value = authorized(fleet, "V-1")
    cid = AuthorizedCommand.decode(value).command_id
    stage.process(rec(TOPICS.authorized, value), state, NOW)
    response = Response(command_id=cid, vehicle_id="V-1", status=200, executed_at=NOW)
    env = vehicle_envelope(fleet, "V-1", "rsp", TOPICS.responses, cid, response.encode())
    result = stage.process(rec(TOPICS.responses, env), state, NOW + 1)
    [status] = [StatusEvent.decode(v) for v in outs(result, TOPICS.status)]
    assert (status.state.value, status.vehicle_id) == ("succeeded", "V-1")
    # A forged response (signed by another vehicle) goes to the DLQ.
    other = Response(command_id=cid, vehicle_id="V-1", status=500, executed_at=NOW)
    bad = vehicle_envelope(fleet, "V-2", "rsp", TOPICS.responses, cid, other.encode())
    assert reasons(stage.process(rec(TOPICS.responses, bad), state, NOW)) == ["wrong_recipient"]
    assert reasons(stage.process(rec(TOPICS.responses, b"junk"), state, NOW)) == ["malformed"]

    value2 = authorized(fleet, "V-2")
    stage.process(rec(TOPICS.authorized, value2), state, NOW)
    expired = stage.tick(0, state, NOW + 3600)
    [event] = [StatusEvent.decode(v) for v in outs(expired, TOPICS.status)]
    assert (event.state.value, event.vehicle_id) == ("expired", "V-2")


def test_track_learns_a_groups_targets_from_the_seal_partitions(fleet: Fleet) -> None:
    """The track stage's copy of a group command names no vehicle: a member's answer counts once
    its seal-stage partition named it (``sealed``), one that overtakes that event is held, and
    the seal stage's copies (keyed by vehicle id, or on every partition) are ignored here."""
    _, copies = group_partition_records(fleet, "north")
    stage, state = (
        ResponsePath(topics=TOPICS, opener=uplink(fleet), clock_skew_s=30, max_message_bytes=32768),
        PartitionState(),
    )
    for out in copies:
        record = InputRecord(TOPICS.authorized, 0, 1, out.key, out.value)
        assert stage.process(record, state, NOW).outputs == []
    cid = AuthorizedCommand.decode(copies[0].value).command_id
    response = Response(command_id=cid, vehicle_id="V-1", status=200, executed_at=NOW)
    env = vehicle_envelope(fleet, "V-1", "rsp", TOPICS.responses, cid, response.encode())
    early = stage.process(rec(TOPICS.responses, env), state, NOW + 1)
    assert early.outcome == "pending"  # held: no partition named V-1 yet
    sealed = StatusEvent(cid, CommandState.SEALED, NOW + 1, vehicle_id="V-1")
    released = stage.process(rec(TOPICS.status, sealed.encode()), state, NOW + 2)
    [status] = [StatusEvent.decode(v) for v in outs(released, TOPICS.status)]
    assert (status.state.value, status.vehicle_id) == ("succeeded", "V-1")


def test_an_authorized_partition_beyond_the_configured_count_is_refused(fleet: Fleet) -> None:
    """More partitions than configured would make groups skip the extra partitions' vehicles
    silently: such a record is a config dead letter, not a partial expansion."""
    _, copies = group_partition_records(fleet, "north")
    seal = next(o for o in copies if AuthorizedCommand.decode(o.value).reader == FOR_SEAL)
    record = InputRecord(TOPICS.authorized, PARTS, 1, seal.key, seal.value)
    results = partitioned_seal_stage(fleet).process_batch([record], PartitionState(), NOW)
    assert isinstance(results[0], FleetbusError)
    assert results[0].reason is ReasonCode.CONFIG


def test_telemetry_is_opened_and_filtered_by_the_export_policy(fleet: Fleet) -> None:
    stage = TelemetryStage(
        topics=TOPICS,
        opener=uplink(fleet),
        policy=fleet.policy,
        consumer="analytics",
        max_message_bytes=32768,
    )
    tel = Telemetry(
        vehicle_id="V-1",
        at=NOW,
        fields={"lat": 52.520008, "lon": 13.404954, "speed": 10.0, "vin": "X"},
    )
    env = vehicle_envelope(fleet, "V-1", "tel", TOPICS.telemetry_raw, "t-1", tel.encode())
    result = stage.process(rec(TOPICS.telemetry_raw, env), PartitionState(), NOW)
    [doc] = [json.loads(v) for v in outs(result, TOPICS.telemetry_verified)]
    assert doc["fields"] == {"lat": 52.52, "lon": 13.4, "speed": 10.0}
    assert doc["vehicle_id"] == "V-1"
    assert doc["key_path"] == "xwing"
    # A pqc vehicle may not send over x25519 alone (downgrade).
    weak = vehicle_envelope(
        fleet, "V-1", "tel", TOPICS.telemetry_raw, "t-2", tel.encode(), "x25519"
    )
    assert reasons(stage.process(rec(TOPICS.telemetry_raw, weak), PartitionState(), NOW)) == [
        "downgrade"
    ]


def test_command_or_approval_under_another_key_goes_to_the_dlq(fleet: Fleet) -> None:
    """The replay set is per partition, so the key (the partition) must be the command id."""
    stage = authorize(fleet)
    cmd = signed(fleet, Target(vehicle="V-1"))
    result = stage.process(rec(TOPICS.requested, cmd.encode(), key=b"other"), PartitionState(), NOW)
    assert reasons(result) == ["malformed"]
    assert not outs(result, TOPICS.authorized)
    result = stage.process(
        rec(TOPICS.approvals, approval(fleet, cmd), key=b"other"), PartitionState(), NOW
    )
    assert reasons(result) == ["malformed"]
