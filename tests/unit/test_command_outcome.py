"""``CommandHandle.wait``'s pieces without Kafka: the status partition of a command id and the
per-vehicle outcome."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner

from fleetbus.bus.commands import CommandState, StatusEvent, new_command_id
from fleetbus.bus.errors import ReasonCode
from fleetbus.sdk.dispatch import CommandOutcome, status_partition


@pytest.mark.parametrize("partitions", [1, 2, 3, 12, 50])
def test_the_status_partition_is_the_one_the_bus_producers_choose(partitions: int) -> None:
    """The bus's stages produce status events with aiokafka's default partitioner."""
    choose = DefaultPartitioner()
    every = list(range(partitions))
    for _ in range(200):
        cid = new_command_id()
        assert status_partition(cid, set(every)) == choose(cid.encode(), every, every)


def event(
    state: CommandState, vehicle: str | None, reason: ReasonCode | None = None
) -> StatusEvent:
    return StatusEvent(command_id="c", state=state, at=0.0, vehicle_id=vehicle, reason=reason)


def test_a_group_succeeds_only_when_every_vehicle_did() -> None:
    ok = {v: event(CommandState.SUCCEEDED, v) for v in ("V-1", "V-2")}
    assert CommandOutcome.of("c", ok, None).state == "succeeded"
    mixed = {**ok, "V-3": event(CommandState.FAILED, "V-3")}
    outcome = CommandOutcome.of("c", mixed, None)
    assert outcome.state == "failed"
    assert outcome.vehicle_id == "V-3"
    assert {v: str(e.state) for v, e in outcome.vehicles.items()} == {
        "V-1": "succeeded",
        "V-2": "succeeded",
        "V-3": "failed",
    }
    assert outcome.final


def test_a_command_settled_before_any_vehicle_was_named() -> None:
    rejected = event(CommandState.REJECTED, None, ReasonCode.POLICY_DENIED)
    outcome = CommandOutcome.of("c", {}, rejected)
    assert outcome.state == "rejected"
    assert outcome.reason is ReasonCode.POLICY_DENIED
    assert outcome.vehicles == {}
