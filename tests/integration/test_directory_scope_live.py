"""Workers with ``directory_scope=partitions`` on the real broker (issue 12).

One worker alone holds every vehicle; when a second joins, each holds the vehicles of its own
partitions only (``fleetbus_directory_vehicles_held``), commands reach vehicles of both
workers' partitions, and a vehicle revoked with ``keys revoke --bootstrap`` is refused by the
worker that serves it (the other one never even reads its record). When the second worker
stops, the first loads the partition it gets back and serves its vehicles again. Prints the
load times the workers logged.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleetbus.bus.commands import CommandState, Target
from fleetbus.bus.directory import write_directory_file
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.bus.topics import kafka_partition
from fleetbus.cli.fleet import simulator_agent
from fleetbus.cli.keys import keys_app
from fleetbus.devtools.kafka import free_port
from fleetbus.devtools.process import WorkerProcess
from fleetbus.sdk.dispatch import CommandPublisher
from fleetbus.sdk.keytopic import publish_key_change
from tests.support.pipeline import DISPATCHER, make_test_fleet, worker_env

FINAL = [CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED, CommandState.EXPIRED]
VEHICLE_KEYED = ("seal", "responses", "telemetry")


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _held(port: int) -> int | None:
    try:
        _, body = _get(port, "/metrics")
    except OSError:
        return None
    found = re.search(rb"^fleetbus_directory_vehicles_held (\S+)$", body, re.MULTILINE)
    return None if found is None else int(float(found.group(1)))


def _assigned(port: int) -> dict[str, list[int]] | None:
    """Each stage's partitions, once the worker is ready (every assignment opened)."""
    try:
        code, body = _get(port, "/readyz")
    except OSError:
        return None
    if code != 200:
        return None
    return {s["stage"]: s["assigned"] for s in json.loads(body)["stages"]}


def _settled(
    workers: dict[str, tuple[WorkerProcess, int]], expected: dict[str, list[int]], held: Any
) -> dict[str, list[int]]:
    """Wait until worker ``name`` has partitions ``expected[name]`` in every stage and holds
    ``held(partitions)`` vehicles; returns the partitions."""
    deadline = time.monotonic() + 180
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        done = True
        for name, (worker, port) in workers.items():
            assert worker.running(), worker.output()[-3000:]
            stages = _assigned(port)
            count = _held(port)
            last[name] = (stages, count)
            ok = stages is not None and all(
                stages[s] == expected[name] for s in ("authorize", *VEHICLE_KEYED)
            )
            done = done and ok and count == held(expected[name])
        if done:
            return expected
        time.sleep(0.5)
    pytest.fail(f"workers never settled on {expected}: {last}")


