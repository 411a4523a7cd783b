"""Expiry by deadline index: ``PartitionState.due`` and the authorize and track ticks.

The ticks used to decode every state entry every second; they now ask the state for the keys
whose deadline has passed. These tests pin the index to a full scan of the state (through
writes, commits, rollbacks and a rebuild from committed entries) and each timer to the instant
it fired before: never at its deadline, always just after it.
"""

from __future__ import annotations

import random
from typing import Any

import cbor2
import pytest

from fleetbus.bus.commands import Response, SignedCommand, StatusEvent, Target, VerifiedResponse
from fleetbus.bus.commands.ids import uuid7_timestamp_ms
from fleetbus.bus.errors import ReasonCode
from fleetbus.processors.eos import AUDIT_HEAD_KEY, PartitionState
from fleetbus.processors.stages import AuthorizedCommand, RejectedCommand, TrackStage
from tests.unit.test_stages import (
    NOW,
    TOPICS,
    Fleet,
    approval,
    authorize,
    authorized,
    outs,
    rec,
    signed,
)
from tests.unit.test_stages import fleet as fleet

MS = 0.001  # state times are kept in milliseconds: "just after" a deadline is one ms later


def _deadline_in_value(key: str, value: bytes) -> float | None:
    deadline: float | None = cbor2.loads(value)
    return deadline


def _full_scan(state: PartitionState, now: float) -> set[str]:
    return {
        key
        for key, value in state.items()
        if (deadline := _deadline_in_value(key, value)) is not None and deadline < now
    }


def test_due_lists_the_keys_past_their_deadline_soonest_first() -> None:
    state = PartitionState({"a": cbor2.dumps(30.0), "b": cbor2.dumps(10.0), "c": cbor2.dumps(None)})
    state.put("d", cbor2.dumps(20.0))
    assert state.due(10.0, _deadline_in_value) == []  # strictly after the deadline
    assert state.due(25.0, _deadline_in_value) == ["b", "d"]  # committed first, then this txn
    state.commit()
    assert state.due(35.0, _deadline_in_value) == ["b", "d", "a"]


def test_a_due_key_stays_due_until_a_committed_transaction_rewrites_or_deletes_it() -> None:
    state = PartitionState({"a": cbor2.dumps(1.0), "b": cbor2.dumps(2.0), "c": cbor2.dumps(3.0)})
    assert state.due(5.0, _deadline_in_value) == ["a", "b", "c"]
    state.delete("a")
    state.put("b", cbor2.dumps(9.0))
    state.rollback()  # the transaction that saw them aborted: all three are due again
    assert state.due(5.0, _deadline_in_value) == ["a", "b", "c"]
    state.delete("a")
    state.put("b", cbor2.dumps(9.0))
    state.commit()  # "c" was seen but left alone: still due
    assert state.due(5.0, _deadline_in_value) == ["c"]
    assert state.due(10.0, _deadline_in_value) == ["c", "b"]


def test_the_index_agrees_with_a_full_scan_through_commits_and_rollbacks() -> None:
    rng = random.Random(14)
    keys = [f"k{i}" for i in range(40)]
    state = PartitionState({k: cbor2.dumps(rng.choice([None, rng.uniform(0, 50)])) for k in keys})
    now = 0.0
    for _ in range(3000):
        op = rng.random()
        if op < 0.4:
            deadline = rng.choice([None, now + rng.uniform(-5, 30)])
            state.put(rng.choice(keys), cbor2.dumps(deadline))
        elif op < 0.55:
            state.delete(rng.choice(keys))
        elif op < 0.7:
            state.commit()
        elif op < 0.8:
            state.rollback()
        else:
            now += rng.uniform(0, 3)
            due = state.due(now, _deadline_in_value)
            assert len(due) == len(set(due))
            assert set(due) == _full_scan(state, now)
        if rng.random() < 0.01:  # a new assignment: the state made afresh from the changelog
            state.commit()
            state = PartitionState(dict(state.items()))


# --- authorize -------------------------------------------------------------------------------


def _restored(state: PartitionState) -> PartitionState:
    """The partition's state as a new assignment restores it: committed entries only."""
    state.commit()
    return PartitionState(dict(state.items()))


def _deadline(stage: Any, state: PartitionState, key: str) -> float:
    raw = state.get(key)
    assert raw is not None
    deadline = stage.deadline(key, raw)
    assert deadline is not None
    return float(deadline)


