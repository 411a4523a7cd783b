"""The hostile-input corpus against a real worker and a real VehicleAgent on the real broker.

Bus cases (commands.requested, commands.approvals, commands.responses, telemetry.raw) are
produced with their Kafka keys and headers; each must reach the DLQ with its expected reason
code, be counted in the worker's ``fleetbus_dlq_records_total`` and audited, and the worker must
keep running and still carry a valid command to success afterwards. Vehicle cases
(commands.outbound) go to a VehicleAgent: none of them is executed. Typical runtime: 60-90 s.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import cbor2
import pytest
from kafka import KafkaProducer

from fleetbus.bus.commands import Command, CommandState, SignedCommand, StatusEvent, Target
from fleetbus.bus.directory import RootPublicKey, load_directory
from fleetbus.bus.envelope import decode_envelope
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.devtools.kafka import free_port
from fleetbus.devtools.process import WorkerProcess
from fleetbus.processors.eos import DeadLetter
from fleetbus.sdk.dispatch import CommandPublisher
from fleetbus.sdk.vehicle import HandlerResult, VehicleAgent, VehicleIdentity
from tests.support.pipeline import read_topic, settings_for, worker_env
from tests.vectors.hostile.corpus import BUS_TARGETS, VEHICLE_TARGET, Case, copy_fleet, load_cases
from tests.vectors.hostile.corpus import load_meta as corpus_meta

CASES = load_cases()
META = corpus_meta()
WORKER = META["worker_settings"]
FINAL = [CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED, CommandState.EXPIRED]
#: Same list as the unit test: cases the code does not handle yet (docs/security-testing.md).
KNOWN_ISSUES: frozenset[str] = frozenset()


class Executions:
    def __init__(self) -> None:
        self.ids: Counter[str] = Counter()
        self.lock = threading.Lock()

    def handler(self, command: Command) -> HandlerResult:
        with self.lock:
            self.ids[command.id] += 1
        return HandlerResult(200, "ok")


@pytest.fixture(scope="module")
def hostile(kafka: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    kafka_bootstrap: str = kafka.bootstrap
    tmp_path = tmp_path_factory.mktemp("hostile")
    keys = copy_fleet(tmp_path / "keys")
    root = RootPublicKey.from_bytes(KeyFolder(keys).root_pub.read_bytes())
    directory = load_directory(KeyFolder(keys).directory, root)
    settings: FleetbusSettings = settings_for(
        kafka_bootstrap,
        META["prefix"],
        keys_dir=str(keys),
        sealer_principal="bus-sealer",
        replay_ttl_s=WORKER["replay_ttl_s"],
    )
    port = free_port()
    env = worker_env(
        settings,
        tmp_path,
        FLEETBUS_AUDIT_CHECKPOINT_EVERY="20",
        FLEETBUS_REPLAY_TTL_S=str(WORKER["replay_ttl_s"]),
        FLEETBUS_UPLINK_MAX_LIFETIME_S=str(WORKER["uplink_max_lifetime_s"]),
        FLEETBUS_APPROVAL_WINDOW_S=str(WORKER["approval_window_s"]),
        FLEETBUS_APPROVALS_REQUIRED=str(WORKER["approvals_required"]),
        FLEETBUS_METRICS_PORT=str(port),
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    executions = Executions()
    vehicles = [VehicleIdentity.load(keys, v) for v in ("V-0001", "V-0002")]
    agent = VehicleAgent(
        settings,
        vehicles=vehicles,
        directory=directory,
        minimum_path="xwing",
        handlers={a: executions.handler for a in ("ping", "unlock_doors")},
        store_path=tmp_path / "agent.sqlite",
    )
    reasons: list[str] = []
    real_reject = agent._reject

    def observe_reject(reason: ReasonCode, detail: str) -> None:
        reasons.append(reason.value)
        real_reject(reason, detail)

    agent._reject = observe_reject  # type: ignore[method-assign]
    agent.start()
    publisher = CommandPublisher(
        settings, principal_id="dispatch-1", private_key_file=keys / "dispatch-1.key"
    )
    try:
        yield {
            "settings": settings,
            "worker": worker,
            "agent": agent,
            "reasons": reasons,
            "executions": executions,
            "publisher": publisher,
            "metrics_url": f"http://127.0.0.1:{port}/metrics",
        }
    finally:
        publisher.close()
        agent.close()
        worker.stop()


def produce(settings: FleetbusSettings, cases: list[Case]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, max_request_size=2**20)
    try:
        for case in cases:
            producer.send(
                settings.topics.prefix + case.target,
                key=case.key,
                value=case.value,
                headers=list(case.headers),
            )
        producer.flush(30)
    finally:
        producer.close()


def wait_for_status(
    settings: FleetbusSettings, key: bytes, state: str, worker: WorkerProcess
) -> None:
    status_topic = settings.topics.full(settings.topics.commands_status)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for record in read_topic(settings.kafka_bootstrap, status_topic, idle_s=1.0):
            if record.key == key and StatusEvent.decode(record.value).state.value == state:
                return
    pytest.fail(f"no {state} status for {key!r}:\n{worker.output()[-3000:]}")


def wait_succeeded(publisher: CommandPublisher, worker: WorkerProcess) -> str:
    handle = publisher.send(Target(vehicle="V-0001"), "ping")
    try:
        event = handle.wait(90, until=FINAL)
    except Exception:
        pytest.fail(f"no final status {handle.events}:\n{worker.output()[-4000:]}")
    assert event.state is CommandState.SUCCEEDED, (handle.events, worker.output()[-3000:])
    return handle.command_id


def metric_totals(url: str, name: str) -> Counter[str]:
    """``name`` summed by its ``reason`` label."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith(name + "{") and 'reason="' in line:
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            totals[reason] += int(float(line.rsplit(" ", 1)[1]))
    return totals


def test_bus_cases_are_dead_lettered_counted_and_audited(hostile: dict[str, Any]) -> None:
    settings: FleetbusSettings = hostile["settings"]
    worker: WorkerProcess = hostile["worker"]
    bus_cases = [c for c in CASES.values() if c.target in BUS_TARGETS]
    # Commands first, and the approvals only once the pending command waits: the authorize
    # stage reads two topics, and Kafka orders records only within one partition of one topic.
    produce(settings, [c for c in bus_cases if c.target == "commands.requested"])
    pending = CASES["apr-setup-pending-command"]
    wait_for_status(settings, pending.key or b"", "pending", worker)
    produce(settings, [c for c in bus_cases if c.target != "commands.requested"])

    # Expected DLQ records as a multiset of (source topic, original bytes, reason).
    expected: Counter[tuple[str, bytes | None, str]] = Counter()
    for case in bus_cases:
        if not case.hostile or case.name in KNOWN_ISSUES:
            continue
        source = CASES[case.dlq_of] if case.dlq_of else case
        expected[(settings.topics.prefix + source.target, source.value, case.expect)] += 1
    dlq_topic = settings.topics.full(settings.topics.dlq)
    deadline = time.monotonic() + 120
    missing: Counter[tuple[str, bytes | None, str]] = expected
    letters: list[DeadLetter] = []
    while time.monotonic() < deadline:
        letters = [
            DeadLetter.decode(r.value) for r in read_topic(settings.kafka_bootstrap, dlq_topic)
        ]
        found = Counter((d.source_topic, d.value, d.reason.value) for d in letters)
        missing = expected - found
        if not missing:
            break
    assert not missing, (
        [(t, (v or b"")[:40].hex(), r) for (t, v, r) in missing],
        worker.output()[-4000:],
    )
    assert worker.running(), worker.output()[-4000:]

    # Counted by reason on the worker's /metrics (the DLQ counter of every stage).
    by_reason = Counter(r for (_t, _v, r) in expected.elements())
    metrics = metric_totals(hostile["metrics_url"], "fleetbus_dlq_records_total")
    for reason, count in by_reason.items():
        assert metrics[reason] >= count, (reason, metrics)

    # Audited: every dead letter has an audit record with its reason.
    audit = read_topic(settings.kafka_bootstrap, settings.topics.full(settings.topics.audit))
    outers = [cbor2.loads(r.value) for r in audit]
    events = [cbor2.loads(o["record"]) for o in outers if "record" in o]  # not checkpoints
    audited = Counter(
        e["reason"] for e in events if e.get("event") in ("dead_lettered", "rejected")
    )
    for reason, count in by_reason.items():
        assert audited[reason] >= count, (reason, audited)

    # Still processing valid commands.
    wait_succeeded(hostile["publisher"], worker)
    assert worker.running()


def test_vehicle_cases_are_never_executed(hostile: dict[str, Any]) -> None:
    settings: FleetbusSettings = hostile["settings"]
    agent: VehicleAgent = hostile["agent"]
    executions: Executions = hostile["executions"]
    vehicle_cases = [c for c in CASES.values() if c.target == VEHICLE_TARGET]
    duplicates_before = agent.stats.duplicates
    executed_before = set(executions.ids)  # the bus test's commands
    hostile["reasons"].clear()
    produce(settings, vehicle_cases)
    # The sentinel travels the same partition (key V-0001) after the corpus records: once it
    # has succeeded, the agent has handled every one of them.
    sentinel = wait_succeeded(hostile["publisher"], hostile["worker"])

    control = decode_envelope(CASES["veh-ok-base"].value or b"").header.message_id
    bus_controls = set()
    for name in ("cmd-ok-base",):
        bus_controls.add(SignedCommand.decode(CASES[name].value or b"").command.id)
    allowed = {control, sentinel, *bus_controls}
    new = set(executions.ids) - executed_before
    assert new <= allowed, new - allowed
    assert all(n == 1 for n in executions.ids.values()), executions.ids
    assert executions.ids[control] == 1
    expected = Counter(c.expect for c in vehicle_cases if c.hostile and c.expect != "replayed")
    assert Counter(hostile["reasons"]) == expected
    assert agent.stats.duplicates - duplicates_before >= 1  # veh-replayed
