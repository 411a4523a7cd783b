"""The worker's faust host (``processors.app.create_app``): what it registers, and the settings
that reach only the host."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from fleetbus.bus.settings import FleetbusSettings
from fleetbus.processors.app import Pipeline, create_app, faust_config


def test_at_least_once_is_refused_since_no_stage_could_honour_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It reached only the smoke forwarder: the stages commit every batch in a transaction.
    monkeypatch.setenv("FLEETBUS_PROCESSING_GUARANTEE", "at_least_once")
    with pytest.raises(pydantic.ValidationError, match="processing_guarantee"):
        FleetbusSettings()
    monkeypatch.delenv("FLEETBUS_PROCESSING_GUARANTEE")
    assert faust_config(FleetbusSettings())["processing_guarantee"] == "exactly_once"


class Runner:
    def __init__(self, stage: str) -> None:
        self.stage = stage

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


def test_the_host_runs_the_smoke_forwarder_and_one_service_per_stage_and_service() -> None:
    built: list[Any] = []

    def factory(settings: FleetbusSettings) -> Pipeline:
        built.append(settings)
        return Pipeline([Runner("authorize"), Runner("seal")], services=[Runner("keys")])

    settings = FleetbusSettings(pipeline="on", app_id="host-test")
    app = create_app(settings, pipeline_factory=factory)
    assert built == [settings]
    agents = sorted(name.rsplit(".", 1)[-1] for name in app.agents)
    assert agents == ["forward", "observe_forwarded"]
    assert len(app._extra_services) == 3  # type: ignore[attr-defined]


def test_without_the_pipeline_the_host_runs_only_the_smoke_forwarder() -> None:
    app = create_app(FleetbusSettings(pipeline="off", app_id="host-test-off"))
    assert len(app.agents) == 2
    assert not app._extra_services  # type: ignore[attr-defined]
