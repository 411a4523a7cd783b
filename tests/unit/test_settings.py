"""Settings come from FLEETBUS_* variables and are validated with clear errors."""

from __future__ import annotations

import pydantic
import pytest

from fleetbus.bus.settings import FleetbusSettings
from fleetbus.processors.app import faust_config


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETBUS_KAFKA_BOOTSTRAP", "127.0.0.1:1,127.0.0.1:2")
    monkeypatch.setenv("FLEETBUS_TOPICS__PREFIX", "acme.")
    settings = FleetbusSettings()
    assert settings.topics.full(settings.topics.commands_requested) == "acme.commands.requested"
    config = faust_config(settings)
    assert config["broker"] == ["kafka://127.0.0.1:1", "kafka://127.0.0.1:2"]
    assert config["processing_guarantee"] == "exactly_once"


def test_invalid_guarantee_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETBUS_PROCESSING_GUARANTEE", "at_most_once")
    with pytest.raises(pydantic.ValidationError, match="processing_guarantee"):
        FleetbusSettings()


def test_web_port_zero_disables_the_web_server() -> None:
    assert faust_config(FleetbusSettings(web_port=0))["web_enabled"] is False
