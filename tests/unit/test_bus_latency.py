"""The bus's own latency starts at authorization: an approval wait (or any time before the
command was authorized) counts in the end-to-end histogram, not in the SLO's."""

from __future__ import annotations

from prometheus_client import REGISTRY

from fleetbus.bus.commands import Response
from fleetbus.processors.eos import PartitionState
from fleetbus.processors.stages import AuthorizedCommand
from tests.support.responses import ResponsePath
from tests.unit.test_stages import (
    NOW,
    TOPICS,
    Fleet,
    authorized,
    fleet,  # noqa: F401 - the fixture
    rec,
    uplink,
    vehicle_envelope,
)


def sample(name: str, outcome: str) -> float:
    return REGISTRY.get_sample_value(name, {"outcome": outcome}) or 0.0


def test_bus_latency_runs_from_authorization_to_the_answer(fleet: Fleet) -> None:  # noqa: F811
    stage = ResponsePath(
        topics=TOPICS, opener=uplink(fleet), clock_skew_s=30, max_message_bytes=32768
    )
    state = PartitionState()
    value = authorized(fleet, "V-1")
    cid = AuthorizedCommand.decode(value).command_id
    before = {
        name: sample(name, "succeeded")
        for name in (
            "fleetbus_command_bus_latency_seconds_sum",
            "fleetbus_command_bus_latency_seconds_count",
            "fleetbus_command_e2e_latency_seconds_sum",
        )
    }
    # Authorized 120 s after issue (an approval wait), answered 0.5 s later.
    stage.process(rec(TOPICS.authorized, value), state, NOW + 120)
    response = Response(command_id=cid, vehicle_id="V-1", status=200, executed_at=NOW + 120.4)
    env = vehicle_envelope(fleet, "V-1", "rsp", TOPICS.responses, cid, response.encode())
    stage.process(rec(TOPICS.responses, env), state, NOW + 120.5)

    def delta(name: str) -> float:
        return sample(name, "succeeded") - before[name]

    assert delta("fleetbus_command_bus_latency_seconds_count") == 1
    assert abs(delta("fleetbus_command_bus_latency_seconds_sum") - 0.5) < 0.001  # ms in state
    assert delta("fleetbus_command_e2e_latency_seconds_sum") >= 120
