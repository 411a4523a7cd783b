"""Shared fixtures: a real Kafka broker for the whole session, and unique topics per test.

Broker resolution order: ``FLEETBUS_KAFKA_BOOTSTRAP`` (an existing cluster); a broker in the
apache/kafka container through testcontainers when ``FLEETBUS_KAFKA_FIXTURE=testcontainers``
(support/containers.py); else the Kafka this project provisions from Maven, which
needs no Docker engine. The container path also runs in every suite run, in
``integration/test_containers.py``. Under CI=true a missing broker fails the run; it never
silently skips.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from fleetbus.bus.topics import ensure_topics
from fleetbus.devtools.kafka import LocalKafka, find_free_base_port

pytest_plugins = ["tests.support.fixtures_kme"]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _kafka_client_threads(before: set[int | None]) -> list[str]:
    """Threads of kafka-python clients (IO loop, producer sender) not in ``before``."""
    return sorted(
        t.name
        for t in threading.enumerate()
        if t.ident not in before
        and (t.name.startswith("kafka-io-") or t.name.endswith("-network-thread"))
    )


@pytest.fixture(scope="module", autouse=True)
def _no_leaked_kafka_clients(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module must close every Kafka client it opens (after its own fixtures' teardown).

    A client left open keeps its threads heartbeating and logging into whatever logging
    setup later tests install (CI once failed a logging unit test on a vehicle agent's
    consumer that an integration test had stopped but not closed)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 10
    leaked = _kafka_client_threads(before)
    while leaked and time.monotonic() < deadline:
        time.sleep(0.1)
        leaked = _kafka_client_threads(before)
    assert not leaked, f"{request.module.__name__} left Kafka clients open: {leaked}"


@dataclass(frozen=True)
class KafkaUnderTest:
    bootstrap: str
    origin: str  # "env" | "testcontainers" | "local <version>"
    cluster: LocalKafka | None = None


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaUnderTest]:
    existing = os.environ.get("FLEETBUS_KAFKA_BOOTSTRAP")
    if existing:
        yield KafkaUnderTest(existing, "env")
        return
    if os.environ.get("FLEETBUS_KAFKA_FIXTURE") == "testcontainers":
        from tests.support.containers import kafka_container, require_engine

        require_engine()
        with kafka_container() as bootstrap:
            yield KafkaUnderTest(bootstrap, "testcontainers")
        return
    cluster = LocalKafka(
        home=tmp_path_factory.mktemp("kafka"), base_port=find_free_base_port(2), heap_mb=768
    )
    try:
        version = cluster.up(timeout_s=180)
    except Exception as exc:
        cluster.down()
        message = f"no Kafka broker for integration tests: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield KafkaUnderTest(cluster.bootstrap, f"local Apache Kafka {version}", cluster)
    finally:
        cluster.down()


@pytest.fixture
def kafka_bootstrap(kafka: KafkaUnderTest) -> str:
    return kafka.bootstrap


@pytest.fixture
def make_topics(kafka_bootstrap: str) -> Callable[..., list[str]]:
    """Create uniquely named topics for one test: ``make_topics("in", "out", partitions=2)``."""

    def make(*names: str, partitions: int = 1, replication_factor: int = 1) -> list[str]:
        run = uuid.uuid4().hex[:10]
        full = [f"test.{run}.{name}" for name in names]
        ensure_topics(
            kafka_bootstrap, full, partitions=partitions, replication_factor=replication_factor
        )
        return full

    return make


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.nodeid.split("/"):
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stats = terminalreporter.stats

    def count(outcome: str) -> int:
        return sum(
            1
            for rep in stats.get(outcome, [])
            if getattr(rep, "when", "call") == "call" and "integration" in rep.keywords
        )

    terminalreporter.write_line(
        f"integration tests against real services: {count('passed')} passed, "
        f"{count('failed')} failed, {count('skipped')} skipped"
    )