def _id_forgotten_at(
    cmd: SignedCommand, max_lifetime_s: float = 86400, skew_s: float = 30
) -> float:
    """When authorize drops a decided command's id from the replay set: after expiry + skew,
    and never before the id itself is refused as too old (its UUIDv7 time + lifetime + skew)."""
    id_at = uuid7_timestamp_ms(cmd.command.id) / 1000
    return max(cmd.command.expires_at + skew_s, id_at + max_lifetime_s + skew_s)


@pytest.mark.parametrize("restore", [False, True])
def test_a_pending_command_is_rejected_just_after_its_approval_window(
    fleet: Fleet,
    restore: bool,
) -> None:
    stage, state = authorize(fleet, window_s=5), PartitionState()
    cmd = signed(fleet, Target(vehicle="V-1"), "push_firmware", ttl_s=60)
    key = f"cmd/{cmd.command.id}"
    stage.process(rec(TOPICS.requested, cmd.encode()), state, NOW)
    window_until = _deadline(stage, state, key)
    assert abs(window_until - (NOW + 5)) <= MS
    state = _restored(state) if restore else state
    assert not stage.tick(0, state, window_until).outputs
    state.commit()
    result = stage.tick(0, state, window_until + MS)
    [rejected] = [RejectedCommand.decode(v) for v in outs(result, TOPICS.rejected)]
    assert rejected.reason is ReasonCode.POLICY_DENIED
    assert "approval window elapsed" in rejected.detail
    # Then remembered as rejected (the replay set) until its id is too old to be accepted
    # (UUIDv7 time + max lifetime + skew; later than expiry + skew here), and forgotten after.
    state.commit()
    until = _deadline(stage, state, key)
    assert abs(until - _id_forgotten_at(cmd)) <= MS
    assert not stage.tick(0, state, until).outputs
    state.commit()
    assert state.get(key) is not None
    stage.tick(0, state, until + MS)
    assert state.changes() == {key: None}


def test_an_expiry_seen_by_an_aborted_tick_happens_at_the_next_tick(fleet: Fleet) -> None:
    stage, state = authorize(fleet, window_s=5), PartitionState()
    cmd = signed(fleet, Target(vehicle="V-1"), "push_firmware", ttl_s=60)
    stage.process(rec(TOPICS.requested, cmd.encode()), state, NOW)
    state.commit()
    first = stage.tick(0, state, NOW + 6)
    assert outs(first, TOPICS.rejected)
    state.rollback()  # the transaction carrying the rejection failed
    again = stage.tick(0, state, NOW + 7)
    assert [RejectedCommand.decode(v).command_id for v in outs(again, TOPICS.rejected)] == [
        cmd.command.id
    ]
    state.commit()
    assert not stage.tick(0, state, NOW + 8).outputs  # and only once


@pytest.mark.parametrize("restore", [False, True])
def test_an_authorized_command_is_forgotten_just_after_its_id_window(
    fleet: Fleet,
    restore: bool,
) -> None:
    stage, state = authorize(fleet), PartitionState()
    cmd = signed(fleet, Target(vehicle="V-1"), ttl_s=10)
    key = f"cmd/{cmd.command.id}"
    result = stage.process(rec(TOPICS.requested, cmd.encode()), state, NOW)
    assert outs(result, TOPICS.authorized)
    until = _deadline(stage, state, key)
    assert abs(until - _id_forgotten_at(cmd)) <= MS
    state = _restored(state) if restore else state
    state.commit()
    stage.tick(0, state, until)
    assert state.changes() == {}
    stage.tick(0, state, until + MS)
    assert state.changes() == {key: None}
    state.rollback()
    stage.tick(0, state, until + 2 * MS)  # the rolled-back deletion is done again
    assert state.changes() == {key: None}


def test_an_early_approval_is_forgotten_just_after_its_window(fleet: Fleet) -> None:
    stage, state = authorize(fleet, window_s=5), PartitionState()
    cmd = signed(fleet, Target(vehicle="V-1"), "unlock_doors")
    key = f"apr/{cmd.command.id}"
    stage.process(rec(TOPICS.approvals, approval(fleet, cmd)), state, NOW)
    until = _deadline(stage, state, key)
    state = _restored(state)
    stage.tick(0, state, until)
    assert state.changes() == {}
    stage.tick(0, state, until + MS)
    assert state.changes() == {key: None}


