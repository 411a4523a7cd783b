"""A misconfigured worker does not look healthy: the real ``fleetbus worker`` on the real broker.

- ``pipeline=auto`` with an empty key folder (the chart's empty Secret): live, not ready, and a
  warning in the log saying why.
- The command pipeline: ready once every stage is in its group with its producers up.
- A Cedar policy that does not parse stops the worker with its file and line before any
  connection to Kafka (the bootstrap given answers nobody).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fleetbus.devtools.kafka import free_port
from fleetbus.devtools.process import WorkerProcess
from tests.support.pipeline import make_test_fleet, worker_env


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(port: int, path: str, status: int, worker: WorkerProcess) -> dict[str, Any]:
    """Poll until ``path`` answers ``status`` (the worker starts in its own time)."""
    deadline = time.monotonic() + 180
    last: Any = None
    while time.monotonic() < deadline:
        assert worker.running(), worker.output()[-3000:]
        try:
            code, body = probe(port, path)
        except OSError as exc:  # not listening yet
            last = exc
        else:
            if code == status:
                return body
            last = (code, body)
        time.sleep(0.5)
    pytest.fail(f"{path} never answered {status}; last {last}\n{worker.output()[-3000:]}")


@pytest.fixture
def fleet_settings(tmp_path: Path, kafka_bootstrap: str) -> tuple[Any, Any]:
    fleet = make_test_fleet(tmp_path, vehicles=2)
    return fleet, fleet.settings_for(kafka_bootstrap)


def test_auto_without_keys_is_live_but_not_ready_and_says_why(
    tmp_path: Path, fleet_settings: tuple[Any, Any]
) -> None:
    _, settings = fleet_settings
    empty = tmp_path / "empty-secret"
    empty.mkdir()
    port = free_port()
    env = worker_env(
        settings,
        tmp_path,
        FLEETBUS_KEYS_DIR=str(empty),
        FLEETBUS_PIPELINE="auto",
        FLEETBUS_METRICS_PORT=str(port),
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        body = wait_for(port, "/readyz", 503, worker)
        assert body["reason"].startswith("pipeline=auto found no key directory")
        assert probe(port, "/healthz")[0] == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert b'fleetbus_build_info{version="' in answer.read()
    finally:
        worker.stop()
    assert "not ready: pipeline=auto found no key directory" in worker.output()


def test_pipeline_worker_becomes_ready_with_every_stage(
    tmp_path: Path, fleet_settings: tuple[Any, Any]
) -> None:
    _, settings = fleet_settings
    port = free_port()
    worker = WorkerProcess(
        worker_env(settings, tmp_path, FLEETBUS_METRICS_PORT=str(port)), tmp_path / "worker.log"
    )
    try:
        body = wait_for(port, "/readyz", 200, worker)
        stages = {s["stage"]: s for s in body["stages"]}
        assert set(stages) == {"authorize", "seal", "responses", "track", "telemetry"}
        assert all(s["assigned"] == s["producers"] == [0, 1] for s in stages.values())
        assert probe(port, "/healthz") == (200, {"live": True, "stalled_stages": []})
    finally:
        worker.stop()


def test_bad_policy_is_reported_with_file_and_line_before_connecting(
    tmp_path: Path, fleet_settings: tuple[Any, Any]
) -> None:
    _, settings = fleet_settings
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "commands.cedar").write_text(
        '@id("a")\npermit (principal, action, resource)\nwhen { context.hour >= };\n'
    )
    env = worker_env(
        settings,
        tmp_path,
        FLEETBUS_POLICY_DIR=str(policies),
        FLEETBUS_KAFKA_BOOTSTRAP="127.0.0.1:9",  # nobody: connecting first would hang there
    )
    result = subprocess.run(
        [sys.executable, "-m", "fleetbus.cli.main", "worker"],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{policies / 'commands.cedar'}:3: Cedar policy does not parse" in result.stderr
