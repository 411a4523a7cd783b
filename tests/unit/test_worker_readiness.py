"""The worker's liveness and readiness decisions (``processors/probes.py``) and the file/line of
a Cedar policy that does not parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetbus.bus.errors import ConfigError
from fleetbus.processors.eos import StageHealth
from fleetbus.processors.policy import load_policy_text
from fleetbus.processors.probes import WorkerProbes, WorkerStateCollector


class FakeStage:
    def __init__(self, **fields: object) -> None:
        base: dict[str, object] = {
            "stage": "seal",
            "running": True,
            "in_group": True,
            "assigned": [0, 1],
            "producers": [0, 1],
            "since_poll_s": 0.2,
        }
        base.update(fields)
        self.snapshot = StageHealth(**base)  # type: ignore[arg-type]

    def health(self) -> StageHealth:
        return self.snapshot


def test_ready_when_every_stage_is_in_its_group_with_producers_for_its_partitions() -> None:
    ok, body = WorkerProbes(stages=[FakeStage(stage="authorize"), FakeStage()]).ready()
    assert ok
    assert [s["stage"] for s in body["stages"]] == ["authorize", "seal"]


@pytest.mark.parametrize(
    "fields",
    [
        {"running": False},  # consumer not started (Kafka not reached yet)
        {"in_group": False},  # no assignment yet
        {"producers": [0]},  # partition 1's transactional producer not up
    ],
)
def test_not_ready_names_the_waiting_stage(fields: dict[str, object]) -> None:
    ok, body = WorkerProbes(stages=[FakeStage(), FakeStage(stage="track", **fields)]).ready()
    assert not ok
    assert body["reason"].endswith(": track")


def test_an_empty_assignment_is_a_ready_standby() -> None:
    ok, _ = WorkerProbes(stages=[FakeStage(assigned=[], producers=[])]).ready()
    assert ok


def test_a_stated_reason_is_not_ready_whatever_the_stages() -> None:
    ok, body = WorkerProbes(not_ready_reason="pipeline=auto found no key directory").ready()
    assert not ok
    assert body == {"ready": False, "reason": "pipeline=auto found no key directory"}


def test_liveness_fails_only_on_a_running_stage_that_stopped_coming_round() -> None:
    probes = WorkerProbes(
        stages=[FakeStage(since_poll_s=61.0), FakeStage(stage="track", running=False)],
        stall_after_s=60.0,
    )
    assert probes.live() == (False, {"live": False, "stalled_stages": ["seal"]})
    assert WorkerProbes(stages=[FakeStage(running=False, since_poll_s=600.0)]).live()[0]


def test_policy_error_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.cedar").write_text('@id("ok")\npermit (principal, action, resource);\n')
    (tmp_path / "b.cedar").write_text(
        '// the second policy is broken\n@id("ok2")\npermit (principal, action, resource);\n\n'
        '@id("broken")\npermit (principal, action, resource)\nwhen { context.hour >= };\n'
    )
    with pytest.raises(ConfigError) as info:
        load_policy_text(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'b.cedar'}:7: Cedar policy does not parse: unexpected token `}}`"
    )


def test_readiness_is_exported_as_metrics_at_scrape_time() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    stage = FakeStage(producers=[0])
    probes = WorkerProbes(stages=[stage, FakeStage(stage="track", assigned=[2], producers=[2])])
    registry = CollectorRegistry()
    registry.register(WorkerStateCollector(probes))
    text = generate_latest(registry).decode()
    assert "fleetbus_worker_ready 0.0" in text
    assert 'fleetbus_stage_assigned_partitions{stage="seal"} 2.0' in text
    assert 'fleetbus_stage_assigned_partitions{stage="track"} 1.0' in text
    stage.snapshot = StageHealth("seal", True, True, [0, 1], [0, 1], 0.1)
    assert "fleetbus_worker_ready 1.0" in generate_latest(registry).decode()
