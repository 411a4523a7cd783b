"""The command pipeline end to end on the real broker: `fleetbus worker` (authorize, seal,
track, telemetry) between a CommandPublisher and a VehicleAgent.

Over 500 lines because its cases share one running worker and fleet against the real broker.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from fleetbus.bus.commands import Command, CommandState, SignedCommand, StatusEvent, Target
from fleetbus.bus.envelope_v2 import Message, decode_record
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.bus.topics import ensure_topics
from fleetbus.devtools.kafka import free_port
from fleetbus.devtools.process import WorkerProcess
from fleetbus.processors.audit import VerifyReport, verify_entries
from fleetbus.processors.eos import DeadLetter
from fleetbus.sdk.dispatch import CommandPublisher
from fleetbus.sdk.vehicle import HandlerResult, VehicleAgent
from tests.support.pipeline import (
    APPROVER,
    DISPATCHER,
    INTRUDER,
    TestFleet,
    make_test_fleet,
    qkd_worker_env,
    read_topic,
    worker_env,
)

FINAL = [CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED, CommandState.EXPIRED]


class Executions:
    """Handlers that count how often each command ran on each vehicle."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def handler(self, command: Command) -> HandlerResult:
        with self.lock:
            self.counts[(command.id, command.target.vehicle or command.target.group or "")] += 1
        return HandlerResult(200, "ok")


