"""HealthReporter: provider health, breaker states, QKD pool per site and key expiry from a
directory, as the worker publishes them (no I/O: a stand-in status provider)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import pytest

from fleetbus.bus.directory import FleetRoot, KeyDirectory, issue_key
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import (
    Encapsulation,
    KeyProvider,
    KeyProviderError,
    PrivateKeySet,
    RecipientKeys,
)
from fleetbus.observability.metrics import registry
from fleetbus.processors.health import HealthReporter, init_stage_counters
from fleetbus.providers.keypath import BreakerState

NOW = 1_750_000_000.0
DAY = 86400.0


class PoolProvider(KeyProvider):
    """Answers ETSI 014 status like a KME, or fails like one whose link is down."""

    name = "test-health-qkd"

    def __init__(self) -> None:
        self.down = False
        self.asked: list[str] = []

    def status(self, slave_sae_id: str) -> Mapping[str, Any]:
        self.asked.append(slave_sae_id)
        if self.down:
            raise KeyProviderError("link down", reason=ReasonCode.QKD_UNAVAILABLE)
        return {"stored_key_count": 40 + len(slave_sae_id)}

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        raise NotImplementedError

    def recover(self, key_ref: bytes, key_id: str, own: PrivateKeySet, *, context: bytes) -> bytes:
        raise NotImplementedError


class SickProvider(PoolProvider):
    name = "test-health-sick"

    def healthy(self) -> bool:
        return False

    status = None  # type: ignore[assignment]  # no key pool: health comes from healthy()


class Breakers:
    def __init__(self) -> None:
        self.states: dict[str, BreakerState] = {}

    def breaker(self, provider: str) -> Any:
        return type("B", (), {"state": self.states.get(provider, BreakerState.CLOSED)})()


def sample(name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.fixture(scope="module")
def directory() -> KeyDirectory:
    root = FleetRoot.generate("ed25519")
    out = KeyDirectory(root.public)

    def issue(pid: str, kind: str, not_after: float, **extra: Any) -> None:
        issued = issue_key(
            root, principal_id=pid, kind=kind, signature_suite="ed25519",
            not_before=NOW - DAY, not_after=not_after, **extra,
        )  # fmt: skip
        out.ingest(issued.signed)

    issue("HX-1", "edge", NOW + 3 * DAY, qkd_sae_id="sae-depot-a")
    issue("HX-2", "edge", NOW + 9 * DAY, qkd_sae_id="sae-depot-b")
    issue("HV-1", "vehicle", NOW + 1 * DAY)  # rotated: version 2 is what counts
    issue("HV-1", "vehicle", NOW + 40 * DAY, version=2)
    issue("HV-2", "vehicle", NOW + 20 * DAY)
    return out


def test_report_publishes_health_pool_breakers_and_expiry(directory: KeyDirectory) -> None:
    pool, sick = PoolProvider(), SickProvider()
    breakers = Breakers()
    breakers.states[pool.name] = BreakerState.OPEN
    reporter = HealthReporter(
        {pool.name: pool, sick.name: sick}, breakers, directory, clock=lambda: NOW
    )
    assert reporter.qkd_sites() == ["sae-depot-a", "sae-depot-b"]

    reporter.report()
    assert sorted(pool.asked) == ["sae-depot-a", "sae-depot-b"]
    assert sample("fleetbus_provider_up", provider=pool.name) == 1
    assert sample("fleetbus_provider_up", provider=sick.name) == 0
    assert sample("fleetbus_provider_circuit_state", provider=pool.name) == 2
    assert sample("fleetbus_provider_circuit_state", provider=sick.name) == 0
    assert sample("fleetbus_qkd_stored_keys", slave_sae="sae-depot-a") == 40 + len("sae-depot-a")
    assert sample("fleetbus_key_expiry_seconds", kind="edge") == 3 * DAY
    assert sample("fleetbus_key_expiry_seconds", kind="vehicle") == 20 * DAY

    pool.down = True
    reporter.report()
    assert sample("fleetbus_provider_up", provider=pool.name) == 0
    # The last pool level the KME reported stays visible next to provider_up == 0.
    assert sample("fleetbus_qkd_stored_keys", slave_sae="sae-depot-a") == 40 + len("sae-depot-a")


def test_run_reports_until_stopped(directory: KeyDirectory) -> None:
    three_rounds = threading.Event()

    class CountingPool(PoolProvider):
        def status(self, slave_sae_id: str) -> Mapping[str, Any]:
            if len(self.asked) >= 5:  # two sites per round
                three_rounds.set()
            return super().status(slave_sae_id)

    pool = CountingPool()
    reporter = HealthReporter({pool.name: pool}, Breakers(), directory, interval_s=0.01)

    async def main() -> None:
        task = asyncio.create_task(reporter.run())
        assert await asyncio.to_thread(three_rounds.wait, 5)
        await reporter.stop()
        await asyncio.wait_for(task, 2)

    asyncio.run(main())
    assert len(pool.asked) >= 6


def test_stage_counters_exist_at_zero() -> None:
    init_stage_counters(["test-health-stage"])
    for name in (
        "fleetbus_kafka_produce_retries_total",
        "fleetbus_kafka_produce_errors_total",
        "fleetbus_internal_errors_total",  # else increase() misses the first one: no alert
    ):
        assert sample(name, stage="test-health-stage") == 0