def test_entries_that_are_no_timers_have_no_deadline(fleet: Fleet) -> None:
    head = cbor2.dumps({"seq": 1})
    assert authorize(fleet).deadline(AUDIT_HEAD_KEY, head) is None
    assert _track(fleet).deadline(AUDIT_HEAD_KEY, head) is None
    no_expiry = cbor2.dumps({"issued_at": 0, "expires_at": 0, "vehicles": {}})
    assert _track(fleet).deadline("cmd/x", no_expiry) is None  # never expired, as before


# --- track -----------------------------------------------------------------------------------


def _track(fleet: Fleet) -> TrackStage:
    return TrackStage(
        topics=TOPICS,
        clock_skew_s=30,
        max_message_bytes=32768,
        retention_s=300,
    )


@pytest.mark.parametrize("restore", [False, True])
def test_track_expires_active_vehicles_just_after_expiry_and_forgets_after_retention(
    fleet: Fleet,
    restore: bool,
) -> None:
    stage, state = _track(fleet), PartitionState()
    value = authorized(fleet, "V-2")
    auth = AuthorizedCommand.decode(value)
    key = f"cmd/{auth.command_id}"
    stage.process(rec(TOPICS.authorized, value), state, NOW)
    expiry = _deadline(stage, state, key)
    assert abs(expiry - (auth.expires_at + 30)) <= MS
    state = _restored(state) if restore else state
    assert not stage.tick(0, state, expiry).outputs
    state.commit()
    result = stage.tick(0, state, expiry + MS)
    [event] = [StatusEvent.decode(v) for v in outs(result, TOPICS.status)]
    assert (event.state.value, event.vehicle_id) == ("expired", "V-2")
    state.commit()
    forget = _deadline(stage, state, key)
    assert forget == pytest.approx(expiry + 300)
    assert not stage.tick(0, state, forget).outputs
    assert state.changes() == {}
    stage.tick(0, state, forget + MS)
    assert state.changes() == {key: None}


def test_track_forgets_a_finished_command_after_retention_without_expiring_it(
    fleet: Fleet,
) -> None:
    stage, state = _track(fleet), PartitionState()
    value = authorized(fleet, "V-1")
    cid = AuthorizedCommand.decode(value).command_id
    stage.process(rec(TOPICS.authorized, value), state, NOW)
    response = Response(command_id=cid, vehicle_id="V-1", status=200, executed_at=NOW)
    verified = VerifiedResponse(response, "xwing", 1, NOW + 60).encode()
    stage.process(rec(TOPICS.responses_verified, verified), state, NOW + 1)
    state = _restored(state)
    forget = _deadline(stage, state, f"cmd/{cid}")
    assert not stage.tick(0, state, forget).outputs
    assert commands(state.changes()) == {}
    result = stage.tick(0, state, forget + MS)
    assert not result.outputs
    assert commands(state.changes()) == {f"cmd/{cid}": None}


def commands(changes: dict[str, bytes | None]) -> dict[str, bytes | None]:
    return {key: value for key, value in changes.items() if key.startswith("cmd/")}


def test_an_expiry_rolled_back_is_reported_once_by_the_next_tick(fleet: Fleet) -> None:
    stage, state = _track(fleet), PartitionState()
    value = authorized(fleet, "V-2")
    stage.process(rec(TOPICS.authorized, value), state, NOW)
    state.commit()
    assert outs(stage.tick(0, state, NOW + 3600), TOPICS.status)
    state.rollback()
    assert len(outs(stage.tick(0, state, NOW + 3601), TOPICS.status)) == 1
    state.commit()
    assert not outs(stage.tick(0, state, NOW + 3602), TOPICS.status)


def test_an_entry_without_a_readable_deadline_is_left_out_of_the_index_not_fatal() -> None:
    state = PartitionState({"bad": b"\xff", "a": cbor2.dumps(1.0)})
    assert state.due(5.0, _deadline_in_value) == ["a"]  # the build goes on past "bad"
    state.put("worse", b"\xff")
    state.put("b", cbor2.dumps(2.0))
    assert state.due(5.0, _deadline_in_value) == ["a", "b"]
    state.commit()  # and so does the commit that wrote it
    assert state.due(5.0, _deadline_in_value) == ["a", "b"]
