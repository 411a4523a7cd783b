"""Uplink (vehicle → bus) guarantees of the response, track and telemetry stages, without Kafka:
outcomes only from target vehicles whatever the topic order, replay state in the partition
state (per sender, bounded, rolled back with the transaction, restored after a restart)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from fleetbus.bus.commands import (
    Command,
    CommandState,
    Response,
    SignedCommand,
    StatusEvent,
    Target,
    Telemetry,
    VerifiedResponse,
)
from fleetbus.bus.directory import FleetRoot
from fleetbus.bus.envelope import EnvelopeError
from fleetbus.bus.errors import ConfigError, ReasonCode
from fleetbus.bus.keys import KeyPath
from fleetbus.bus.registry import load_key_provider
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.processors.eos import DeadLetter, InputRecord, PartitionState, StageResult
from fleetbus.processors.stages import (
    AuthorizedCommand,
    PipelineTopics,
    ResponseStage,
    TelemetryStage,
    UplinkOpener,
    profile_from_settings,
)
from fleetbus.processors.uplink import UplinkLimits
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
from fleetbus.providers.sealing import EnvelopeOpener, EnvelopeSealer, ReplayCache
from tests.support.envelope import Fleet, fleet_of, issuer
from tests.support.responses import ResponsePath

NOW = time.time() - 7200  # every clock below is fixed: results do not depend on run time
TOPICS = PipelineTopics.from_settings(FleetbusSettings().topics)
SUITE = "ed25519"
LIFETIME = 900.0  # the worker's default uplink_max_lifetime_s
SKEW = 30.0


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    root = FleetRoot.generate(SUITE)
    issue = issuer(root, SUITE, NOW)
    kems = ["xwing", "x25519"]
    issued = [
        issue("bus-sealer", "sealer", kems=kems),
        issue("dispatch-1", "dispatcher"),
        *[issue(v, "vehicle", kems=kems, groups=["north"]) for v in ("V-1", "V-2", "V-3")],
    ]
    return fleet_of(root, issued)


def uplink(fleet: Fleet, *, check_replay: bool = False) -> UplinkOpener:
    """The worker's uplink opener (app.py builds it the same way)."""
    runner = KeyPathRunner({n: load_key_provider(n) for n in ("xwing", "x25519")})

    def one(minimum: str) -> EnvelopeOpener:
        return EnvelopeOpener(
            fleet.files["bus-sealer"].key_set(),
            fleet.directory,
            runner,
            KeyPath.parse(minimum),
            clock=lambda: NOW,
            skew_s=SKEW,
            max_lifetime_s=LIFETIME,
            check_replay=check_replay,
        )

    return UplinkOpener(fleet.directory, one("xwing"), one("x25519"), clock=lambda: NOW)


def track(fleet: Fleet, limits: UplinkLimits | None = None) -> ResponsePath:
    """The response stage feeding the track stage (their states apart, as in the worker)."""
    return ResponsePath(
        topics=TOPICS,
        opener=uplink(fleet),
        clock_skew_s=SKEW,
        max_message_bytes=32768,
        limits=limits,
    )


def telemetry_stage(fleet: Fleet, limits: UplinkLimits | None = None) -> TelemetryStage:
    return TelemetryStage(
        topics=TOPICS,
        opener=uplink(fleet),
        policy=fleet.policy,
        consumer="analytics",
        max_message_bytes=32768,
        clock_skew_s=SKEW,
        limits=limits,
    )


def seal_uplink(
    fleet: Fleet, vehicle: str, kind: str, mid: str, payload: bytes, *, expires: float = NOW + 300
) -> bytes:
    runner = KeyPathRunner({n: load_key_provider(n) for n in ("xwing", "x25519")})
    sealer = EnvelopeSealer(vehicle, fleet.files[vehicle].signer(), ProfileSealer(runner))
    profile = profile_from_settings("up", ["xwing"], False, "xwing", SUITE)
    topic = TOPICS.responses if kind == "rsp" else TOPICS.telemetry_raw
    recipient = fleet.directory.recipient_keys("bus-sealer", at=NOW)
    return sealer.seal(kind, topic, recipient, mid, kind, payload, NOW, expires, profile)


def response(fleet: Fleet, vehicle: str, cid: str, status: int = 200) -> bytes:
    payload = Response(command_id=cid, vehicle_id=vehicle, status=status, executed_at=NOW)
    return seal_uplink(fleet, vehicle, "rsp", cid, payload.encode())


