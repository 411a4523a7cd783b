"""docker-compose.yml, run for real, twice over.

``docker compose up`` of the real file on a Docker engine (scripts/container-engine.sh), with
``compose.hostnet.yml`` mapping only images, addresses and ports onto the host network: the
mTLS broker, the KME pair, the worker and the simulated fleet come up healthy, each holding
only its own keys; a command sent from the host with ``fleetbus dispatch send`` is executed
and answered; ``down -v`` leaves nothing behind.

And without an engine in the loop, the broker's security on the bare jars: the server
properties its ``KAFKA_*`` variables render to (the apache/kafka image's rule), the PKI its
``kafka-pki`` service writes (``fleetbus dev kafka certs``) and the ACLs its ``kafka-acls``
service creates (``fleetbus dev kafka acls``, same arguments, same environment): clients
without a certificate get nothing, and each principal is refused outside its grants."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from kafka import KafkaProducer
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, TopicAuthorizationFailedError

from fleetbus.bus.directory import FleetRoot, KeyDirectory
from fleetbus.bus.errors import KafkaUnavailableError
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.bus.topics import ensure_topics
from fleetbus.devtools.kafka import LocalKafka, find_free_base_port, free_port
from fleetbus.sdk.keytopic import KeyTopicFollower, KeyTopicReader
from tests.support.containers import (
    REPO,
    compose_cli,
    docker,
    process_uid,
    require_engine,
    wait_for,
)
from tests.support.deploy import (
    environment,
    fleetbus_command_lines,
    kafka_properties,
    services,
)

COMPOSE_PKI = "/kafka-pki"
HOSTNET = Path(__file__).with_name("compose.hostnet.yml")


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


def run_cli(
    argv: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetbus.cli.main", *argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
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
        for k, v in kafka_properties(environment(services()["kafka"])).items()
        if k != "log.dirs"  # the kafka-data volume's mount point; the node's own folder here
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


def as_settings(cluster: LocalKafka, principal: str) -> FleetbusSettings:
    """FLEETBUS_* settings of a client connecting as ``principal`` (compose's environment)."""
    config = cluster.client_config(principal)
    return FleetbusSettings(
        kafka_bootstrap=cluster.bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=config["ssl_cafile"],
        kafka_ssl_certfile=config["ssl_certfile"],
        kafka_ssl_keyfile=config["ssl_keyfile"],
    )


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
        k: localise(v, cluster, external) for k, v in environment(services()["kafka-acls"]).items()
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
    # The fleet follows the key topic (`fleet simulate`'s default) as vehicle-gateway: its
    # catch-up, which runs before its first command, must be allowed; writing it must not.
    ensure_topics(cluster.bootstrap, ["fleet.keys"], partitions=1, client_config=worker)
    send(cluster, "fleetbus-worker", "fleet.keys")  # one item to read (refused: not a record)
    follower = KeyTopicFollower(KeyDirectory(FleetRoot.generate("ed25519").public), role="vehicle")
    reader = KeyTopicReader(as_settings(cluster, "vehicle-gateway"), follower)
    try:
        reader.start(timeout_s=30)
        assert not follower.catching_up
        assert reader.positions() == {0: 1}
    finally:
        reader.close()
    with pytest.raises(TopicAuthorizationFailedError):
        send(cluster, "vehicle-gateway", "fleet.keys")
    # The grant is what lets it read: the dispatch console, without one, never catches up.
    refused = KeyTopicReader(as_settings(cluster, "dispatch-console"), follower)
    with pytest.raises((KafkaUnavailableError, TopicAuthorizationFailedError)):
        refused.start(timeout_s=5)


# --- docker compose up, for real ------------------------------------------------------------

#: The services of the command path: the mTLS broker and its one-shots, the KME pair, the
#: worker and the simulated fleet. (Prometheus, Grafana, the collector and Jaeger are images
#: this machine cannot pull or build; their settings are checked in test_deploy_files.py.)
COMMAND_PATH = ["kafka-pki", "kafka", "init", "kafka-acls", "kme", "worker", "fleet"]
ONE_SHOTS = {"kafka-pki", "init", "kafka-acls"}
HEALTHCHECKED = {"kafka", "kme", "worker"}
PORT_VARIABLES = [
    "FB_KAFKA_INTERNAL",
    "FB_KAFKA_CONTROLLER",
    "FB_KAFKA_EXTERNAL",
    "FB_KME_A",
    "FB_KME_B",
    "FB_KME_ADMIN",
    "FB_KME_METRICS",
    "FB_WORKER_METRICS",
    "FB_WORKER_WEB",
]


@dataclass
class ComposeStack:
    cli: list[str]
    project: str
    file: Path
    env: dict[str, str]
    ports: dict[str, int]

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        done = subprocess.run(
            [*self.cli, "--project-name", self.project, "--file", str(self.file), *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"compose {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}\n"
                f"{self.logs()}"
            )
        return done.stdout

    def container(self, service: str) -> str:
        (cid,) = self.run("ps", "--all", "--quiet", service).split()
        return cid

    def state(self, service: str) -> str:
        """running / exited <code> / healthy / unhealthy / starting."""
        fmt = "{{.State.Status}}|{{.State.ExitCode}}|"
        fmt += "{{if .State.Health}}{{.State.Health.Status}}{{end}}"
        status, code, health = docker("inspect", "-f", fmt, self.container(service)).split("|")
        if status == "exited":
            return f"exited {code}"
        return health.strip() or status

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "40", check=False, timeout=120)

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        containers = docker("ps", "--all", "--quiet", "--filter", label).split()
        volumes = docker("volume", "ls", "--quiet", "--filter", label).split()
        networks = docker("network", "ls", "--quiet", "--filter", label).split()
        return containers + volumes + networks


def render_for_host_network(cli: list[str], env: dict[str, str], out: Path) -> Path:
    """docker-compose.yml with the host-network override, as compose merges them; then the
    published ports dropped, which mean nothing on the host network (and compose v1 refuses
    them there). Everything else is the real file's."""
    rendered = subprocess.run(
        [*cli, "--file", str(REPO / "docker-compose.yml"), "--file", str(HOSTNET), "config"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=REPO,
    ).stdout
    doc = yaml.safe_load(rendered)
    for service in doc["services"].values():
        if service.get("network_mode") == "host":
            service.pop("ports", None)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def compose_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    require_engine()
    cli = compose_cli()
    ports: dict[str, int] = {}
    for name in PORT_VARIABLES:
        port = free_port()
        while port in ports.values():
            port = free_port()
        ports[name] = port
    env = {name: str(port) for name, port in ports.items()}
    home = Path(tmp_path_factory.mktemp("compose"))
    stack = ComposeStack(
        cli=cli,
        project=f"fbtest{uuid.uuid4().hex[:8]}",
        file=render_for_host_network(cli, env, home / "compose.yml"),
        env=env,
        ports=ports,
    )
    try:
        # `up --build` builds the image through compose's own build path (cached layers).
        stack.run("up", "--detach", "--build", *COMMAND_PATH, timeout=900)
        yield stack
    finally:
        stack.run("down", "--volumes", "--remove-orphans", check=False, timeout=300)


def _expected(stack: ComposeStack, service: str) -> str:
    if service in ONE_SHOTS:
        return "exited 0"
    return "healthy" if service in HEALTHCHECKED else "running"


def _key_files(stack: ComposeStack, service: str, folder: str) -> set[str]:
    listing = docker("exec", stack.container(service), "ls", "-a", folder).split()
    return {name for name in listing if name not in {".", ".."}}


@pytest.mark.timeout(1200)
def test_compose_up_executes_a_command_sent_from_the_host(
    compose_stack: ComposeStack, tmp_path: Path
) -> None:
    stack = compose_stack

    def states() -> dict[str, str]:
        return {service: stack.state(service) for service in COMMAND_PATH}

    def all_up() -> bool:
        now = states()
        failed = {s: v for s, v in now.items() if v in {"unhealthy"} or v.startswith("exited ")}
        failed = {s: v for s, v in failed.items() if v != _expected(stack, s)}
        assert not failed, f"{failed}\n{stack.logs()}"
        return all(now[s] == _expected(stack, s) for s in COMMAND_PATH)

    wait_for("the compose services", all_up, 600, log=lambda: f"{states()}\n{stack.logs()}")

    # Each long-running service runs as the image's user, and holds only what it needs.
    for service in ("kme", "worker", "fleet"):
        assert process_uid(stack.container(service)) == 10001
    worker_keys = _key_files(stack, "worker", "/keys")
    assert {"root.pub", "directory.cbor", "bus-sealer.key"} <= worker_keys
    assert {n for n in worker_keys if n.endswith(".key")} == {"bus-sealer.key"}
    assert _key_files(stack, "worker", "/pki") == {
        "ca.pem",
        "sae-dispatch-hub.pem",
        "sae-dispatch-hub.key",
    }
    fleet_keys = {n for n in _key_files(stack, "fleet", "/keys") if n.endswith(".key")}
    assert fleet_keys == {"V-0001.key", "V-0002.key", "V-0003.key"}

    # The dispatcher's credentials, out of the volumes as docs/deployment.md says.
    creds = tmp_path / "dispatch"
    creds.mkdir()
    for name in ("root.pub", "directory.cbor", "dispatch-1.key"):
        docker("cp", f"{stack.container('init')}:/keys/{name}", str(creds / name))
    for name in ("ca.pem", "dispatch-console.pem", "dispatch-console.key"):
        docker("cp", f"{stack.container('kafka-pki')}:{COMPOSE_PKI}/{name}", str(creds / name))
    env = {
        "FLEETBUS_KAFKA_BOOTSTRAP": f"localhost:{stack.ports['FB_KAFKA_EXTERNAL']}",
        "FLEETBUS_KAFKA_SECURITY_PROTOCOL": "SSL",
        "FLEETBUS_KAFKA_SSL_CAFILE": str(creds / "ca.pem"),
        "FLEETBUS_KAFKA_SSL_CERTFILE": str(creds / "dispatch-console.pem"),
        "FLEETBUS_KAFKA_SSL_KEYFILE": str(creds / "dispatch-console.key"),
    }
    # fleetbus dispatch send, from the host through the EXTERNAL mTLS listener.
    sent = run_cli(
        [
            "dispatch", "send", "--keys-dir", str(creds), "--principal", "dispatch-1",
            "--action", "lock_doors", "--vehicle", "V-0001", "--ttl", "120", "--timeout", "300",
        ],
        env,
        timeout=420,
    )  # fmt: skip
    assert sent.returncode == 0, f"{sent.stdout}{sent.stderr}\n{stack.logs()}"
    assert sent.stdout.strip().splitlines()[-1].startswith("succeeded"), sent.stdout

    # The simulated vehicle executed it (its summary line, every 5 s).
    def executed() -> bool:
        out = docker("logs", stack.container("fleet"), check=False)
        return "executed=1 " in out

    wait_for("the fleet's summary", executed, 60, log=stack.logs)


@pytest.mark.timeout(600)
def test_compose_down_leaves_nothing_behind(compose_stack: ComposeStack) -> None:
    assert compose_stack.leftovers(), "the stack should be up before it is taken down"
    compose_stack.run("down", "--volumes", "--remove-orphans", timeout=300)
    assert compose_stack.leftovers() == []
