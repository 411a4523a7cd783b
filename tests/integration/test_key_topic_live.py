"""Key changes live on the real broker: `fleetbus keys revoke --bootstrap` while commands flow.

A running `fleetbus worker` and a running `fleetbus fleet simulate` agent (its defaults:
holding set 0 and its own vehicle, following the key topic) must have the revocation in force
within 5 s, without a restart: the revoked dispatcher's
next command is rejected `signer_revoked` at the bus, and a command the bus sealed before the
revocation is refused by the vehicle's own check. Prints the propagation times measured.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleetbus.bus.commands import Command, CommandState, Target
from fleetbus.bus.directory import (
    issue_key,
    publish_directory_file,
    read_directory_file,
    save_key_file,
)
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.cli.fleet import simulator_agent
from fleetbus.cli.keys import keys_app
from fleetbus.devtools.process import WorkerProcess
from fleetbus.sdk.dispatch import CommandPublisher
from fleetbus.sdk.keytopic import publish_key_change
from fleetbus.sdk.vehicle import HandlerResult, VehicleAgent, load_key_directory
from tests.support.pipeline import DAY_S, make_test_fleet, worker_env

FINAL = [CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED, CommandState.EXPIRED]
REVOCATIONS = 6
IN_FORCE_WITHIN_S = 5.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _in_force_at(worker: WorkerProcess, key_id: str, deadline_s: float) -> float:
    """When the worker logged the revocation of ``key_id`` as in force (its wall clock)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for line in worker.output().splitlines():
            if key_id in line and "in force" in line and line.startswith("{"):
                stamp = json.loads(line)["time"]
                return datetime.fromisoformat(stamp).timestamp()
        time.sleep(0.05)
    pytest.fail(f"the worker never applied the revocation of {key_id}:\n{worker.output()[-3000:]}")


