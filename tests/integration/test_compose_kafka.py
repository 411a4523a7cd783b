"""docker-compose's Kafka security, run for real: no Docker engine here, so the broker of
``docker-compose.yml`` is started from the jars with the server properties its ``KAFKA_*``
variables render to (the apache/kafka image's rule), the PKI its ``kafka-pki`` service writes
(``fleetbus dev kafka certs``) and the ACLs its ``kafka-acls`` service creates (``fleetbus dev
kafka acls``, same arguments, same environment). Only host names, ports and the PKI folder are
mapped onto this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, TopicAuthorizationFailedError
from unit.test_deploy_files import _environment, fleetbus_command_lines, kafka_properties, services

from fleetbus.bus.dev.kafka import LocalKafka, find_free_base_port
from fleetbus.bus.topics import ensure_topics

COMPOSE_PKI = "/kafka-pki"


@dataclass(frozen=True)
class ComposeKafka(LocalKafka):
    """``LocalKafka`` whose properties are overridden by the compose file's."""

    overrides: dict[str, str] = field(default_factory=dict)

    def server_properties(self, index: int) -> str:
        props = dict(
            line.split("=", 1) for line in super().server_properties(index).splitlines() if line
        )
        props.update(self.overrides)
        return "".join(f"{k}={v}\n" for k, v in props.items())


def localise(value: str, cluster: LocalKafka, external_port: int) -> str:
    """Compose host names and ports → this machine; the PKI volume → the cluster's tls dir."""
    value = value.replace(COMPOSE_PKI, str(cluster.tls_dir))
    for compose, local in [
        ("kafka:9092", f"localhost:{cluster.client_port(0)}"),
        ("kafka:9093", f"localhost:{cluster.controller_port(0)}"),
        ("localhost:29092", f"localhost:{external_port}"),
        ("//:9092", f"//127.0.0.1:{cluster.client_port(0)}"),
        ("//:9093", f"//127.0.0.1:{cluster.controller_port(0)}"),
        ("//:29092", f"//127.0.0.1:{external_port}"),
    ]:
        value = value.replace(compose, local)
    return value


def run_cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetbus.bus.cli", *argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def compose_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ComposeKafka, int]]:
    home = Path(tmp_path_factory.mktemp("compose-kafka"))
    base = find_free_base_port(3, start=27092)
    probe = LocalKafka(home=home, base_port=base, security="mtls")
    # The kafka-pki service's command, into the folder the broker reads.
    (pki,) = [argv for name, argv in fleetbus_command_lines() if name == "kafka-pki"]
    pki = [localise(a, probe, base + 2) for a in pki]
    done = run_cli(pki, {})
    assert done.returncode == 0, done.stderr
    overrides = {
        k: localise(v, probe, base + 2)
        for k, v in kafka_properties(_environment(services()["kafka"])).items()
    }
    cluster = ComposeKafka(
        home=home, base_port=base, heap_mb=384, security="mtls", overrides=overrides
    )
    try:
        cluster.up(timeout_s=180)
        yield cluster, base + 2
    finally:
        cluster.down()


def producer(cluster: LocalKafka, config: dict[str, str], port: int | None = None) -> KafkaProducer:
    bootstrap = f"127.0.0.1:{port}" if port else cluster.bootstrap
    return KafkaProducer(
        bootstrap_servers=bootstrap, max_block_ms=5000, api_version=(3, 9), **config
    )


def send(cluster: LocalKafka, principal: str, topic: str, port: int | None = None) -> None:
    p = producer(cluster, cluster.client_config(principal), port)
    try:
        p.send(topic, b"v").get(timeout=15)
    finally:
        p.close(timeout=5)


def test_compose_broker_refuses_clients_without_a_certificate(
    compose_kafka: tuple[ComposeKafka, int],
) -> None:
    cluster, _ = compose_kafka
    ca = cluster.client_config()["ssl_cafile"]
    for config in ({"security_protocol": "SSL", "ssl_cafile": ca}, {}):  # no certificate; no TLS
        p = producer(cluster, config)
        try:
            with pytest.raises((KafkaTimeoutError, KafkaConnectionError)):
                p.send("fleet.commands.requested", b"v").get(timeout=10)
        finally:
            p.close(timeout=1)


def test_compose_acls_confine_each_principal(compose_kafka: tuple[ComposeKafka, int]) -> None:
    cluster, external = compose_kafka
    (argv,) = [argv for name, argv in fleetbus_command_lines() if name == "kafka-acls"]
    env = {
        k: localise(v, cluster, external) for k, v in _environment(services()["kafka-acls"]).items()
    }
    for _ in range(2):  # the one-shot runs again on every `docker compose up`
        done = run_cli(argv, env)
        assert done.returncode == 0, done.stderr
        assert "ACL bindings in place" in done.stderr

    # The worker creates its topics (CREATE on the prefix) like `fleetbus worker` does.
    worker = cluster.client_config("fleetbus-worker")
    topics = ["fleet.commands.requested", "fleet.commands.outbound", "fleet.commands.responses"]
    ensure_topics(cluster.bootstrap, topics, partitions=1, client_config=worker)
    send(cluster, "fleetbus-worker", "fleet.commands.outbound")
    # The dispatch console publishes commands, also through the host's EXTERNAL listener...
    send(cluster, "dispatch-console", "fleet.commands.requested")
    send(cluster, "dispatch-console", "fleet.commands.requested", port=external)
    # ...and nothing else; vehicles answer but cannot command.
    with pytest.raises(TopicAuthorizationFailedError):
        send(cluster, "dispatch-console", "fleet.commands.outbound")
    send(cluster, "vehicle-gateway", "fleet.commands.responses")
    with pytest.raises(TopicAuthorizationFailedError):
        send(cluster, "vehicle-gateway", "fleet.commands.requested")
