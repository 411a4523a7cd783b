"""A real Apache Kafka (KRaft) that the project provisions itself, for the demo and the tests.

The broker's jars are Maven artifacts (``org.apache.kafka:kafka_2.13`` and its runtime
dependencies); ``mvn`` resolves them once into a cache outside git. Each node is one JVM running
broker and controller together, listening on 127.0.0.1 only, with topic auto-creation off.

``security="mtls"`` makes every listener TLS with client certificates required (a throw-away CA
under ``home/tls``), maps principals from certificate CNs and turns on KRaft's
``StandardAuthorizer``: only the broker and ``admin`` are super users, everyone else needs ACLs
(``LocalKafka.create_acls``, ``fleet_acls``). See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetbus.bus.errors import ConfigError, KafkaUnavailableError
from fleetbus.bus.files import write_private_file
from fleetbus.devtools.kafka.acls import AclGrant, create_acls
from fleetbus.devtools.kafka.jars import KAFKA_VERSIONS, cache_root, require_tool, resolve_jars
from fleetbus.devtools.kafka.ports import port_accepts, port_is_free
from fleetbus.devtools.kafka.tls import (
    ADMIN_PRINCIPAL,
    BROKER_PRINCIPAL,
    PRINCIPAL_MAPPING_RULES,
    Security,
    ensure_ca,
    issue_pair,
)
from fleetbus.devtools.process import alive, signal_group, spawn

_LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = INFO
"""