_mids = iter(range(10**6))


def telemetry(fleet: Fleet, vehicle: str, *, expires: float = NOW + 300) -> bytes:
    payload = Telemetry(vehicle_id=vehicle, at=NOW, fields={"speed": 10.0}).encode()
    return seal_uplink(fleet, vehicle, "tel", f"t-{next(_mids)}", payload, expires=expires)


def authorized(fleet: Fleet, target: Target, vehicle: str) -> tuple[str, bytes]:
    """A command for ``target`` and the authorized record of one of its vehicles."""
    command = Command.create(issuer="dispatch-1", target=target, action="ping", ttl_s=60, now=NOW)
    signed = SignedCommand.sign(command, fleet.files["dispatch-1"].signer())
    record = AuthorizedCommand(
        command.id,
        vehicle,
        "dispatch-1",
        "ping",
        "routine",
        command.issued_at,
        command.expires_at,
        signed.encode(),
    )
    return command.id, record.encode()


def authorized_for(fleet: Fleet, cid_and_signed: tuple[str, bytes], vehicle: str) -> bytes:
    """Another vehicle's authorized record of the same (group) command."""
    auth = AuthorizedCommand.decode(cid_and_signed[1])
    return AuthorizedCommand(
        auth.command_id,
        vehicle,
        auth.issuer,
        auth.action,
        auth.criticality,
        auth.issued_at,
        auth.expires_at,
        auth.signed_command,
    ).encode()


_offsets = iter(range(10**6))


def rec(topic: str, value: bytes, key: str) -> InputRecord:
    return InputRecord(topic, 0, next(_offsets), key.encode(), value)


def statuses(result: StageResult) -> list[tuple[str, str | None]]:
    events = [
        StatusEvent.decode(o.value or b"") for o in result.outputs if o.topic == TOPICS.status
    ]
    return [(str(e.state), e.vehicle_id) for e in events]


def letters(result: StageResult) -> list[DeadLetter]:
    return [DeadLetter.decode(o.value or b"") for o in result.outputs if o.topic == TOPICS.dlq]


def reasons(result: StageResult) -> list[str]:
    return [d.reason.value for d in letters(result)]


def exported(result: StageResult) -> int:
    return sum(1 for o in result.outputs if o.topic == TOPICS.telemetry_verified)


# --- finding 3: outcomes only from target vehicles, whatever the topic order ---------------


def test_a_non_target_answering_before_the_authorized_record_does_not_succeed(
    fleet: Fleet,
) -> None:
    stage, state = track(fleet), PartitionState()
    cid, auth = authorized(fleet, Target(vehicle="V-1"), "V-1")
    forged = response(fleet, "V-2", cid)  # V-2 read the id from commands.outbound
    first = stage.process(rec(TOPICS.responses, forged, cid), state, NOW)
    assert statuses(first) == []
    assert reasons(first) == []
    assert first.outcome == "pending"  # held: its authorized record has not arrived
    assert [a.event for a in first.audit] == ["response_held"]
    assert statuses(stage.process(rec(TOPICS.authorized, auth, cid), state, NOW + 1)) == []
    # The target answers: that is the outcome.
    real = stage.process(rec(TOPICS.responses, response(fleet, "V-1", cid), cid), state, NOW + 2)
    assert statuses(real) == [("succeeded", "V-1")]
    # The held forgery is judged when it expires: DLQ with its own bytes, never an outcome.
    judged = stage.tick(0, state, NOW + 300 + SKEW + 1)
    [letter] = letters(judged)
    assert letter.reason is ReasonCode.POLICY_DENIED
    assert VerifiedResponse.decode(letter.value or b"").vehicle_id == "V-2"
    assert ("succeeded", "V-2") not in statuses(judged)
    assert [k for k, _ in state.items() if k.startswith(("hold/", "up/h/"))] == []


def test_a_non_target_after_the_authorized_record_is_refused_at_once(fleet: Fleet) -> None:
    stage, state = track(fleet), PartitionState()
    cid, auth = authorized(fleet, Target(vehicle="V-1"), "V-1")
    stage.process(rec(TOPICS.authorized, auth, cid), state, NOW)
    result = stage.process(rec(TOPICS.responses, response(fleet, "V-2", cid), cid), state, NOW)
    assert reasons(result) == ["policy_denied"]
    assert statuses(result) == []


