"""Uplink recovery (issue 13, docs/wire-format.md V2.7 "Uplink recovery"): when the response or
telemetry stage gets a v2 message of an uplink epoch it does not hold, the bus asks the vehicle,
with a status signed by the bus sealer on ``commands.outbound``, for a new epoch; the vehicle
verifies it, ends the epoch and sends its answers again, never executing a command twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleetbus.bus.commands import StatusEvent
from fleetbus.bus.envelope_v2 import ParsedStatus, StatusCode, decode_record
from fleetbus.processors.eos import DeadLetter, InputRecord, PartitionState, StageResult
from fleetbus.processors.stages.responses import uplink_asker
from fleetbus.processors.uplink import ASKED_PREFIX
from fleetbus.providers.sealing_v2 import make_status, sign_status
from tests.support.envelope import Fleet
from tests.unit.test_wire_v2_pipeline import (
    NOW,
    TOPICS,
    Vehicles,
    authorized,
    fleet,
    outputs,
    response_path,
    response_stage,
    seal_stage,
    telemetry_stage,
)

__all__ = ["fleet"]  # the module's fixture, shared

_offsets = iter(range(10**6))


def asking(stage: Any, fleet: Fleet) -> Any:
    """``stage`` with the bus sealer's signer, as the worker builds it (processors/app.py)."""
    signer = fleet.files["bus-sealer"].signer()
    stage.asker = uplink_asker(TOPICS, stage.opener, "bus-sealer", signer)
    return stage


def responses(vehicles: Vehicles, topic: str = TOPICS.responses) -> list[tuple[str, bytes]]:
    return [(k, v) for t, k, v in vehicles.sent if t == topic]


def reason(result: StageResult) -> str:
    return DeadLetter.decode(outputs(result, TOPICS.dlq)[0].value).reason.value


def feed_stage(stage: Any, state: PartitionState, key: str, value: bytes, now: float = NOW) -> Any:
    record = InputRecord(TOPICS.responses, 0, next(_offsets), key.encode(), value)
    return stage.process(record, state, now)


def answered_vehicle(fleet: Fleet, tmp_path: Path) -> tuple[Vehicles, InputRecord, bytes]:
    """A vehicle that executed one command and answered it in a new uplink epoch: the agent,
    the command's authorized record and the answer's v2 message (after its establishment)."""
    vehicles = Vehicles(fleet, tmp_path)
    auth = authorized(fleet, "V-1")
    for out in outputs(seal_stage(fleet).process(auth, PartitionState(), NOW), TOPICS.outbound):
        vehicles.feed(out.value, out.key)
    (_, _est), (_, message) = responses(vehicles)
    return vehicles, auth, message


def test_an_answer_in_an_epoch_the_bus_lost_gets_through(fleet: Fleet, tmp_path: Path) -> None:
    """Regression: the response stage lost its state (or a fresh worker state) while the vehicle
    has an established uplink epoch. Before, the answer was dead-lettered ``epoch_unknown`` and
    the command never got its outcome; now the bus asks, the vehicle renews, the answer counts."""
    vehicles, auth, message = answered_vehicle(fleet, tmp_path)
    cid = (auth.key or b"").decode()
    path = response_path(fleet)
    asking(path.responses, fleet)
    track_state = PartitionState()
    path.process(auth, track_state, NOW)
    lost = path.process(record_of("V-1", message), track_state, NOW)
    assert reason(lost) == "epoch_unknown"  # dead-lettered as before, with its audit record
    [status] = outputs(lost, TOPICS.outbound)
    assert status.key == b"V-1"
    assert "uplink_epoch_asked" in [e.event for e in lost.audit]
    vehicles.feed(status.value, status.key)
    assert vehicles.agent.stats.uplink_renewed == 1
    (_, est2), (key, again) = responses(vehicles)[2:]
    assert key == "V-1"
    assert again != message
    assert path.process(record_of("V-1", est2), track_state, NOW).outputs == []
    answered = path.process(record_of("V-1", again), track_state, NOW)
    [event] = [StatusEvent.decode(o.value) for o in outputs(answered, TOPICS.status)]
    assert (event.command_id, str(event.state)) == (cid, "succeeded")
    assert list(vehicles.executed.values()) == [1]  # answered again, never executed again


def record_of(key: str, value: bytes) -> InputRecord:
    return InputRecord(TOPICS.responses, 0, next(_offsets), key.encode(), value)


