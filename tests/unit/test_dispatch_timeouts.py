"""``CommandPublisher`` and the status reader give up within their ``timeout_s``.

kafka-python bounds each phase of a client with its own setting, and the first phase — waiting
for a bootstrap server to answer, ``bootstrap_timeout_ms`` — defaults to 30 s. These tests record
the configuration each client is built with (no broker needed) and check that every setting that
bounds a blocking wait is within the caller's ``timeout_s``, library defaults included.
"""

from __future__ import annotations

from typing import Any

import kafka
import pytest

from fleetbus.bus.errors import KafkaUnavailableError
from fleetbus.bus.registry import load_signature_suite
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.sdk.dispatch import CommandPublisher, read_status_events

#: Settings that bound how long a constructor or a call may block.
BLOCKING_WAITS = ("bootstrap_timeout_ms", "max_block_ms")


class Refused(kafka.errors.KafkaTimeoutError):
    pass


def recorder(cls: Any, seen: list[dict[str, Any]]) -> Any:
    def build(**config: Any) -> Any:
        # What the real client would use: the library's default where nothing was passed.
        seen.append({**cls.DEFAULT_CONFIG, **config})
        raise Refused("no broker in a unit test")

    return build


def test_publisher_bounds_every_wait_by_timeout_s(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(kafka, "KafkaProducer", recorder(kafka.KafkaProducer, seen))
    suite = load_signature_suite("ed25519")
    private, _ = suite.generate()
    with pytest.raises(KafkaUnavailableError):
        CommandPublisher(
            FleetbusSettings(kafka_bootstrap="127.0.0.1:9"),
            principal_id="dispatch-1",
            signer=suite.signer(private, "k1"),
            timeout_s=2,
        )
    (config,) = seen
    assert {name: config[name] for name in BLOCKING_WAITS} == dict.fromkeys(BLOCKING_WAITS, 2000)


def test_status_reader_bootstraps_within_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(kafka, "KafkaConsumer", recorder(kafka.KafkaConsumer, seen))
    events = read_status_events(
        FleetbusSettings(kafka_bootstrap="127.0.0.1:9"), "c-1", since_ms=0, timeout_s=3
    )
    with pytest.raises(KafkaUnavailableError):
        next(events)
    (config,) = seen
    assert config["bootstrap_timeout_ms"] == 3000
