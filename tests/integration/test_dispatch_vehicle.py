"""The dispatch and vehicle SDKs against the real broker, without the processors.

The test plays the bus: it reads what ``CommandPublisher`` publishes, writes status events, and
seals outbound envelopes itself as ``bus-sealer`` for ``VehicleAgent``.

Over 500 lines because both SDKs are tested against one broker fixture set in which the test
plays the bus.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY

from fleetbus.bus.commands import (
    Command,
    Decision,
    Response,
    SignedApproval,
    SignedCommand,
    StatusEvent,
    Target,
    Telemetry,
)
from fleetbus.bus.errors import ConfigError, FleetbusError, KafkaUnavailableError, ReasonCode
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.sdk.dispatch import CommandPublisher, StatusTimeoutError, status_partition
from fleetbus.sdk.vehicle import HandlerResult, VehicleAgent, outbound_partition
from tests.support.pipeline import (
    APPROVER,
    DISPATCHER,
    INTRUDER,
    SEALER,
    TestFleet,
    make_test_fleet,
    seal_command,
)

V1, V2, V3 = "V-0001", "V-0002", "V-0003"  # V1, V3 north; V2 south


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> TestFleet:
    return make_test_fleet(tmp_path_factory.mktemp("fleet"), vehicles=3)


@pytest.fixture
def settings(fleet: TestFleet, kafka_bootstrap: str) -> FleetbusSettings:
    return fleet.settings_for(kafka_bootstrap)  # type: ignore[no-any-return]


def read_all(
    settings: FleetbusSettings, topic_name: str, want: int, timeout_s: float = 20
) -> list[Any]:
    """Records of a topic from the beginning, until ``want`` arrived or the timeout."""
    topic = settings.topics.full(topic_name)
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < want and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend(records)
    finally:
        consumer.close()
    return got


def produce(settings: FleetbusSettings, topic_name: str, key: str, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        producer.send(settings.topics.full(topic_name), key=key.encode(), value=value).get(20)
    finally:
        producer.close()


# --- dispatch side -------------------------------------------------------------------------


def test_send_publishes_a_signed_command_keyed_by_id_with_trace_context(
    fleet: TestFleet, settings: FleetbusSettings
) -> None:
    tracer = TracerProvider().get_tracer("test")
    with CommandPublisher(
        settings, principal_id=DISPATCHER, private_key_file=fleet.key_file_path(DISPATCHER)
    ) as publisher:
        with tracer.start_as_current_span("dispatch") as span:
            handle = publisher.send(
                Target(vehicle=V1), "unlock_doors", {"door": "driver"}, ttl_s=30, priority=5
            )
        trace_id = format(span.get_span_context().trace_id, "032x")
    (record,) = read_all(settings, settings.topics.commands_requested, want=1)
    assert record.key == handle.command_id.encode()
    signed = SignedCommand.decode(record.value)
    assert signed.encode() == record.value
    command = signed.verify(fleet.directory, at=time.time())
    assert command == handle.command
    assert command.issuer == DISPATCHER
    assert command.params == {"door": "driver"}
    headers = dict(record.headers)
    assert trace_id in headers["traceparent"].decode()


def test_wait_returns_the_first_final_status_of_its_own_command(
    fleet: TestFleet, settings: FleetbusSettings
) -> None:
    with CommandPublisher(
        settings, principal_id=DISPATCHER, signer=fleet.signer(DISPATCHER)
    ) as publisher:
        handle = publisher.send(Target(vehicle=V1), "honk")
        other = publisher.send(Target(vehicle=V1), "honk")
    now = time.time()
    for cid, state in [
        (other.command_id, "failed"),  # someone else's final state: ignored
        (handle.command_id, "authorized"),
        (handle.command_id, "delivered"),
        (handle.command_id, "succeeded"),
    ]:
        event = StatusEvent(command_id=cid, state=state, at=now, vehicle_id=V1)  # type: ignore[arg-type]
        produce(settings, settings.topics.commands_status, cid, event.encode())
    produce(settings, settings.topics.commands_status, handle.command_id, b"not cbor")
    final = handle.wait(30)
    assert final.state == "succeeded"
    assert final.command_id == handle.command_id
    assert [e.state for e in handle.events] == ["authorized", "delivered", "succeeded"]
    assert handle.wait(30, until={"delivered"}).state == "delivered"
    with pytest.raises(StatusTimeoutError):
        other.wait(2, until={"expired"})


def test_wait_reports_each_vehicle_of_a_group_and_reads_only_its_partition(
    fleet: TestFleet, settings: FleetbusSettings
) -> None:
    with CommandPublisher(
        settings, principal_id=DISPATCHER, signer=fleet.signer(DISPATCHER)
    ) as publisher:
        handle = publisher.send(Target(group="north"), "honk")
    cid = handle.command_id
    topic = settings.topics.full(settings.topics.commands_status)
    own = status_partition(cid, range(settings.partitions))
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")

    def status(state: str, vehicle: str, partition: int = own) -> None:
        event = StatusEvent(command_id=cid, state=state, at=time.time(), vehicle_id=vehicle)  # type: ignore[arg-type]
        producer.send(topic, key=cid.encode(), value=event.encode(), partition=partition).get(20)

    try:
        # Keyed by the command id but not on its partition: no bus producer writes it there.
        status("failed", V3, partition=(own + 1) % settings.partitions)
        status("authorized", V1)
        status("authorized", V3)
        status("succeeded", V1)
        with pytest.raises(StatusTimeoutError):
            handle.wait(3)  # V3 has no final state yet
        status("succeeded", V3)
        outcome = handle.wait(30)
    finally:
        producer.close()
    assert outcome.state == "succeeded"
    assert {v: str(e.state) for v, e in outcome.vehicles.items()} == {
        V1: "succeeded",
        V3: "succeeded",
    }
    assert all(e.state != "failed" for e in handle.events)


def test_approve_publishes_a_signed_approval_bound_to_the_command(
    fleet: TestFleet, settings: FleetbusSettings
) -> None:
    with (
        CommandPublisher(
            settings, principal_id=DISPATCHER, signer=fleet.signer(DISPATCHER)
        ) as dispatcher,
        CommandPublisher(
            settings, principal_id=APPROVER, private_key_file=fleet.key_file_path(APPROVER)
        ) as approver,
    ):
        handle = dispatcher.send(Target(group="north"), "push_route", {"route": "R-7"})
        approver.approve(handle.signed)
    (record,) = read_all(settings, settings.topics.commands_approvals, want=1)
    assert record.key == handle.command_id.encode()
    approval = SignedApproval.decode(record.value).verify(fleet.directory, at=time.time())
    assert approval.approver == APPROVER
    assert approval.decision is Decision.APPROVE
    assert approval.command_id == handle.command_id
    assert approval.is_for(handle.signed)


def test_clear_errors_for_a_missing_key_file_a_foreign_key_file_and_no_kafka(
    fleet: TestFleet, settings: FleetbusSettings, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        CommandPublisher(settings, principal_id=DISPATCHER, private_key_file=tmp_path / "x.key")
    with pytest.raises(ConfigError, match="holds the keys of"):
        CommandPublisher(
            settings, principal_id=DISPATCHER, private_key_file=fleet.key_file_path(APPROVER)
        )
    nowhere = settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:9"})

    def send_without_kafka() -> None:
        with CommandPublisher(
            nowhere, principal_id=DISPATCHER, signer=fleet.signer(DISPATCHER), timeout_s=2
        ) as publisher:
            publisher.send(Target(vehicle=V1), "honk")

    with pytest.raises(KafkaUnavailableError) as info:
        send_without_kafka()
    assert info.value.reason is ReasonCode.KAFKA_UNAVAILABLE


# --- vehicle side --------------------------------------------------------------------------


@dataclass
class Calls:
    by_action: dict[str, list[str]] = field(default_factory=dict)

    def handler(self, action: str, result: HandlerResult | None = None) -> Callable[..., Any]:
        def run(command: Command) -> HandlerResult | None:
            self.by_action.setdefault(action, []).append(command.id)
            if action == "explode":
                raise RuntimeError("boom")
            return result

        return run

    def count(self, command_id: str) -> int:
        return sum(ids.count(command_id) for ids in self.by_action.values())


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def make_agent(
    fleet: TestFleet, settings: FleetbusSettings, calls: Calls, tmp_path: Path
) -> Iterator[Callable[..., VehicleAgent]]:
    agents: list[VehicleAgent] = []

    def make(**kw: Any) -> VehicleAgent:
        args: dict[str, Any] = {
            "vehicles": fleet.vehicles([V1, V2]),
            "directory": fleet.directory,
            "minimum_path": "xwing",
            "handlers": {
                "unlock_doors": calls.handler("unlock_doors"),
                "honk": calls.handler("honk", HandlerResult(202, "queued")),
                "explode": calls.handler("explode"),
            },
            "store_path": tmp_path / "executed.sqlite",
        }
        args.update(kw)
        agent = VehicleAgent(settings, **args)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()


def send_outbound(settings: FleetbusSettings, key: str, envelope: bytes) -> None:
    produce(settings, settings.topics.commands_outbound, key, envelope)


def serve_until(agent: VehicleAgent, done: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        agent.poll_once(0.5)
    assert done(), f"agent did not get there: {agent.stats}"


def responses(fleet: TestFleet, settings: FleetbusSettings, want: int) -> list[Response]:
    """Open every response envelope as the bus sealer would (a fresh opener per record, so that
    re-sent answers are not replays here)."""
    topic = settings.topics.full(settings.topics.commands_responses)
    out = []
    for record in read_all(settings, settings.topics.commands_responses, want=want):
        opened = fleet.opener(SEALER).open(record.value, topic=topic)
        response = Response.decode(opened.payload)
        assert record.key == response.command_id.encode()
        assert opened.sender == response.vehicle_id
        assert opened.kind == "rsp"
        out.append(response)
    return out


def rejects(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "fleetbus_envelope_rejects_total", {"role": "vehicle", "reason": reason}
    )
    return value or 0.0


def test_agent_executes_once_answers_signed_and_redelivery_does_not_execute_again(
    fleet: TestFleet,
    settings: FleetbusSettings,
    calls: Calls,
    make_agent: Callable[..., VehicleAgent],
) -> None:
    command, envelope = seal_command(fleet, settings, V1)
    send_outbound(settings, V1, envelope)
    agent = make_agent()
    serve_until(agent, lambda: agent.stats.answered >= 1)
    assert calls.count(command.id) == 1
    (first,) = responses(fleet, settings, want=1)
    assert (first.command_id, first.vehicle_id, first.status) == (command.id, V1, 200)

    # The same envelope again (a redelivery): answered again from the store, not executed.
    send_outbound(settings, V1, envelope)
    serve_until(agent, lambda: agent.stats.answered >= 2)
    assert calls.count(command.id) == 1
    assert agent.stats.duplicates == 1

    # A restarted agent that lost its offsets (new group) reads both records again.
    agent.close()
    restarted = make_agent(group_id=f"{agent.group_id}-again")
    serve_until(restarted, lambda: restarted.stats.answered >= 2)
    assert calls.count(command.id) == 1
    answers = responses(fleet, settings, want=4)
    assert len(answers) == 4
    assert {(r.command_id, r.status, r.executed_at) for r in answers} == {
        (command.id, 200, first.executed_at)
    }
    # Each answer's envelope id is the command id: one bus opener takes the first and drops
    # the re-sent ones as replays.
    opener = fleet.opener(SEALER)
    topic = settings.topics.full(settings.topics.commands_responses)
    records = read_all(settings, settings.topics.commands_responses, want=4)
    assert opener.open(records[0].value, topic=topic).message_id == command.id
    for record in records[1:]:
        with pytest.raises(FleetbusError) as info:
            opener.open(record.value, topic=topic)
        assert info.value.reason is ReasonCode.REPLAYED


def test_statuses_for_handler_results_unknown_actions_failures_and_groups(
    fleet: TestFleet,
    settings: FleetbusSettings,
    calls: Calls,
    make_agent: Callable[..., VehicleAgent],
) -> None:
    honk, honk_env = seal_command(fleet, settings, V2, action="honk")
    unknown, unknown_env = seal_command(fleet, settings, V1, action="teleport")
    boom, boom_env = seal_command(fleet, settings, V1, action="explode")
    north, north_env = seal_command(fleet, settings, V1, target=Target(group="north"))
    wrong, wrong_env = seal_command(fleet, settings, V2, target=Target(group="north"))
    for key, env in [(V2, honk_env), (V1, unknown_env), (V1, boom_env), (V1, north_env)]:
        send_outbound(settings, key, env)
    send_outbound(settings, V2, wrong_env)
    agent = make_agent()
    serve_until(agent, lambda: agent.stats.answered >= 5)
    status = {r.command_id: r for r in responses(fleet, settings, want=5)}
    assert status[honk.id].status == 202
    assert status[honk.id].detail == "queued"
    assert status[unknown.id].status == 404
    assert status[boom.id].status == 500
    assert "RuntimeError" in status[boom.id].detail
    assert "boom" not in status[boom.id].detail
    assert status[north.id].status == 200
    assert status[wrong.id].status == 400
    assert status[wrong.id].detail == "wrong_recipient"
    assert calls.count(wrong.id) == 0
    assert calls.count(boom.id) == 1


def test_expired_forged_foreign_and_misaddressed_records_are_not_executed(
    fleet: TestFleet,
    settings: FleetbusSettings,
    calls: Calls,
    make_agent: Callable[..., VehicleAgent],
) -> None:
    expired_before = rejects("expired")
    unknown_before = rejects("unknown_signer")
    expired, expired_env = seal_command(fleet, settings, V1, age_s=600)
    forged, forged_env = seal_command(fleet, settings, V1, sender=INTRUDER)
    bad_issuer, bad_issuer_env = seal_command(fleet, settings, V1, issuer=INTRUDER)
    other, other_env = seal_command(fleet, settings, V3)  # not served by this agent
    misrouted, misrouted_env = seal_command(fleet, settings, V2)  # sealed to V2, keyed V1
    downgrade, downgrade_env = seal_command(fleet, settings, V1, path="x25519")
    for key, env in [
        (V1, expired_env),
        (V1, forged_env),
        (V1, bad_issuer_env),
        (V3, other_env),
        (V1, misrouted_env),
        (V1, downgrade_env),
    ]:
        send_outbound(settings, key, env)
    agent = make_agent()
    serve_until(agent, lambda: agent.stats.ignored + agent.stats.rejected >= 6)
    for command in [expired, forged, bad_issuer, other, misrouted, downgrade]:
        assert calls.count(command.id) == 0
    assert agent.stats.ignored == 1
    assert agent.stats.executed == 0
    assert rejects("expired") == expired_before + 1
    assert rejects("unknown_signer") == unknown_before + 2  # the intruder as sender and issuer
    # Only the authentic envelope (from the bus sealer) with a forged issuer gets an answer.
    (answer,) = responses(fleet, settings, want=1)
    assert answer.command_id == bad_issuer.id
    assert answer.status == 403
    assert len(read_all(settings, settings.topics.commands_responses, want=2, timeout_s=3)) == 1


def test_telemetry_is_sealed_to_the_bus_sealer(
    fleet: TestFleet, settings: FleetbusSettings, make_agent: Callable[..., VehicleAgent]
) -> None:
    agent = make_agent()
    agent.publish_telemetry(V2, {"soc": 0.81, "odometer_km": 12345, "doors_locked": True}).get(20)
    with pytest.raises(FleetbusError):
        agent.publish_telemetry(V3, {"soc": 0.5})
    (record,) = read_all(settings, settings.topics.telemetry_raw, want=1)
    assert record.key == V2.encode()
    topic = settings.topics.full(settings.topics.telemetry_raw)
    opened = fleet.opener(SEALER).open(record.value, topic=topic)
    assert opened.sender == V2
    telemetry = Telemetry.decode(opened.payload)
    assert telemetry.vehicle_id == V2
    assert telemetry.fields == {"soc": 0.81, "odometer_km": 12345, "doors_locked": True}


# --- the CLIs ------------------------------------------------------------------------------


def _cli_env(settings: FleetbusSettings) -> dict[str, str]:
    import os

    return {
        **os.environ,
        "FLEETBUS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "FLEETBUS_TOPICS__PREFIX": settings.topics.prefix,
        "FLEETBUS_APP_ID": settings.app_id,
    }


def test_fleet_simulate_answers_commands_and_exits_cleanly_on_sigterm(
    fleet: TestFleet, settings: FleetbusSettings, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    command, envelope = seal_command(fleet, settings, V2, action="set_battery_profile")
    failing, failing_env = seal_command(fleet, settings, V1, action="fail")
    send_outbound(settings, V2, envelope)
    send_outbound(settings, V1, failing_env)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetbus.cli.fleet",
            "fleet",
            "simulate",
            "--keys-dir",
            str(fleet.keys_dir),
            "--vehicles",
            "3",
            "--summary-every",
            "1",
            "--store",
            str(tmp_path / "sim.sqlite"),
        ],
        env=_cli_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        answers = {r.command_id: r for r in responses(fleet, settings, want=2)}
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert answers[command.id].status == 200
    assert answers[failing.id].status == 500
    assert "executed=2" in out.strip().splitlines()[-1]


def test_dispatch_send_prints_the_command_id(fleet: TestFleet, settings: FleetbusSettings) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetbus.cli.fleet",
            "dispatch",
            "send",
            "--keys-dir",
            str(fleet.keys_dir),
            "--principal",
            DISPATCHER,
            "--group",
            "south",
            "--action",
            "set_climate",
            "--param",
            "temp=21.5",
            "--param",
            "fan=2",
            "--param",
            "auto=true",
            "--no-wait",
        ],
        env=_cli_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (record,) = read_all(settings, settings.topics.commands_requested, want=1)
    command = SignedCommand.decode(record.value).verify(fleet.directory, at=time.time())
    assert result.stdout.strip() == command.id
    assert command.target == Target(group="south")
    assert command.params == {"temp": 21.5, "fan": 2, "auto": True}


def test_a_confined_agent_reads_only_its_vehicles_partitions(
    fleet: TestFleet,
    settings: FleetbusSettings,
    calls: Calls,
    make_agent: Callable[..., VehicleAgent],
) -> None:
    """``confine_partitions``: the gateway of V1 is assigned V1's partition of
    commands.outbound (where the producer's partitioner put it) and never fetches another's."""
    partitions = settings.partitions
    elsewhere = next(
        f"V-9{n:03d}"
        for n in range(1000)
        if outbound_partition(f"V-9{n:03d}", partitions) != outbound_partition(V1, partitions)
    )
    command, envelope = seal_command(fleet, settings, V1)
    send_outbound(settings, V1, envelope)
    for _ in range(3):
        send_outbound(settings, elsewhere, b"another vehicle's envelope")
    landed = {
        record.key.decode(): record.partition
        for record in read_all(settings, settings.topics.commands_outbound, want=4)
    }
    assert landed == {
        V1: outbound_partition(V1, partitions),
        elsewhere: outbound_partition(elsewhere, partitions),
    }

    agent = make_agent(vehicles=fleet.vehicles([V1]), confine_partitions=True)
    read = 0

    def answered() -> bool:
        nonlocal read
        read += agent.poll_once(0.5)
        return agent.stats.answered >= 1

    deadline = time.monotonic() + 30
    while not answered():
        assert time.monotonic() < deadline, agent.stats
    for _ in range(3):  # what else there is to fetch would come now
        read += agent.poll_once(0.5)
    assert calls.count(command.id) == 1
    assert read == 1  # V1's record only: the other partition was never fetched
    assert {tp.partition for tp in agent.transport.consumer.assignment()} == {landed[V1]}