def test_a_targets_early_response_counts_when_its_authorized_record_arrives(
    fleet: Fleet,
) -> None:
    """A group: V-2's answer arrives before any authorized record, V-3 (not a member named by
    the bus) answers too; V-2 counts once named, V-3 never."""
    stage, state = track(fleet), PartitionState()
    first = authorized(fleet, Target(group="north"), "V-1")
    cid = first[0]
    held = stage.process(rec(TOPICS.responses, response(fleet, "V-2", cid), cid), state, NOW)
    assert held.outcome == "pending"
    stranger = response(fleet, "V-3", cid)
    assert stage.process(rec(TOPICS.responses, stranger, cid), state, NOW).outcome == "pending"
    assert statuses(stage.process(rec(TOPICS.authorized, first[1], cid), state, NOW)) == []
    released = stage.process(
        rec(TOPICS.authorized, authorized_for(fleet, first, "V-2"), cid), state, NOW + 1
    )
    assert statuses(released) == [("succeeded", "V-2")]
    later = stage.tick(0, state, NOW + 300 + SKEW + 1)
    judged = [(d.reason.value, VerifiedResponse.decode(d.value or b"")) for d in letters(later)]
    assert [(reason, v.vehicle_id) for reason, v in judged] == [("policy_denied", "V-3")]
    assert ("succeeded", "V-3") not in statuses(later)


def test_a_sealed_status_event_names_a_target_too(fleet: Fleet) -> None:
    stage, state = track(fleet), PartitionState()
    cid, _ = authorized(fleet, Target(vehicle="V-1"), "V-1")
    stage.process(rec(TOPICS.responses, response(fleet, "V-1", cid), cid), state, NOW)
    sealed = StatusEvent(command_id=cid, state=CommandState.SEALED, at=NOW, vehicle_id="V-1")
    result = stage.process(rec(TOPICS.status, sealed.encode(), cid), state, NOW)
    assert statuses(result) == [("succeeded", "V-1")]


def test_held_responses_are_bounded_per_vehicle(fleet: Fleet) -> None:
    stage, state = track(fleet, UplinkLimits(held_per_sender=2)), PartitionState()
    cids = [authorized(fleet, Target(group="north"), "V-1")[0] for _ in range(4)]
    outcomes = [
        stage.process(rec(TOPICS.responses, response(fleet, "V-3", c), c), state, NOW)
        for c in cids[:3]
    ]
    assert [o.outcome for o in outcomes] == ["pending", "pending", "dlq"]
    assert reasons(outcomes[2]) == ["sender_state_full"]
    assert [a.actor for a in outcomes[2].audit] == ["V-3"]
    # Another vehicle is not affected.
    other = stage.process(
        rec(TOPICS.responses, response(fleet, "V-2", cids[3]), cids[3]), state, NOW
    )
    assert other.outcome == "pending"


def test_a_response_under_another_key_is_refused(fleet: Fleet) -> None:
    stage, state = track(fleet), PartitionState()
    cid, auth = authorized(fleet, Target(vehicle="V-1"), "V-1")
    stage.process(rec(TOPICS.authorized, auth, cid), state, NOW)
    moved = stage.process(rec(TOPICS.responses, response(fleet, "V-1", cid), "V-1"), state, NOW)
    assert reasons(moved) == ["malformed"]


# --- findings 6, 7 and issue 14 item 2: replay state in the partition state ------------------


def test_a_telemetry_envelope_replayed_after_a_restart_is_refused(fleet: Fleet) -> None:
    env = telemetry(fleet, "V-1")
    before, state = telemetry_stage(fleet), PartitionState()
    assert exported(before.process(rec(TOPICS.telemetry_raw, env, "V-1"), state, NOW)) == 1
    state.commit()
    # A restarted worker: new stage and opener, state rebuilt from the committed changelog.
    after = telemetry_stage(fleet)
    restored = PartitionState(dict(state.items()))
    again = after.process(rec(TOPICS.telemetry_raw, env, "V-1"), restored, NOW + 5)
    assert reasons(again) == ["replayed"]
    assert exported(again) == 0
    assert [a.actor for a in again.audit] == ["V-1"]


def test_telemetry_under_another_key_is_refused(fleet: Fleet) -> None:
    stage = telemetry_stage(fleet)
    env = telemetry(fleet, "V-1")
    # Another key is another partition, whose replay state has not seen the envelope.
    moved = stage.process(rec(TOPICS.telemetry_raw, env, "V-2"), PartitionState(), NOW)
    assert reasons(moved) == ["malformed"]
    assert exported(moved) == 0
    assert "sending vehicle" in letters(moved)[0].detail