@dataclass(frozen=True)
class LocalKafka:
    """A local KRaft cluster of ``brokers`` combined broker+controller nodes.

    Node ``i`` (0-based) listens for clients on ``base_port + 2*i`` and for the controller
    quorum on ``base_port + 2*i + 1``.
    """

    home: Path = field(default_factory=lambda: cache_root() / "run" / "kafka")
    brokers: int = 1
    base_port: int = 19092
    heap_mb: int = 512
    security: Security = "plaintext"

    def __post_init__(self) -> None:
        if self.brokers not in (1, 3):
            raise ConfigError("brokers must be 1 or 3")
        if self.security not in ("plaintext", "mtls"):
            raise ConfigError("security must be 'plaintext' or 'mtls'")

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{self.client_port(i)}" for i in range(self.brokers))

    def client_port(self, index: int) -> int:
        return self.base_port + 2 * index

    def controller_port(self, index: int) -> int:
        return self.base_port + 2 * index + 1

    def node_dir(self, index: int) -> Path:
        return self.home / f"node-{index + 1}"

    @classmethod
    def recorded(cls, home: Path) -> LocalKafka | None:
        """The cluster as ``up`` configured it in ``home`` (its node count, ports and
        security, from the nodes' server.properties), or None when none was set up there."""
        nodes = sorted(home.glob("node-*/server.properties"))
        if not nodes:
            return None
        props = dict(
            line.split("=", 1) for line in nodes[0].read_text().splitlines() if "=" in line
        )
        listener = props.get("advertised.listeners", "")
        try:
            port = int(listener.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            return None
        security: Security = "mtls" if listener.startswith("SSL://") else "plaintext"
        return cls(home=home, brokers=len(nodes), base_port=port, security=security)

    def pid_file(self, index: int) -> Path:
        return self.node_dir(index) / "kafka.pid"

    def log_file(self, index: int) -> Path:
        return self.node_dir(index) / "server.log"

    # -- mutual TLS ----------------------------------------------------------------------

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    def client_certificate(self, principal: str) -> tuple[Path, Path]:
        """``(cert, key)`` PEM files of a client certificate whose CN is ``principal``.

        Issued by the cluster's CA on first use (``security="mtls"`` only); the key is 0600.
        """
        if self.security != "mtls":
            raise ConfigError("client certificates exist only with security='mtls'")
        ensure_ca(self.tls_dir)
        return issue_pair(self.tls_dir, principal, server=False)

    def client_config(self, principal: str = ADMIN_PRINCIPAL) -> dict[str, Any]:
        """kafka-python keyword arguments to connect as ``principal`` (nothing for plaintext).

        aiokafka takes the same ``security_protocol`` plus an ``ssl_context``
        (``aiokafka.helpers.create_ssl_context(cafile=..., certfile=..., keyfile=...)``).
        """
        if self.security != "mtls":
            return {}
        cert, key = self.client_certificate(principal)
        return {
            "security_protocol": "SSL",
            "ssl_cafile": str(self.tls_dir / "ca.pem"),
            "ssl_certfile": str(cert),
            "ssl_keyfile": str(key),
        }

    def create_acls(self, grants: Iterable[AclGrant]) -> int:
        """Create ALLOW bindings as the admin principal; returns how many the broker accepted."""
        return create_acls(self.bootstrap, grants, self.client_config())

    # -- configuration -------------------------------------------------------------------

    def server_properties(self, index: int) -> str:
        replication = 3 if self.brokers == 3 else 1
        min_isr = 2 if self.brokers == 3 else 1
        voters = ",".join(
            f"{i + 1}@127.0.0.1:{self.controller_port(i)}" for i in range(self.brokers)
        )
        props = {
            "process.roles": "broker,controller",
            "node.id": str(index + 1),
            "controller.quorum.voters": voters,
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.client_port(index)},"
                f"CONTROLLER://127.0.0.1:{self.controller_port(index)}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.client_port(index)}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.node_dir(index) / "data"),
            # Topics are created explicitly with declared partitions; never by accident.
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "default.replication.factor": str(replication),
            "min.insync.replicas": str(min_isr),
            "offsets.topic.replication.factor": str(replication),
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": str(replication),
            "transaction.state.log.min.isr": str(min_isr),
            "transaction.state.log.num.partitions": "8",
            "share.coordinator.state.topic.replication.factor": str(replication),
            "share.coordinator.state.topic.min.isr": str(min_isr),
            # Test and demo clusters: consumers join at once instead of after 3 s.
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "4",
        }
        if self.security == "mtls":
            props.update(self._mtls_properties(index))
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _mtls_properties(self, index: int) -> dict[str, str]:
        # Every listener, the controller quorum included, is TLS with client certificates;
        # brokers authenticate to each other with the broker certificate (a super user).
        tls = self.tls_dir
        return {
            "listeners": (
                f"SSL://127.0.0.1:{self.client_port(index)},"
                f"CONTROLLER://127.0.0.1:{self.controller_port(index)}"
            ),
            "advertised.listeners": f"SSL://127.0.0.1:{self.client_port(index)}",
            "inter.broker.listener.name": "SSL",
            "listener.security.protocol.map": "SSL:SSL,CONTROLLER:SSL",
            "ssl.client.auth": "required",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(tls / "broker.keystore.pem"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(tls / "ca.pem"),
            "ssl.endpoint.identification.algorithm": "https",
            "ssl.principal.mapping.rules": PRINCIPAL_MAPPING_RULES,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{BROKER_PRINCIPAL};User:{ADMIN_PRINCIPAL}",
            "allow.everyone.if.no.acl.found": "false",
        }

    # -- lifecycle -----------------------------------------------------------------------

    def _pids(self) -> list[int | None]:
        pids: list[int | None] = []
        for i in range(self.brokers):
            try:
                pid = int(self.pid_file(i).read_text().strip())
            except (OSError, ValueError):
                pids.append(None)
                continue
            pids.append(pid if alive(pid) else None)
        return pids

    def status(self) -> dict[str, object]:
        pids = self._pids()
        return {
            "home": str(self.home),
            "bootstrap": self.bootstrap,
            "nodes": [
                {"node_id": i + 1, "pid": pid, "port": self.client_port(i)}
                for i, pid in enumerate(pids)
            ],
            "ready": all(p is not None for p in pids) and self.answers_metadata(timeout_s=3),
        }

    def up(self, *, timeout_s: float = 120.0, versions: Sequence[str] = KAFKA_VERSIONS) -> str:
        """Start every node that is not running and wait until the cluster answers.

        Returns the Kafka version started. Idempotent: a running cluster is left as it is.
        """
        java = require_tool("java", "install a JDK >= 17 (Debian: openjdk-17-jdk-headless)")
        version, libs = resolve_jars(versions)
        pids = self._pids()
        cluster_id_file = self.home / "cluster.id"
        self.home.mkdir(parents=True, exist_ok=True)
        if not cluster_id_file.exists():
            # KRaft cluster ids are 16 random bytes, base64url without padding.
            import base64

            # A leading "-" would be read as an option by kafka-storage's argument parser.
            new_id = "-"
            while new_id.startswith("-"):
                new_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            cluster_id_file.write_text(new_id + "\n")
        cluster_id = cluster_id_file.read_text().strip()
        if self.security == "mtls":
            ensure_ca(self.tls_dir)
            cert, key = issue_pair(self.tls_dir, BROKER_PRINCIPAL, server=True)
            # Kafka's PEM key store: the private key followed by its certificate.
            keystore = self.tls_dir / "broker.keystore.pem"
            write_private_file(keystore, key.read_bytes() + cert.read_bytes())
        classpath = f"{libs}/*"
        for i, pid in enumerate(pids):
            if pid is not None:
                continue
            for port in (self.client_port(i), self.controller_port(i)):
                if not port_is_free(port):
                    raise ConfigError(
                        f"port {port} on 127.0.0.1 is taken by another process; "
                        "stop it or choose another --base-port"
                    )
            ndir = self.node_dir(i)
            ndir.mkdir(parents=True, exist_ok=True)
            (ndir / "server.properties").write_text(self.server_properties(i))
            (ndir / "log4j2.properties").write_text(_LOG4J2.format(log_file=self.log_file(i)))
            if not (ndir / "data" / "meta.properties").exists():
                fmt = subprocess.run(  # noqa: S603
                    [
                        java,
                        "-cp",
                        classpath,
                        "kafka.tools.StorageTool",
                        "format",
                        "-t",
                        cluster_id,
                        "-c",
                        str(ndir / "server.properties"),
                        "--ignore-formatted",
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if fmt.returncode != 0:
                    raise ConfigError(f"kafka storage format failed: {fmt.stdout}{fmt.stderr}")
            with open(ndir / "stdout.log", "ab") as out:
                proc = spawn(
                    [
                        java,
                        f"-Xms{min(256, self.heap_mb)}m",
                        f"-Xmx{self.heap_mb}m",
                        "-XX:+UseG1GC",
                        "-Djava.awt.headless=true",
                        f"-Dlog4j2.configurationFile={ndir / 'log4j2.properties'}",
                        f"-Dkafka.logs.dir={ndir}",
                        "-cp",
                        classpath,
                        "kafka.Kafka",
                        str(ndir / "server.properties"),
                    ],
                    stdout=out,
                )
            self.pid_file(i).write_text(f"{proc.pid}\n")
        (self.home / "version").write_text(version + "\n")
        self.wait_ready(timeout_s=timeout_s)
        return version

    def wait_ready(self, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = self._pids()
            if any(p is None for p in pids):
                dead = [i + 1 for i, p in enumerate(pids) if p is None]
                tail = _tail(self.node_dir(dead[0] - 1) / "stdout.log") + _tail(
                    self.log_file(dead[0] - 1)
                )
                raise KafkaUnavailableError(f"kafka node(s) {dead} exited during start-up:\n{tail}")
            # Probe the sockets first: a client started too early backs off for many seconds.
            sockets_open = all(port_accepts(self.client_port(i)) for i in range(self.brokers))
            if sockets_open and self.answers_metadata(timeout_s=5):
                return
            time.sleep(0.3)
        raise KafkaUnavailableError(
            f"kafka at {self.bootstrap} did not answer within {timeout_s:.0f}s; "
            f"see {self.log_file(0)}"
        )

    def answers_metadata(self, *, timeout_s: float = 5.0) -> bool:
        """True when every node is listed as a broker in a metadata response."""
        found = brokers_in_metadata(
            self.bootstrap, timeout_s=timeout_s, client_config=self.client_config()
        )
        return found >= self.brokers

    def down(self, *, timeout_s: float = 60.0) -> None:
        """Stop every node (SIGTERM, then SIGKILL after ``timeout_s``) and remove pid files."""
        pids = [p for p in self._pids() if p is not None]
        for pid in pids:
            signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if alive(pid):
                signal_group(pid, signal.SIGKILL)
        for i in range(self.brokers):
            self.pid_file(i).unlink(missing_ok=True)

    def kill_node(self, index: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Kill one node (for fault tests); ``up()`` restarts it with its data intact."""
        pid = self._pids()[index]
        if pid is not None:
            os.killpg(pid, sig)
            while alive(pid):
                time.sleep(0.1)
            self.pid_file(index).unlink(missing_ok=True)

    def destroy(self) -> None:
        """Stop the cluster and delete its data."""
        self.down()
        shutil.rmtree(self.home, ignore_errors=True)


def brokers_in_metadata(
    bootstrap: str, *, timeout_s: float = 5.0, client_config: Mapping[str, Any] | None = None
) -> int:
    """How many brokers a metadata request to ``bootstrap`` lists; 0 when none answers."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            # Without it kafka-python waits 30 s for a first answer, whatever timeout_s says.
            bootstrap_timeout_ms=int(timeout_s * 1000),
            request_timeout_ms=int(timeout_s * 1000),
            client_id="fleetbus-probe",
            **dict(client_config or {}),
        )
    except (KafkaError, OSError, ValueError):
        return 0
    try:
        cluster = admin.describe_cluster()
        return len(cluster.get("brokers", []))
    except (KafkaError, OSError):
        return 0
    finally:
        admin.close()


@contextlib.contextmanager
def running_cluster(cluster: LocalKafka) -> Iterator[LocalKafka]:
    """Start ``cluster`` for the duration of a block, then stop it."""
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
    except OSError:
        return ""


def status_json(cluster: LocalKafka) -> str:
    return json.dumps(cluster.status(), indent=2)