@pytest.fixture
def pipeline(
    kafka_bootstrap: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    extra: dict[str, str] = getattr(request, "param", {})
    # The pipeline runs on wire format v2 (the default): every vehicle announces wire2.
    fleet = make_test_fleet(tmp_path, vehicles=4, vehicle_capabilities=["wire2"])
    settings = fleet.settings_for(kafka_bootstrap)
    worker = WorkerProcess(worker_env(settings, tmp_path, **extra), tmp_path / "worker.log")
    executions = Executions()
    agent = VehicleAgent(
        settings,
        vehicles=fleet.vehicles(),
        directory=fleet.directory,
        minimum_path="xwing",
        handlers={a: executions.handler for a in ("ping", "lock_doors", "unlock_doors")},
        store_path=tmp_path / "agent.sqlite",
    ).start()
    publisher = CommandPublisher(
        settings, principal_id=DISPATCHER, private_key_file=fleet.key_file_path(DISPATCHER)
    )
    try:
        yield {
            "fleet": fleet,
            "settings": settings,
            "worker": worker,
            "agent": agent,
            "publisher": publisher,
            "executions": executions,
            "tmp_path": tmp_path,
        }
    finally:
        publisher.close()
        agent.close()
        worker.stop()


def topic(settings: FleetbusSettings, name: str) -> str:
    return settings.topics.full(getattr(settings.topics, name))


def dlq_letters(settings: FleetbusSettings) -> list[DeadLetter]:
    return [
        DeadLetter.decode(r.value)
        for r in read_topic(settings.kafka_bootstrap, topic(settings, "dlq"))
    ]


def status_events(settings: FleetbusSettings, command_id: str) -> list[StatusEvent]:
    records = read_topic(settings.kafka_bootstrap, topic(settings, "commands_status"), idle_s=2)
    return [StatusEvent.decode(r.value) for r in records if r.key == command_id.encode()]


def wait_final(handle: Any, worker: WorkerProcess, timeout_s: float = 60.0) -> Any:
    try:
        return handle.wait(timeout_s, until=FINAL)
    except Exception:
        letters = dlq_letters(handle.settings)
        pytest.fail(
            f"no final status; events {handle.events}; dlq {letters}:\n" + worker.output()[-3000:]
        )


def test_routine_command_succeeds_and_runs_exactly_once(pipeline: dict[str, Any]) -> None:
    handle = pipeline["publisher"].send(Target(vehicle="V-0001"), "ping")
    event = wait_final(handle, pipeline["worker"])
    assert event.state is CommandState.SUCCEEDED, handle.events
    assert event.vehicle_id == "V-0001"
    time.sleep(2)
    assert pipeline["executions"].counts[(handle.command_id, "V-0001")] == 1
    states = [str(e.state) for e in handle.events]
    assert "sealed" in states or "succeeded" in states


def test_group_command_reaches_every_vehicle_of_the_group(pipeline: dict[str, Any]) -> None:
    fleet: TestFleet = pipeline["fleet"]
    settings: FleetbusSettings = pipeline["settings"]
    handle = pipeline["publisher"].send(Target(group="north"), "lock_doors")
    members = fleet.groups["north"]
    deadline = time.monotonic() + 60
    succeeded: set[str] = set()
    while time.monotonic() < deadline and succeeded != set(members):
        succeeded = {
            e.vehicle_id or ""
            for e in status_events(settings, handle.command_id)
            if e.state is CommandState.SUCCEEDED
        }
    assert succeeded == set(members), pipeline["worker"].output()[-3000:]
    # The shared handler ran once per member vehicle.
    assert pipeline["executions"].counts[(handle.command_id, "north")] == len(members)
    # wait() reports each member's final state (the group's targets come from the bus).
    outcome = wait_final(handle, pipeline["worker"])
    assert outcome.state is CommandState.SUCCEEDED
    assert {v: e.state for v, e in outcome.vehicles.items()} == dict.fromkeys(
        members, CommandState.SUCCEEDED
    )
    # Sealed once per member (wire v2 names no command on commands.outbound: the bus's status
    # events and audit records do).
    sealed = [
        e.vehicle_id
        for e in status_events(settings, handle.command_id)
        if e.state is CommandState.SEALED
    ]
    assert sorted(v or "" for v in sealed) == sorted(members)


def test_wire_v2_commands_run_exactly_once_with_one_establishment_per_vehicle(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The worker writes wire format v2 to vehicles whose records announce wire2: routine and
    group commands succeed, each runs once, and each vehicle's partition carries one
    establishment followed by small messages that name no command in clear."""
    from fleetbus.bus.envelope_v2 import Message, ParsedEstablishment, decode_record

    fleet = make_test_fleet(
        tmp_path, vehicles=4, vehicle_capabilities=["wire2"], sealer_capabilities=["wire2"]
    )
    settings = fleet.settings_for(kafka_bootstrap)
    worker = WorkerProcess(
        worker_env(settings, tmp_path, FLEETBUS_WIRE_VERSION="2"), tmp_path / "worker.log"
    )
    executions = Executions()
    agent = VehicleAgent(
        settings,
        vehicles=fleet.vehicles(),
        directory=fleet.directory,
        minimum_path="xwing",
        handlers={a: executions.handler for a in ("ping", "lock_doors")},
        store_path=tmp_path / "agent.sqlite",
    ).start()
    publisher = CommandPublisher(
        settings, principal_id=DISPATCHER, private_key_file=fleet.key_file_path(DISPATCHER)
    )
    try:
        handles = [
            publisher.send(Target(vehicle="V-0001"), "ping"),
            publisher.send(Target(vehicle="V-0001"), "ping"),
            publisher.send(Target(group="north"), "lock_doors"),
        ]
        for handle in handles:
            outcome = wait_final(handle, worker)
            assert outcome.state is CommandState.SUCCEEDED, handle.events
        time.sleep(2)
        assert executions.counts[(handles[0].command_id, "V-0001")] == 1
        assert executions.counts[(handles[1].command_id, "V-0001")] == 1
        members = fleet.groups["north"]
        assert executions.counts[(handles[2].command_id, "north")] == len(members)
        records = read_topic(settings.kafka_bootstrap, topic(settings, "commands_outbound"))
        kinds: Counter[tuple[str, str]] = Counter()
        for r in records:
            parsed = decode_record(r.value)
            kinds[
                (r.key.decode(), "est" if isinstance(parsed, ParsedEstablishment) else "msg")
            ] += 1
            assert isinstance(parsed, ParsedEstablishment | Message)
            assert "fleetbus-command-id" not in dict(r.headers)
            assert handles[0].command_id.encode() not in r.value
        assert kinds[("V-0001", "est")] == 1
        assert kinds[("V-0001", "msg")] == 2 + ("V-0001" in members)
        # The answers went back in v2 keyed by vehicle id (the bus sealer announces wire2), and
        # reached the track stage verified, keyed by command id (issues 12, 13).
        answers = [
            r
            for r in read_topic(settings.kafka_bootstrap, topic(settings, "commands_responses"))
            if isinstance(decode_record(r.value), Message)
        ]
        vehicles = {"V-0001", *members}
        assert len(answers) >= 2 + len(members)  # (a redelivered command is answered again)
        assert {r.key.decode() for r in answers} == vehicles
        verified = read_topic(
            settings.kafka_bootstrap, topic(settings, "commands_responses_verified")
        )
        assert sorted(r.key.decode() for r in verified) == sorted(
            [handles[0].command_id, handles[1].command_id] + [handles[2].command_id] * len(members)
        )
        # Telemetry: ten readings, one v2 batch (after the vehicle's uplink establishment),
        # exported per reading.
        for i in range(10):
            agent.add_reading("V-0002", {"speed_kmh": 50 + i})
        agent.flush()
        deadline = time.monotonic() + 60
        verified: list[Any] = []
        while time.monotonic() < deadline and len(verified) < 10:
            verified = read_topic(
                settings.kafka_bootstrap, topic(settings, "telemetry_verified"), idle_s=2
            )
        assert len(verified) == 10, worker.output()[-3000:]
        raw = read_topic(settings.kafka_bootstrap, topic(settings, "telemetry_raw"), idle_s=1)
        assert len(raw) == 2  # establishment + one batch
        # Signed telemetry (off until now): V-0003's batch goes signed, is exported signed, and
        # its signed bytes are in the audit trail.
        agent.sign_telemetry = True
        for i in range(10):
            agent.add_reading("V-0003", {"speed_kmh": 60 + i})
        agent.flush()
        while time.monotonic() < deadline and len(verified) < 20:
            verified = read_topic(
                settings.kafka_bootstrap, topic(settings, "telemetry_verified"), idle_s=2
            )
        docs = [json.loads(r.value) for r in verified]
        assert (
            sorted((d["vehicle_id"], d["signed"]) for d in docs)
            == [("V-0002", False)] * 10 + [("V-0003", True)] * 10
        ), worker.output()[-3000:]
        audit = [
            cbor2.loads(r.value) for r in read_topic(kafka_bootstrap, topic(settings, "audit"))
        ]
        events = [cbor2.loads(o["record"]) for o in audit if "record" in o]
        [evidence] = [e for e in events if e["event"] == "telemetry_signed"]
        assert evidence["actor"] == "V-0003"
        assert evidence["detail"]["readings"] == 10
    finally:
        publisher.close()
        agent.close()
        worker.stop()


def test_rejections_reach_status_rejected_and_the_dlq(pipeline: dict[str, Any]) -> None:
    fleet: TestFleet = pipeline["fleet"]
    settings: FleetbusSettings = pipeline["settings"]
    publisher: CommandPublisher = pipeline["publisher"]
    worker: WorkerProcess = pipeline["worker"]

    intruder = CommandPublisher(settings, principal_id=INTRUDER, signer=fleet.signer(INTRUDER))
    try:
        h_intruder = intruder.send(Target(vehicle="V-0001"), "ping")
    finally:
        intruder.close()
    # An approver (known, but without the dispatcher role) may not send commands.
    approver = CommandPublisher(settings, principal_id=APPROVER, signer=fleet.signer(APPROVER))
    try:
        h_denied = approver.send(Target(vehicle="V-0001"), "ping")
    finally:
        approver.close()
    expired = Command.create(
        issuer=DISPATCHER,
        target=Target(vehicle="V-0001"),
        action="ping",
        ttl_s=1,
        now=time.time() - 3600,
    )
    h_expired = publisher.publish(SignedCommand.sign(expired, fleet.signer(DISPATCHER)))
    good = publisher.sign(Target(vehicle="V-0002"), "ping")
    h_first = publisher.publish(good)
    assert wait_final(h_first, worker).state is CommandState.SUCCEEDED
    h_replay = publisher.publish(good)
    forged_cmd = publisher.sign(Target(vehicle="V-0001"), "ping")
    forged = SignedCommand(
        forged_cmd.command,
        forged_cmd.key_id,
        forged_cmd.suite,
        bytes(b ^ 0xFF for b in forged_cmd.signature),
    )
    h_forged = publisher.publish(forged)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    producer.send(topic(settings, "commands_requested"), key=b"junk", value=b"\xff\x00garbage")
    producer.flush()
    producer.close()

    expect = [
        (h_intruder, "unknown_signer"),
        (h_denied, "policy_denied"),
        (h_expired, "expired"),
        (h_forged, "bad_signature"),
    ]
    for handle, reason in expect:
        event = wait_final(handle, worker)
        assert event.state is CommandState.REJECTED
        assert event.reason is not None, (reason, event)
        assert event.reason.value == reason, (reason, event)
    replay = h_replay.wait(60, until=[CommandState.REJECTED], ignore_replays=False)
    assert replay.reason is not None
    assert replay.reason.value == "replayed"

    deadline = time.monotonic() + 30
    reasons: Counter[str] = Counter()
    while time.monotonic() < deadline:
        reasons = Counter(d.reason.value for d in dlq_letters(settings))
        if reasons["malformed"] >= 1 and reasons["replayed"] >= 1:
            break
    for reason in (
        "unknown_signer",
        "policy_denied",
        "expired",
        "bad_signature",
        "replayed",
        "malformed",
    ):
        assert reasons[reason] >= 1, reasons
    junk = [d for d in dlq_letters(settings) if d.reason.value == "malformed"]
    assert junk[0].value == b"\xff\x00garbage"
    assert junk[0].source_topic == topic(settings, "commands_requested")
    assert worker.running(), worker.output()[-3000:]
    # The worker still works after all that.
    assert (
        wait_final(publisher.send(Target(vehicle="V-0003"), "ping"), worker).state
        is CommandState.SUCCEEDED
    )


@pytest.mark.parametrize("pipeline", [{"FLEETBUS_APPROVAL_WINDOW_S": "4"}], indirect=True)
def test_high_criticality_waits_for_an_approval(pipeline: dict[str, Any]) -> None:
    fleet: TestFleet = pipeline["fleet"]
    settings: FleetbusSettings = pipeline["settings"]
    publisher: CommandPublisher = pipeline["publisher"]
    worker: WorkerProcess = pipeline["worker"]

    unapproved = publisher.send(Target(vehicle="V-0001"), "unlock_doors")
    event = wait_final(unapproved, worker)
    assert event.state is CommandState.REJECTED
    assert event.reason is not None
    assert event.reason.value == "policy_denied"
    assert "approval window elapsed" in event.detail
    assert any("pending" in e.detail for e in unapproved.events), unapproved.events

    approved = publisher.send(Target(vehicle="V-0001"), "unlock_doors")
    approver = CommandPublisher(settings, principal_id=APPROVER, signer=fleet.signer(APPROVER))
    try:
        approver.approve(approved.signed)
    finally:
        approver.close()
    assert wait_final(approved, worker).state is CommandState.SUCCEEDED
    assert pipeline["executions"].counts[(unapproved.command_id, "V-0001")] == 0


@pytest.mark.parametrize("pipeline", [{"FLEETBUS_AUDIT_CHECKPOINT_EVERY": "2"}], indirect=True)
def test_audit_trail_verifies_and_cli_reports_ok(pipeline: dict[str, Any]) -> None:
    settings: FleetbusSettings = pipeline["settings"]
    fleet: TestFleet = pipeline["fleet"]
    for _ in range(4):
        wait_final(pipeline["publisher"].send(Target(vehicle="V-0001"), "ping"), pipeline["worker"])

    def audit_report(max_unsigned_tail: int | None = None) -> VerifyReport:
        records = read_topic(settings.kafka_bootstrap, topic(settings, "audit"))
        return verify_entries(
            [(r.offset, r.key, r.value) for r in records],
            fleet.directory,
            checkpoint_signer=settings.sealer_principal,
            max_checkpoint_every=2,
            max_unsigned_tail=max_unsigned_tail,
        )

    report = audit_report()
    assert report.ok, report.breaks
    assert sum(report.records.values()) >= 6
    assert sum(report.checkpoints.values()) >= 1

    from typer.testing import CliRunner

    from fleetbus.cli.main import app

    result = CliRunner().invoke(
        app,
        [
            "audit",
            "verify",
            "--bootstrap",
            settings.kafka_bootstrap,
            "--topic",
            topic(settings, "audit"),
            "--keys-dir",
            str(fleet.keys_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "OK" in result.output
    assert "at the tail not covered by a signature" in result.output

    # The end of the worker's run signs every chain's tail: nothing is left unsigned.
    pipeline["worker"].stop()
    report = audit_report(max_unsigned_tail=0)
    assert report.ok, report.breaks
    assert set(report.unsigned_tail.values()) == {0}


def test_exactly_once_outbound_across_a_worker_sigkill(pipeline: dict[str, Any]) -> None:
    settings: FleetbusSettings = pipeline["settings"]
    fleet: TestFleet = pipeline["fleet"]
    tmp_path: Path = pipeline["tmp_path"]
    worker: WorkerProcess = pipeline["worker"]
    publisher: CommandPublisher = pipeline["publisher"]
    ids = []
    n = 40
    for i in range(n):
        ids.append(publisher.send(Target(vehicle=fleet.vehicle_ids[i % 4]), "ping").command_id)
        if i == n // 2:
            time.sleep(1.0)
            worker.kill()
    restarted = WorkerProcess(worker_env(settings, tmp_path), tmp_path / "worker2.log")
    pipeline["worker"] = restarted
    out_topic = topic(settings, "commands_outbound")
    try:
        deadline = time.monotonic() + 120
        counts: Counter[str] = Counter()
        while time.monotonic() < deadline:
            records = read_topic(settings.kafka_bootstrap, out_topic, idle_s=2)
            # Wire v2: commands are the messages (establishments aside); which command each
            # carries is inside the ciphertext, so the vehicles' executions name them.
            messages = [r for r in records if isinstance(decode_record(r.value), Message)]
            counts = Counter(c for (c, _v) in pipeline["executions"].counts.elements())
            if all(counts[c] >= 1 for c in ids) and len(messages) >= n:
                break
        assert len(messages) == n, (len(messages), restarted.output()[-3000:])
        assert all(counts[c] == 1 for c in ids), (
            {c: counts[c] for c in ids if counts[c] != 1},
            restarted.output()[-3000:],
        )
        consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
        try:
            tps = [TopicPartition(out_topic, p) for p in range(settings.partitions)]
            ends = sum(consumer.end_offsets(tps).values())
        finally:
            consumer.close()
        assert ends > n  # commit markers: the outbound records were written in transactions
    finally:
        restarted.stop()


def test_qkd_link_outage_fails_over_to_xwing_visibly(
    kafka_bootstrap: str, tmp_path: Path, kme_pair: Any
) -> None:
    import urllib.request

    from fleetbus.bus.envelope import decode_envelope

    kme_pair.reset()
    fleet = make_test_fleet(tmp_path, vehicles=2)
    fleet.add_edge_unit("E-0001", qkd_sae_id=kme_pair.slave_sae)
    settings = fleet.settings_for(kafka_bootstrap)
    port = free_port()
    env = worker_env(
        settings, tmp_path, FLEETBUS_METRICS_PORT=str(port), **qkd_worker_env(kme_pair)
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    executions = Executions()
    agent = VehicleAgent(
        settings,
        vehicles=[fleet.vehicle("E-0001")],
        directory=fleet.directory,
        minimum_path="xwing",
        handlers={"ping": executions.handler},
        store_path=tmp_path / "edge.sqlite",
        qkd_provider=kme_pair.provider("b"),
    ).start()
    publisher = CommandPublisher(
        settings, principal_id=DISPATCHER, private_key_file=fleet.key_file_path(DISPATCHER)
    )
    out_topic = topic(settings, "commands_outbound")

    def key_path_of(command_id: str) -> str:
        for r in read_topic(kafka_bootstrap, out_topic, idle_s=2):
            if dict(r.headers).get("fleetbus-command-id") == command_id.encode():
                return decode_envelope(r.value).header.key_path
        return ""

    try:
        first = publisher.send(Target(vehicle="E-0001"), "ping")
        assert wait_final(first, worker).state is CommandState.SUCCEEDED
        assert key_path_of(first.command_id) == "qkd-etsi014+xwing"

        kme_pair.admin("POST", "/admin/link", {"up": False})
        second = publisher.send(Target(vehicle="E-0001"), "ping")
        assert wait_final(second, worker).state is CommandState.SUCCEEDED
        assert key_path_of(second.command_id) == "xwing"

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        failovers = [
            line for line in metrics.splitlines()
            if line.startswith("fleetbus_keypath_failover_total{")
            and 'profile="standard"' in line and 'to_path="xwing"' in line
        ]  # fmt: skip
        assert failovers, metrics[-2000:]
        assert float(failovers[0].rsplit(" ", 1)[1]) >= 1
        audit = read_topic(kafka_bootstrap, topic(settings, "audit"))
        outers = [cbor2.loads(r.value) for r in audit]
        events = [cbor2.loads(o["record"]) for o in outers if "record" in o]  # not checkpoints
        failover_events = [
            e for e in events
            if e["event"] == "keypath_failover" and e["command_id"] == second.command_id
        ]  # fmt: skip
        assert failover_events
        assert failover_events[0]["detail"]["to_path"] == "xwing"
    finally:
        kme_pair.reset()
        publisher.close()
        agent.close()
        worker.stop()


def test_worker_refuses_to_start_when_co_partitioned_topics_differ(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """commands.responses.verified made earlier with other partitions than commands.authorized
    and commands.status, which the track stage joins by partition: the worker must not start."""
    fleet = make_test_fleet(tmp_path, vehicles=1)
    prefix = f"t{uuid.uuid4().hex[:10]}."
    wide = 3  # settings_for makes the others with 2
    ensure_topics(kafka_bootstrap, [f"{prefix}commands.responses.verified"], partitions=wide)
    settings = fleet.settings_for(kafka_bootstrap, prefix)
    responses = topic(settings, "commands_responses_verified")
    assert settings.partitions != wide
    worker = WorkerProcess(worker_env(settings, tmp_path), tmp_path / "worker.log")
    try:
        expected = (
            f"{topic(settings, 'commands_status')} has {settings.partitions}, "
            f"{responses} has {wide}"
        )
        deadline = time.monotonic() + 90
        while worker.running() and expected not in worker.output():
            assert time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.5)
        assert "stage track: co-partitioned topics must have equal partition counts" in (
            worker.output()
        ), worker.output()[-3000:]
        assert expected in worker.output()
        # Refusing means not serving: the process ends on its own.
        worker.proc.wait(timeout=60)
        assert worker.proc.returncode != 0
    finally:
        worker.stop()