def test_the_bus_asks_once_per_interval_and_only_real_vehicles(
    fleet: Fleet, tmp_path: Path
) -> None:
    _vehicles, _auth, message = answered_vehicle(fleet, tmp_path)
    stage, state = asking(response_stage(fleet), fleet), PartitionState()
    assert outputs(feed_stage(stage, state, "V-1", message), TOPICS.outbound)
    # However many such records (a forger's copies), one status per vehicle per interval.
    again = feed_stage(stage, state, "V-1", message, NOW + 1)
    assert reason(again) == "epoch_unknown"
    assert not outputs(again, TOPICS.outbound)
    # Under a key that is no vehicle of the directory: dead-lettered, nobody is asked.
    for key in ("bus-sealer", "dispatch-1", "nobody"):
        result = feed_stage(stage, state, key, message, NOW + 20)
        assert reason(result) == "epoch_unknown"
        assert not outputs(result, TOPICS.outbound)
    assert sorted(k for k, _ in state.items() if k.startswith(ASKED_PREFIX)) == ["up/ask/3:V-1"]
    # The interval's entry goes when it has passed (bounded state); then the bus asks again.
    stage.tick(0, state, NOW + 11)
    assert not [k for k, _ in state.items() if k.startswith(ASKED_PREFIX)]
    assert outputs(feed_stage(stage, state, "V-1", message, NOW + 12), TOPICS.outbound)
    # Without the sealer's signer (an earlier worker): dead-lettered only, as before.
    plain = feed_stage(response_stage(fleet), PartitionState(), "V-1", message)
    assert reason(plain) == "epoch_unknown"
    assert not outputs(plain, TOPICS.outbound)


def test_the_vehicle_acts_only_on_a_genuine_fresh_status_for_its_own_epoch(
    fleet: Fleet, tmp_path: Path
) -> None:
    vehicles, _auth, message = answered_vehicle(fleet, tmp_path)
    stage = asking(response_stage(fleet), fleet)
    [status] = outputs(feed_stage(stage, PartitionState(), "V-1", message), TOPICS.outbound)
    parsed = decode_record(status.value)
    assert isinstance(parsed, ParsedStatus)
    sts = parsed.status
    assert (sts.sender, sts.recipient, sts.topic) == ("bus-sealer", "V-1", TOPICS.outbound)
    assert sts.code is StatusCode.UPLINK_EPOCH_UNKNOWN
    sent, rejected = len(vehicles.sent), vehicles.agent.stats.rejected

    def refused(value: bytes) -> None:
        nonlocal rejected
        vehicles.feed(value, b"V-1")
        assert len(vehicles.sent) == sent
        assert vehicles.agent.stats.uplink_renewed == 0
        assert vehicles.agent.stats.rejected == rejected + 1
        rejected += 1

    def signed(by: str, **fields: Any) -> bytes:
        base: dict[str, Any] = {
            "topic": TOPICS.outbound,
            "recipient": "V-1",
            "epoch_id": sts.epoch_id,
            "sequence": 0,
            "at": NOW,
            "code": StatusCode.UPLINK_EPOCH_UNKNOWN,
        }
        body = make_status(**(base | fields))
        return sign_status(fleet.files[by].signer(), by, body)

    refused(status.value[:-1] + bytes([status.value[-1] ^ 1]))  # forged: bad signature
    assert signed("bus-sealer") == status.value  # the helper re-makes the genuine status
    refused(signed("V-3"))  # signed by another principal (a vehicle), not the bus sealer
    refused(signed("bus-sealer", recipient="V-3"))  # the bus's status for another vehicle
    refused(signed("bus-sealer", topic=TOPICS.responses))  # for another topic
    refused(signed("bus-sealer", code=StatusCode.EPOCH_UNKNOWN))  # the other direction's code
    refused(signed("bus-sealer", at=NOW - 200))  # stale: an old status replayed
    refused(signed("bus-sealer", epoch_id=b"\x01" * 8))  # an epoch this vehicle never opened
    vehicles.feed(status.value, b"V-1")
    assert vehicles.agent.stats.uplink_renewed == 1
    renewed = len(vehicles.sent)
    assert renewed == sent + 2  # the new establishment and the answer again
    refused_again = vehicles.agent.stats.rejected
    vehicles.feed(status.value, b"V-1")  # replayed inside its freshness window: nothing
    assert len(vehicles.sent) == renewed
    assert vehicles.agent.stats.uplink_renewed == 1
    assert vehicles.agent.stats.rejected == refused_again + 1
    assert list(vehicles.executed.values()) == [1]