def test_an_aborted_transaction_loses_no_response(fleet: Fleet) -> None:
    """The batch is read again after PartitionState.rollback (what the runner does when the
    Kafka transaction fails): each response is verified and forwarded again, none is refused
    as replayed; once committed, the same envelope is."""
    stage, state = track(fleet).responses, PartitionState()
    cids = [authorized(fleet, Target(vehicle="V-1"), "V-1")[0] for _ in range(3)]
    batch = [rec(TOPICS.responses, response(fleet, "V-1", cid), cid) for cid in cids]

    def forwarded(result: StageResult) -> list[str]:
        return [
            VerifiedResponse.decode(o.value or b"").command_id
            for o in result.outputs
            if o.topic == TOPICS.responses_verified
        ]

    for record, cid in zip(batch, cids, strict=True):
        assert forwarded(stage.process(record, state, NOW + 1)) == [cid]
    state.rollback()  # the transaction aborted mid-batch
    for record, cid in zip(batch, cids, strict=True):
        result = stage.process(record, state, NOW + 2)
        assert reasons(result) == []
        assert forwarded(result) == [cid]
    state.commit()
    replay = stage.process(batch[0], state, NOW + 3)
    assert reasons(replay) == ["replayed"]
    assert forwarded(replay) == []


def test_an_aborted_transaction_loses_no_telemetry(fleet: Fleet) -> None:
    stage, state = telemetry_stage(fleet), PartitionState()
    env = telemetry(fleet, "V-1")
    assert exported(stage.process(rec(TOPICS.telemetry_raw, env, "V-1"), state, NOW)) == 1
    state.rollback()
    assert exported(stage.process(rec(TOPICS.telemetry_raw, env, "V-1"), state, NOW)) == 1


def test_a_flood_of_far_future_envelopes_does_not_evict_another_senders_ids(
    fleet: Fleet,
) -> None:
    stage, state = telemetry_stage(fleet, UplinkLimits(ids_per_sender=3)), PartitionState()
    victim = telemetry(fleet, "V-1")
    assert exported(stage.process(rec(TOPICS.telemetry_raw, victim, "V-1"), state, NOW)) == 1
    # Far beyond the configured lifetime: refused before it is remembered.
    years = telemetry(fleet, "V-2", expires=NOW + 100 * 365 * 86400)
    far = stage.process(rec(TOPICS.telemetry_raw, years, "V-2"), state, NOW)
    assert reasons(far) == ["policy_denied"]
    # As far as allowed, many of them: V-2's own share fills and V-2 alone is refused.
    flood = [
        stage.process(
            rec(TOPICS.telemetry_raw, telemetry(fleet, "V-2", expires=NOW + LIFETIME), "V-2"),
            state,
            NOW,
        )
        for _ in range(5)
    ]
    assert [reasons(r) for r in flood] == [[], [], [], ["sender_state_full"], ["sender_state_full"]]
    assert [a.actor for a in flood[3].audit] == ["V-2"]
    # V-1's id is still remembered, and V-1 can still send.
    assert reasons(stage.process(rec(TOPICS.telemetry_raw, victim, "V-1"), state, NOW)) == [
        "replayed"
    ]
    fresh = telemetry(fleet, "V-1")
    assert exported(stage.process(rec(TOPICS.telemetry_raw, fresh, "V-1"), state, NOW)) == 1
    # Once V-2's ids expire, the tick forgets them and V-2 may send again.
    state.commit()
    later = NOW + LIFETIME + SKEW + 1
    stage.tick(0, state, later)
    state.commit()
    assert not [k for k, _ in state.items() if "V-2" in k]
    late = telemetry_stage(fleet, UplinkLimits(ids_per_sender=3))  # index rebuilt from state
    env = telemetry(fleet, "V-2")
    assert exported(late.process(rec(TOPICS.telemetry_raw, env, "V-2"), state, later)) == 1


def test_a_rolled_back_expiry_is_done_again(fleet: Fleet) -> None:
    stage, state = telemetry_stage(fleet), PartitionState()
    stage.process(rec(TOPICS.telemetry_raw, telemetry(fleet, "V-1"), "V-1"), state, NOW)
    state.commit()
    later = NOW + 300 + SKEW + 1
    stage.tick(0, state, later)
    assert state.changes()  # the id and its counter are deleted ...
    state.rollback()  # ... but the tick's transaction aborts
    assert [k for k, _ in state.items() if k.startswith("up/")]
    stage.tick(0, state, later + 1)
    state.commit()
    assert [k for k, _ in state.items() if k.startswith("up/")] == []