def _written_at(settings: FleetbusSettings) -> dict[bytes, float]:
    """Kafka key -> the producer's timestamp of its last record on the key topic (seconds)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None)
    try:
        topic = settings.topics.full(settings.topics.keys)
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        stamps: dict[bytes, float] = {}
        while any(consumer.position(tp) < end[tp] for tp in tps):
            for records in consumer.poll(timeout_ms=1000).values():
                for record in records:
                    stamps[record.key] = record.timestamp / 1000
        return stamps
    finally:
        consumer.close()


def test_a_revocation_is_in_force_at_the_bus_and_the_vehicles_within_seconds(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = make_test_fleet(tmp_path, vehicles=2)
    now = time.time()
    dispatchers = [f"dispatch-r{i}" for i in range(REVOCATIONS + 1)]
    issued = [
        issue_key(
            fleet.root,
            principal_id=pid,
            kind="dispatcher",
            signature_suite="ed25519",
            not_before=now - DAY_S,
            not_after=now + 30 * DAY_S,
        )
        for pid in dispatchers
    ]
    path = KeyFolder(fleet.keys_dir).directory
    publish_directory_file(
        path, fleet.root, [*read_directory_file(path).records, *(i.signed for i in issued)]
    )
    for item in issued:
        save_key_file(fleet.key_file_path(item.key_file.principal_id), item.key_file)
        fleet.key_files[item.key_file.principal_id] = item.key_file
    directory = fleet.reload_directory()
    settings = fleet.settings_for(kafka_bootstrap)
    head = directory.signed_head
    assert head is not None
    publish_key_change(settings, directory.signed_records(), head)
    # The CLI below reads its topic names from the environment, as an operator's would.
    monkeypatch.setenv("FLEETBUS_TOPICS__PREFIX", settings.topics.prefix)

    worker = WorkerProcess(worker_env(settings, tmp_path), tmp_path / "worker.log")
    ran: list[str] = []
    lock = threading.Lock()

    def handler(command: Command) -> HandlerResult:
        with lock:
            ran.append(command.id)
        return HandlerResult(200, "ok")

    def agent_for(vid: str) -> VehicleAgent:
        return VehicleAgent(
            settings,
            vehicles=[fleet.vehicle(vid)],
            directory=load_key_directory(
                fleet.keys_dir, state_dir=tmp_path / f"state-{vid}", vehicles=[vid]
            ),
            minimum_path="xwing",
            handlers={"ping": handler},
            store_path=tmp_path / f"{vid}.sqlite",
            follow_key_topic=True,
        )

    # Built as `fleetbus fleet simulate --vehicle V-0001` builds it, with its defaults.
    running = simulator_agent(
        settings, fleet.keys_dir, ["V-0001"], store_path=tmp_path / "sim" / "fleet-sim.sqlite"
    ).start()
    late = agent_for("V-0002")  # started only after a revocation (below)
    publishers = {
        pid: CommandPublisher(settings, principal_id=pid, private_key_file=fleet.key_file_path(pid))
        for pid in dispatchers
    }
    runner = CliRunner()
    try:
        # The agent holds set 0 and its own vehicle, never the other one.
        held = {r.principal_id for r in running.directory.records()}
        assert "V-0002" not in held
        assert {"V-0001", "bus-sealer", *dispatchers} <= held

        # A command sealed for V-0002 while nobody serves it, by the dispatcher revoked next.
        stale_by = dispatchers[-1]
        stale = publishers[stale_by].send(Target(vehicle="V-0002"), "ping")
        assert stale.wait(60, until=[CommandState.SEALED]).state is CommandState.SEALED

        # Wall-clock instants (one machine, one clock) of each revocation reaching each place.
        # A dispatcher issued live commands at once: keys at the bus and the vehicle, and its
        # role in the policy, without a restart.
        refreshed = worker.output().count("fleet registry refreshed")
        args = ["issue", "--dir", str(fleet.keys_dir), "--principal", "dispatch-live"]
        args += ["--kind", "dispatcher", "--suite", "ed25519", "--bootstrap", kafka_bootstrap]
        result = runner.invoke(keys_app, args)
        assert result.exit_code == 0, result.output
        deadline = time.monotonic() + 30
        while worker.output().count("fleet registry refreshed") == refreshed:
            assert time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.1)
        while not running.directory.records("dispatch-live"):
            assert time.monotonic() < deadline, "the vehicle agent never got the new dispatcher"
            time.sleep(0.05)
        with CommandPublisher(
            settings,
            principal_id="dispatch-live",
            private_key_file=fleet.key_file_path("dispatch-live"),
        ) as live:
            handle = live.send(Target(vehicle="V-0001"), "ping")
            assert handle.wait(60, until=FINAL).state is CommandState.SUCCEEDED, handle.events

        bus_at: list[float] = []
        vehicle_at: list[float] = []
        rejected_at: list[float] = []
        revoked_keys: list[bytes] = []
        for pid in dispatchers:
            assert (
                publishers[pid].send(Target(vehicle="V-0001"), "ping").wait(60, until=FINAL).state
                is CommandState.SUCCEEDED
            ), worker.output()[-3000:]
            kid = fleet.key_files[pid].key_id
            args = ["revoke", "--dir", str(fleet.keys_dir), "--principal", pid]
            result = runner.invoke(keys_app, [*args, "--bootstrap", kafka_bootstrap])
            assert result.exit_code == 0, result.output
            returned = time.time()
            # The vehicle agent: in force once its directory says so (polled from here).
            while True:
                record = running.directory.record(kid)
                if record is not None and record.revoked:
                    vehicle_at.append(time.time())
                    break
                assert time.time() - returned < IN_FORCE_WITHIN_S, "vehicle agent too slow"
                time.sleep(0.005)
            # The bus: its next command is rejected signer_revoked.
            handle = publishers[pid].send(Target(vehicle="V-0001"), "ping")
            outcome = handle.wait(60, until=FINAL)
            assert outcome.state is CommandState.REJECTED, handle.events
            assert handle.events[-1].reason is ReasonCode.SIGNER_REVOKED, handle.events
            rejected_at.append(handle.events[-1].at)
            bus_at.append(_in_force_at(worker, kid, IN_FORCE_WITHIN_S))
            revoked_keys.append(f"{pid}/{kid}".encode())

        # The stale command reaches V-0002 only now, after its issuer's revocation.
        late.start()
        outcome = stale.wait(60, until=FINAL)
        assert outcome.state is not CommandState.SUCCEEDED, stale.events
        assert late.stats.rejected >= 1
        with lock:
            assert stale.command_id not in ran

        # From the moment the CLI handed the revocation record to Kafka (producer timestamp).
        written = _written_at(settings)
        sent = [written[key] for key in revoked_keys]
        bus_s = [at - t for at, t in zip(bus_at, sent, strict=True)]
        vehicle_s = [at - t for at, t in zip(vehicle_at, sent, strict=True)]
        first_rejected_s = [at - t for at, t in zip(rejected_at, sent, strict=True)]
        report = {
            "revocations": len(bus_s),
            "bus_in_force_s": {"p50": statistics.median(bus_s), "p99": _percentile(bus_s, 0.99)},
            "vehicle_in_force_s": {
                "p50": statistics.median(vehicle_s),
                "p99": _percentile(vehicle_s, 0.99),
            },
            "bus_rejection_at_s": {
                "p50": statistics.median(first_rejected_s),
                "p99": _percentile(first_rejected_s, 0.99),
            },
        }
        print("\nkey revocation propagation:", json.dumps(report))
        assert max(bus_s) <= IN_FORCE_WITHIN_S, report
        assert max(vehicle_s) <= IN_FORCE_WITHIN_S, report
    finally:
        for publisher in publishers.values():
            publisher.close()
        running.close()
        late.close()
        worker.stop()


def test_cli_publish_is_refused_cleanly_without_a_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kafka down: the folder is written and the error names the way to publish again."""
    from fleetbus.cli import keys as cli_keys

    def quick(settings: FleetbusSettings, records: Any, head: Any) -> None:
        publish_key_change(settings, records, head, timeout_s=2.0)

    monkeypatch.setattr(cli_keys, "publish_key_change", quick)
    runner = CliRunner()
    folder = str(tmp_path / "keys")
    assert runner.invoke(keys_app, ["init", "--dir", folder]).exit_code == 0
    result = runner.invoke(
        keys_app,
        [
            *("issue", "--dir", folder, "--principal", "d-1", "--kind", "dispatcher"),
            *("--bootstrap", "127.0.0.1:9", "--suite", "ed25519"),
        ],
    )
    assert result.exit_code != 0
    assert "keys publish" in str(result.exception)
    assert (tmp_path / "keys" / "d-1.key").exists()