def test_the_telemetry_stage_asks_too_and_the_next_batch_opens_a_new_epoch(
    fleet: Fleet, tmp_path: Path
) -> None:
    vehicles = Vehicles(fleet, tmp_path)
    vehicles.agent.publish_telemetry("V-1", {"soc": 0.5})
    (_, _est), (_, batch) = [(k, v) for t, k, v in vehicles.sent if t == TOPICS.telemetry_raw]
    stage = asking(telemetry_stage(fleet), fleet)
    record = InputRecord(TOPICS.telemetry_raw, 0, 1, b"V-1", batch)
    result = stage.process(record, PartitionState(), NOW)
    assert reason(result) == "epoch_unknown"
    [status] = outputs(result, TOPICS.outbound)
    vehicles.feed(status.value, b"V-1")
    assert vehicles.agent.stats.uplink_renewed == 1
    # Telemetry already sent is not sent again (docs/sdk.md); the next batch has a new epoch.
    before = len(vehicles.sent)
    vehicles.agent.publish_telemetry("V-1", {"soc": 0.4})
    new = [v for t, _k, v in vehicles.sent[before:] if t == TOPICS.telemetry_raw]
    assert len(new) == 2  # establishment first, then the batch
    state = PartitionState()
    assert not stage.process(
        InputRecord(TOPICS.telemetry_raw, 0, 2, b"V-1", new[0]), state, NOW
    ).outputs
    exported = stage.process(InputRecord(TOPICS.telemetry_raw, 0, 3, b"V-1", new[1]), state, NOW)
    assert outputs(exported, TOPICS.telemetry_verified)


def test_answers_are_sent_when_the_status_is_read_again_after_a_failed_send(
    fleet: Fleet, tmp_path: Path, monkeypatch: Any
) -> None:
    """A send that fails while re-sending (``RetryLater``) leaves the status unread: read
    again, it finds the epoch's answers still remembered and sends them."""
    from fleetbus.sdk.agentcore import RetryLater

    vehicles, _auth, message = answered_vehicle(fleet, tmp_path)
    stage = asking(response_stage(fleet), fleet)
    [status] = outputs(feed_stage(stage, PartitionState(), "V-1", message), TOPICS.outbound)
    agent = vehicles.agent
    republish = agent._republish

    def broken(*_args: Any) -> list[Any]:
        raise RetryLater("broker down")

    monkeypatch.setattr(agent, "_republish", broken)
    vehicles.transport.feed(TOPICS.outbound, b"V-1", status.value)
    agent.poll_once(0)
    sent = len(vehicles.sent)
    monkeypatch.setattr(agent, "_republish", republish)
    agent._retry_at = 0.0
    agent.poll_once(0)  # the same record, read again after the seek
    assert len(vehicles.sent) == sent + 2  # the new establishment and the answer again
    (_, again) = responses(vehicles)[-1]
    assert again != message
    assert list(vehicles.executed.values()) == [1]


# -- after a restart: the answers' epochs are in the agent's store (wire-format V2.7.1) --------


def answers_in_one_epoch(fleet: Fleet, tmp_path: Path, count: int) -> tuple[Vehicles, list[str]]:
    """A vehicle that executed and answered ``count`` commands in one uplink epoch: the agent
    and the commands' ids."""
    vehicles = Vehicles(fleet, tmp_path)
    stage = seal_stage(fleet)
    ids = []
    for _ in range(count):
        auth = authorized(fleet, "V-1")
        ids.append((auth.key or b"").decode())
        for out in outputs(stage.process(auth, PartitionState(), NOW), TOPICS.outbound):
            vehicles.feed(out.value, out.key)
    return vehicles, ids


def status_for(fleet: Fleet, message: bytes) -> bytes:
    """The bus's ``uplink_epoch_unknown`` for the epoch of ``message`` (a fresh stage state)."""
    stage = asking(response_stage(fleet), fleet)
    [status] = outputs(feed_stage(stage, PartitionState(), "V-1", message), TOPICS.outbound)
    return bytes(status.value)


def restarted(fleet: Fleet, tmp_path: Path, before: Vehicles) -> Vehicles:
    """A new agent process on the same store file (the old one closed)."""
    before.agent.close()
    return Vehicles(fleet, tmp_path)


