"""Uplink recovery on the real broker (issue 13, docs/wire-format.md V2.7.1): the bus lacks the
uplink epoch a vehicle answers in; the response stage asks the vehicle with a bus-signed
``uplink_epoch_unknown`` status on ``commands.outbound``, the vehicle opens a new epoch, sends
its answer again, and the command's outcome is reported — executed once. The agent is restarted
between its answer and the bus's status: the new process finds the answer's epoch in the store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fleetbus.bus.commands import CommandState, Target
from fleetbus.bus.envelope import MessageKind
from fleetbus.bus.envelope_v2 import ParsedStatus, StatusCode, decode_record
from fleetbus.devtools.process import WorkerProcess
from fleetbus.providers.sealing import SealRequest
from fleetbus.sdk.dispatch import CommandPublisher
from fleetbus.sdk.vehicle import VehicleAgent
from tests.integration.test_pipeline import Executions, dlq_letters, topic, wait_final
from tests.support.pipeline import DISPATCHER, make_test_fleet, read_topic, worker_env


def test_an_answer_in_an_uplink_epoch_the_bus_lacks_is_recovered(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    fleet = make_test_fleet(
        tmp_path, vehicles=2, vehicle_capabilities=["wire2"], sealer_capabilities=["wire2"]
    )
    settings = fleet.settings_for(kafka_bootstrap)
    worker = WorkerProcess(
        worker_env(settings, tmp_path, FLEETBUS_WIRE_VERSION="2"), tmp_path / "worker.log"
    )
    executions = Executions()
    store = tmp_path / "agent.sqlite"

    def agent_process() -> VehicleAgent:
        return VehicleAgent(
            settings,
            vehicles=fleet.vehicles(),
            directory=fleet.directory,
            minimum_path="xwing",
            handlers={"ping": executions.handler},
            store_path=store,
        )

    agent = agent_process().start()
    publisher = CommandPublisher(
        settings, principal_id=DISPATCHER, private_key_file=fleet.key_file_path(DISPATCHER)
    )
    outbound = topic(settings, "commands_outbound")
    try:
        first = publisher.send(Target(vehicle="V-0001"), "ping")
        assert wait_final(first, worker).state is CommandState.SUCCEEDED, first.events
        # The bus now holds V-0001's uplink epoch. Give the vehicle one the bus never got
        # (its establishment counted delivered but lost on the way, as when the response
        # stage's state is lost): every later answer of V-0001 is in an epoch the bus lacks.
        agent.stop()  # polled by hand from here: the process ends right after its answer
        vehicle = agent._vehicles["V-0001"]
        now = time.time()
        sealer_keys = fleet.directory.recipient_keys(settings.sealer_principal, at=now)
        responses = topic(settings, "commands_responses")
        vehicle.uplink_v2.forget(settings.sealer_principal)
        prepared = vehicle.uplink_v2.prepare(
            SealRequest(
                MessageKind.RESPONSE, responses, sealer_keys, "never-sent", "", b"", now,
                now + 300, vehicle.profile,
            )
        )  # fmt: skip
        vehicle.uplink_v2.records_for([prepared])
        vehicle.uplink_v2.announced([prepared.epoch_id])
        second = publisher.send(Target(vehicle="V-0001"), "ping")
        deadline = time.monotonic() + 60
        while executions.counts[(second.command_id, "V-0001")] == 0:
            assert time.monotonic() < deadline, second.events
            agent.poll_once(0.5)
        # Answered in the lost epoch and committed; the agent stops before the bus's status.
        agent.close()
        asked: list[Any] = []
        while not asked:
            assert time.monotonic() < deadline, dlq_letters(settings)
            records = read_topic(kafka_bootstrap, outbound, idle_s=1.0)
            parsed = [decode_record(r.value) for r in records if r.key == b"V-0001"]
            asked = [s.status for s in parsed if isinstance(s, ParsedStatus)]
        assert [(s.code, s.epoch_id) for s in asked] == [
            (StatusCode.UPLINK_EPOCH_UNKNOWN, prepared.epoch_id)
        ]
        # A new process on the same store reads the status and sends the answer again.
        agent = agent_process().start()
        outcome = wait_final(second, worker, timeout_s=90)
        assert outcome.state is CommandState.SUCCEEDED, (second.events, dlq_letters(settings))
        assert executions.counts[(second.command_id, "V-0001")] == 1
        assert agent.stats.uplink_renewed == 1
        assert agent.stats.executed == 0  # answered from the store, nothing executed again
        # The lost answer was dead-lettered epoch_unknown.
        assert "epoch_unknown" in [d.reason.value for d in dlq_letters(settings)]
    finally:
        publisher.close()
        agent.close()
        worker.stop()
