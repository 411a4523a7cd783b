"""`fleetbus demo` end to end with a small fleet: it starts its own Apache Kafka, KME pair,
worker and fleet process, plays the whole scenario, exits 0 — and leaves nothing running.

Typical runtime: 1.5-3 minutes (Kafka start, then the QKD outage and the bus's 30 s circuit
breaker before the QKD key path comes back).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from fleetbus.devtools.demo import processes_of
from fleetbus.devtools.kafka import find_free_base_port, port_is_free

EXPECTED_REJECTIONS = {
    "policy_denied": 4,  # no approval, denied approval, approver as issuer, elevated to a group
    "unknown_signer": 1,
    "expired": 1,
    "bad_signature": 1,
    "replayed": 1,
    "key_path_exhausted": 1,  # enclave command while the QKD link is down: no downgrade
}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and (b"fleetbus" in cmdline or b"kafka" in cmdline)


def test_demo_plays_the_scenario_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # Other test sessions on this machine search from 29092 too: start somewhere else (and
    # below the ephemeral port range, see find_free_base_port).
    base_port = find_free_base_port(2, start=random.randrange(10000, 18000, 10))
    workdir = tmp_path / "demo"
    kafka_home = tmp_path / "kafka"
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "fleetbus.cli.main", "demo",
            "--vehicles", "20", "--commands", "30", "--phase-seconds", "4",
            "--base-port", str(base_port), "--kafka-home", str(kafka_home),
            "--workdir", str(workdir), "--json", str(summary),
        ],
        capture_output=True,
        text=True,
        timeout=420,
        env={"COLUMNS": "140", **_env()},
    )  # fmt: skip
    output = result.stdout[-6000:] + "\n" + result.stderr[-6000:]
    assert result.returncode == 0, output
    assert "every expectation of the scenario held" in result.stdout
    report = json.loads(summary.read_text())
    assert report["ok"] is True
    assert report["kafka"].startswith("started Kafka"), report["kafka"]
    assert report["fleet"] == {"vehicles": 20, "pqc": 18, "legacy": 2, "edge": 4}

    counts = report["counts"]
    expected_pairs = counts["routine deliveries expected (command x vehicle)"]
    # 27 single-vehicle commands, three group commands (north 10, south 10, depot 4), warm-up
    # and recovery probes: at least 27 + 24 deliveries.
    assert expected_pairs >= 51
    assert counts["executed exactly once (routine)"] == expected_pairs
    assert counts["duplicate executions"] == 0
    assert counts["executions of rejected commands"] == 0
    assert counts["failed"] == 0
    # Routine deliveries plus the two approved high-criticality commands.
    assert counts["succeeded"] == expected_pairs + 2
    assert counts["envelopes sealed to vehicles"] == counts["succeeded"]
    assert report["sent"]["group commands"] == 3
    assert report["sent"]["attacks"] == 6
    assert report["rejected_by_reason"] == EXPECTED_REJECTIONS
    assert report["dlq_by_reason"]["malformed"] == 1

    phases = report["edge_paths_by_phase"]
    assert set(phases["1 QKD link up"]) == {"qkd-etsi014+xwing"}
    assert set(phases["2 QKD link DOWN"]) == {"xwing"}
    assert phases["3 QKD link up again"].get("qkd-etsi014+xwing", 0) >= 1
    assert any(
        row["profile"] == "standard" and row["to_path"] == "xwing" for row in report["failovers"]
    )
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    failed_checks = [c for c in report["checks"] if not c["ok"]]
    assert not failed_checks

    # Nothing left: the processes the demo reported, anything mentioning its folders, the broker.
    assert set(report["processes"]) == {"worker", "kme", "fleet"}
    assert [p for p in report["processes"].values() if _alive(p)] == []
    assert list(processes_of(workdir)) == []
    assert list(processes_of(kafka_home)) == []
    assert port_is_free(base_port), "the demo's Kafka still listens"


def _env() -> dict[str, str]:
    import os

    # The demo's children must not pick up a broker or settings from the test environment.
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_")}