def test_answers_are_sent_again_by_an_agent_restarted_after_sending_them(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Regression: the list of answers per uplink epoch lived in the process, so a status that
    reached a restarted agent sent nothing and the bus never learnt the outcome. Now the store
    keeps each answer's epoch; the new process sends the answer again, executing nothing."""
    vehicles, auth, message = answered_vehicle(fleet, tmp_path)
    cid = (auth.key or b"").decode()
    status = status_for(fleet, message)
    after = restarted(fleet, tmp_path, vehicles)
    after.feed(status, b"V-1")
    assert after.agent.stats.uplink_renewed == 1
    (_, est), (key, again) = responses(after)
    assert key == "V-1"
    # The bus (a fresh response-stage state, as after its loss) verifies it: the outcome counts.
    path = response_path(fleet)
    track_state = PartitionState()
    path.process(auth, track_state, NOW)
    assert path.process(record_of("V-1", est), track_state, NOW).outputs == []
    answered = path.process(record_of("V-1", again), track_state, NOW)
    [event] = [StatusEvent.decode(o.value) for o in outputs(answered, TOPICS.status)]
    assert (event.command_id, str(event.state)) == (cid, "succeeded")
    assert list(vehicles.executed.values()) == [1]
    assert not after.executed  # answered from the store, never executed again
    # Forgotten once sent, durably: the same status again, here or after another restart, is a
    # replay and sends nothing.
    sent = len(after.sent)
    after.feed(status, b"V-1")
    assert len(after.sent) == sent
    third = restarted(fleet, tmp_path, after)
    third.feed(status, b"V-1")
    assert (third.sent, third.agent.stats.uplink_renewed) == ([], 0)


def test_the_answers_remembered_per_vehicle_are_bounded_by_epochs_and_bytes(
    tmp_path: Path,
) -> None:
    from fleetbus.sdk.agentcore import ANSWER_EPOCHS, ANSWER_ID_BYTES
    from fleetbus.sdk.executed import ExecutedStore

    store = ExecutedStore(tmp_path / "agent.sqlite")
    bounds = {"epochs": ANSWER_EPOCHS, "id_bytes": ANSWER_ID_BYTES}
    epochs = [bytes([i]) * 8 for i in range(ANSWER_EPOCHS + 2)]
    for i, epoch in enumerate(epochs):
        store.record_answers([("V-1", epoch, f"cmd-{i}"), ("V-2", epoch, f"cmd-{i}")], **bounds)
    # The last ANSWER_EPOCHS epochs answered in, per vehicle; the oldest forgotten.
    for vid in ("V-1", "V-2"):
        kept = [e for e in epochs if store.answers(vid, e).command_ids]
        assert kept == epochs[-ANSWER_EPOCHS:]
    # An epoch answered in again counts as recent.
    store.record_answers([("V-1", epochs[2], "again")], **bounds)
    store.record_answers([("V-1", b"\x77" * 8, "new")], **bounds)
    assert store.answers("V-1", epochs[2]).command_ids == ("cmd-2", "again")
    assert not store.answers("V-1", epochs[3]).command_ids
    # Bytes: a vehicle answering many commands in one epoch keeps its newest answers only,
    # never more than the bound; past it, down to three quarters of it.
    ids = [f"{n:036d}" for n in range(2 * ANSWER_ID_BYTES // 36)]
    for start in range(0, len(ids), 100):
        chunk = ids[start : start + 100]
        store.record_answers([("V-3", b"\x42" * 8, c) for c in chunk], **bounds)
        kept_ids = store.answers("V-3", b"\x42" * 8).command_ids
        assert 36 * len(kept_ids) <= ANSWER_ID_BYTES
        assert kept_ids == tuple(ids[start + len(chunk) - len(kept_ids) : start + len(chunk)])
    more = [("V-3", b"\x42" * 8, f"{n:036d}") for n in range(10**6, 10**6 + 1000)]
    store.record_answers(more, **bounds)
    kept_ids = store.answers("V-3", b"\x42" * 8).command_ids
    assert len(kept_ids) == ANSWER_ID_BYTES * 3 // 4 // 36
    assert store.answers("V-2", epochs[-1]).command_ids == (f"cmd-{len(epochs) - 1}",)
    store.close()


def test_a_corrupt_answer_entry_is_refused_and_the_others_are_sent(
    fleet: Fleet, tmp_path: Path, caplog: Any
) -> None:
    import logging
    import sqlite3

    vehicles, ids = answers_in_one_epoch(fleet, tmp_path, 2)
    _est, first, _second = [v for _k, v in responses(vehicles)]
    status = status_for(fleet, first)
    vehicles.agent.close()
    with sqlite3.connect(tmp_path / "agent.sqlite") as db:
        db.execute("UPDATE answered SET command_id = X'00ff' WHERE command_id = ?", (ids[0],))
    db.close()
    after = Vehicles(fleet, tmp_path)
    after.transport.feed(TOPICS.outbound, b"V-1", status)
    with caplog.at_level(logging.ERROR, logger="fleetbus.sdk.vehicle"):
        assert after.agent.poll_once(0) == 1
    assert after.agent.stats.uplink_renewed == 1
    assert after.agent.stats.errors == 1
    [refusal] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "is not a command id (a bytes of length 2)" in refusal
    assert "refused, that answer is not sent again" in refusal
    # The readable answer went again (after the new epoch's establishment); the agent goes on.
    assert len(responses(after)) == 2
    assert not after.executed
    nxt = authorized(fleet, "V-1")
    for out in outputs(seal_stage(fleet).process(nxt, PartitionState(), NOW), TOPICS.outbound):
        after.feed(out.value, out.key)
    assert after.executed[(nxt.key or b"").decode()] == 1