def test_the_stages_refuse_an_opener_with_its_own_replay_set(fleet: Fleet) -> None:
    with pytest.raises(ConfigError):
        ResponseStage(
            topics=TOPICS,
            opener=uplink(fleet, check_replay=True),
            clock_skew_s=SKEW,
            max_message_bytes=32768,
        )
    with pytest.raises(ConfigError):
        TelemetryStage(
            topics=TOPICS,
            opener=uplink(fleet, check_replay=True),
            policy=fleet.policy,
            consumer="analytics",
            max_message_bytes=32768,
        )


# --- the in-memory cache (vehicles) ----------------------------------------------------------


def test_replay_cache_is_per_sender_and_never_evicts() -> None:
    now = [100.0]
    cache = ReplayCache(max_per_sender=3, clock=lambda: now[0])
    assert cache.add("victim", "a", until=150)
    for i in range(3):
        assert cache.add("flooder", f"f{i}", until=4_000_000_000)
    with pytest.raises(EnvelopeError) as caught:
        cache.add("flooder", "f3", until=4_000_000_000)
    assert caught.value.reason is ReasonCode.SENDER_STATE_FULL
    assert cache.refusals == 1
    assert cache.seen("victim", "a")  # not evicted by the flood
    assert not cache.add("victim", "a", until=150)
    assert cache.add("victim", "b", until=120)
    now[0] = 121
    assert not cache.seen("victim", "b")
    assert cache.add("victim", "b", until=200)  # expired ids leave, without a scan
    assert len(cache) == 5


def test_the_opener_refuses_lifetimes_beyond_its_maximum(fleet: Fleet) -> None:
    opener: Any = uplink(fleet).pqc
    env = telemetry(fleet, "V-1", expires=NOW + LIFETIME + SKEW + 60)
    with pytest.raises(EnvelopeError) as caught:
        opener.open(env, topic=TOPICS.telemetry_raw)
    assert caught.value.reason is ReasonCode.POLICY_DENIED
    assert opener.open(telemetry(fleet, "V-1"), topic=TOPICS.telemetry_raw).sender == "V-1"


def test_only_vehicles_and_edge_units_may_send_uplink(fleet: Fleet) -> None:
    # A dispatcher's valid directory key sealing telemetry and a response under its own id: the
    # uplink is the fleet's side of the bus, so the sender's role is checked, not only its key.
    stage = telemetry_stage(fleet)
    env = telemetry(fleet, "dispatch-1")
    result = stage.process(rec(TOPICS.telemetry_raw, env, "dispatch-1"), PartitionState(), NOW)
    assert reasons(result) == ["policy_denied"]
    assert exported(result) == 0
    cid, auth = authorized(fleet, Target(vehicle="V-1"), "V-1")
    tracker, state = track(fleet), PartitionState()
    tracker.process(rec(TOPICS.authorized, auth, cid), state, NOW)
    answer = tracker.process(
        rec(TOPICS.responses, response(fleet, "dispatch-1", cid), cid), state, NOW
    )
    assert reasons(answer) == ["policy_denied"]
    assert statuses(answer) == []


def test_an_epoch_written_with_its_window_inside_is_read_and_moved_out() -> None:
    """An uplink epoch an earlier release wrote keeps its replay window inside its map: its
    first message reads it there and writes the window apart; a copy is then replayed."""
    import cbor2

    from fleetbus.processors.uplink import StateEpochStore

    state, epoch_id = PartitionState(), bytes(16)
    store = StateEpochStore(state, {}, lambda record: b"secret", skew_ms=30_000)
    legacy = {"sender": "V-1", "until": 1, "highest": 4, "window": 0b1}
    state.put(store.key("bus-sealer", epoch_id), cbor2.dumps(legacy, canonical=True))
    assert store.record("bus-sealer", epoch_id, 3)
    assert cbor2.loads(state.get(store.window_key("bus-sealer", epoch_id)) or b"") == [4, 0b11]
    assert not store.record("bus-sealer", epoch_id, 4)  # accepted before the window moved out
    assert not store.record("bus-sealer", epoch_id, 3)