def test_scoped_workers_hold_their_partitions_vehicles_and_move_them_on_rebalance(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = make_test_fleet(
        tmp_path, vehicles=8, vehicle_capabilities=["wire2"], sealer_capabilities=["wire2"]
    )
    settings = fleet.settings_for(kafka_bootstrap)
    partitions = settings.partitions
    # A head whose buckets are the partitions: what a root holder of this fleet signs.
    directory = fleet.reload_directory()
    assert directory.head is not None
    head = fleet.root.sign_head(
        directory.compute_head(
            seq=directory.head.seq + 1, at=time.time(), vehicle_buckets=partitions
        )
    )
    write_directory_file(KeyFolder(fleet.keys_dir).directory, head, directory.signed_records())
    directory = fleet.reload_directory()
    publish_key_change(settings, directory.signed_records(), head)
    monkeypatch.setenv("FLEETBUS_TOPICS__PREFIX", settings.topics.prefix)

    by_partition: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for vid in fleet.vehicle_ids:
        by_partition[kafka_partition(vid.encode(), partitions)].append(vid)
    assert all(by_partition.values()), by_partition

    def held(assigned: list[int]) -> int:
        return sum(len(by_partition[p]) for p in assigned)

    def start(name: str) -> tuple[WorkerProcess, int]:
        port = free_port()
        workdir = tmp_path / name
        workdir.mkdir()
        env = worker_env(
            settings,
            workdir,
            FLEETBUS_METRICS_PORT=str(port),
            FLEETBUS_DIRECTORY_SCOPE="partitions",
        )
        return WorkerProcess(env, workdir / "worker.log"), port

    a = start("a")
    agent = simulator_agent(
        settings,
        fleet.keys_dir,
        list(fleet.vehicle_ids),
        store_path=tmp_path / "sim" / "fleet-sim.sqlite",
    ).start()
    publisher = CommandPublisher(
        settings, principal_id=DISPATCHER, private_key_file=fleet.key_file_path(DISPATCHER)
    )
    b: tuple[WorkerProcess, int] | None = None
    runner = CliRunner()

    def ping(vid: str) -> Any:
        handle = publisher.send(Target(vehicle=vid), "ping")
        handle.wait(90, until=FINAL)
        return handle

    try:
        everything = list(range(partitions))
        _settled({"a": a}, {"a": everything}, held)

        b = start("b")
        # Range assignment orders the workers alike in every group (one worker id in every
        # stage's client id): each gets the same half in every stage.
        half = partitions // 2
        first, second = everything[:half], everything[half:]
        deadline = time.monotonic() + 180
        while True:
            stages = _assigned(a[1])
            if stages is not None and stages["seal"] in (first, second):
                break
            assert time.monotonic() < deadline, (stages, a[0].output()[-3000:])
            time.sleep(0.5)
        mine = stages["seal"]
        theirs = second if mine == first else first
        _settled({"a": a, "b": b}, {"a": mine, "b": theirs}, held)

        # Commands reach vehicles of both workers' partitions, answers come back (v2, keyed
        # by vehicle: verified where the vehicle's record is).
        for p in everything:
            for vid in by_partition[p][:2]:
                handle = ping(vid)
                assert handle.events[-1].state is CommandState.SUCCEEDED, handle.events

        # A vehicle of worker b's partitions is revoked: in force at b, never read by a.
        victim = by_partition[theirs[0]][0]
        args = ["revoke", "--dir", str(fleet.keys_dir), "--principal", victim]
        result = runner.invoke(keys_app, [*args, "--bootstrap", kafka_bootstrap])
        assert result.exit_code == 0, result.output
        deadline = time.monotonic() + 30
        while f"revocation of {victim}" not in b[0].output():
            assert time.monotonic() < deadline, b[0].output()[-3000:]
            time.sleep(0.1)
        assert f"revocation of {victim}" not in a[0].output()
        handle = ping(victim)
        assert handle.events[-1].state is CommandState.REJECTED, handle.events
        assert handle.events[-1].reason is ReasonCode.SIGNER_REVOKED, handle.events
        survivor = by_partition[theirs[0]][1] if len(by_partition[theirs[0]]) > 1 else None
        if survivor is not None:
            assert ping(survivor).events[-1].state is CommandState.SUCCEEDED

        # b leaves: a loads b's partitions again (directory.cbor, then the key topic), with
        # the revocation, and serves their other vehicles.
        b[0].stop()
        b = None
        _settled({"a": a}, {"a": everything}, held)
        handle = ping(victim)
        assert handle.events[-1].reason is ReasonCode.SIGNER_REVOKED, handle.events
        if survivor is not None:
            assert ping(survivor).events[-1].state is CommandState.SUCCEEDED

        loads = [line for line in a[0].output().splitlines() if "key directory: buckets" in line]
        print("\ndirectory scope changes at worker a:")
        for line in loads:
            print(" ", json.loads(line)["message"] if line.startswith("{") else line)
        assert any("dropped" in line for line in loads), loads
        assert sum("loaded" in line for line in loads) >= 2, loads
    finally:
        publisher.close()
        agent.close()
        if b is not None:
            b[0].stop()
        a[0].stop()
