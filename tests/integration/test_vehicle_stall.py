"""A vehicle process frozen past its Kafka session timeout comes back without losing a command
or running one twice.

An edge unit can stall for seconds (CPU starvation, a debugger, a suspended VM). The broker
then evicts its consumer from the group; when the process resumes, the records it had already
fetched are handled and their offsets can no longer be committed (``CommitFailedError``:
unknown member). The process must keep going: rejoin, get the records again, answer them again
from its execute-once store, and serve new commands.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from kafka import KafkaProducer

from fleetbus.bus.settings import FleetbusSettings
from tests.support.pipeline import (
    TestFleet,
    make_test_fleet,
    read_topic,
    seal_command,
    vehicle_id,
)

SESSION_TIMEOUT_S = 6  # the broker's group.min.session.timeout.ms
VEHICLES = [vehicle_id(1), vehicle_id(2)]


def send_commands(
    fleet: TestFleet, settings: FleetbusSettings, producer: KafkaProducer, n: int
) -> list[str]:
    """``n`` sealed ``honk`` commands on ``commands.outbound``, as the seal stage writes them."""
    outbound = settings.topics.full(settings.topics.commands_outbound)
    ids = []
    for i in range(n):
        vid = VEHICLES[i % len(VEHICLES)]
        command, envelope = seal_command(fleet, settings, vid, action="honk", ttl_s=300)
        producer.send(outbound, key=vid.encode(), value=envelope)
        ids.append(command.id)
    producer.flush(20)
    return ids


def answers(settings: FleetbusSettings) -> Counter[str]:
    """How many answers each command id has on ``commands.responses`` (keyed by command id)."""
    topic = settings.topics.full(settings.topics.commands_responses)
    records = read_topic(settings.kafka_bootstrap, topic, idle_s=2)
    return Counter(r.key.decode() for r in records)


def wait_for_answers(settings: FleetbusSettings, ids: list[str], timeout_s: float) -> Counter[str]:
    deadline = time.monotonic() + timeout_s
    seen = answers(settings)
    while not all(seen[c] for c in ids) and time.monotonic() < deadline:
        seen = answers(settings)
    return seen


def test_a_vehicle_process_frozen_past_its_session_timeout_recovers(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    fleet = make_test_fleet(tmp_path, vehicles=len(VEHICLES))
    settings = fleet.settings_for(kafka_bootstrap, partitions=1)
    env = {
        **os.environ,
        "FLEETBUS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "FLEETBUS_TOPICS__PREFIX": settings.topics.prefix,
        "FLEETBUS_APP_ID": settings.app_id,
        "FLEETBUS_BROKER_SESSION_TIMEOUT_S": str(SESSION_TIMEOUT_S),
        "FLEETBUS_BROKER_HEARTBEAT_INTERVAL_S": "1",
        "FLEETBUS_LOG_FORMAT": "text",
    }
    log = tmp_path / "sim.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "fleetbus.cli.fleet", "fleet", "simulate",
                "--keys-dir", str(fleet.keys_dir), "--vehicle", VEHICLES[0],
                "--vehicle", VEHICLES[1], "--store", str(tmp_path / "sim.sqlite"),
                "--summary-every", "600",
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        before = send_commands(fleet, settings, producer, 4)
        seen = wait_for_answers(settings, before, 60)
        assert all(seen[c] == 1 for c in before), (seen, log.read_text()[-3000:])

        # Frozen with commands arriving: the broker evicts the member meanwhile.
        process.send_signal(signal.SIGSTOP)
        during = send_commands(fleet, settings, producer, 6)
        time.sleep(SESSION_TIMEOUT_S + 6)
        process.send_signal(signal.SIGCONT)
        seen = wait_for_answers(settings, during, 90)
        assert process.poll() is None, log.read_text()[-3000:]
        assert all(seen[c] >= 1 for c in during), (seen, log.read_text()[-3000:])

        after = send_commands(fleet, settings, producer, 4)
        seen = wait_for_answers(settings, after, 90)
        assert all(seen[c] >= 1 for c in after), (seen, log.read_text()[-3000:])
        assert process.poll() is None, log.read_text()[-3000:]
    finally:
        producer.close()
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
        process.wait(60)
    output = log.read_text()
    assert process.returncode == 0, output[-3000:]
    # Each command ran exactly once: redelivered ones were answered again from the store.
    summary = output.strip().splitlines()[-1]
    assert "executed=14 " in summary, summary
