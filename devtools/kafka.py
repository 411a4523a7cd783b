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
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from fleetbus.bus.errors import ConfigError, KafkaUnavailableError
from fleetbus.bus.files import write_private_file
from fleetbus.devtools.pki import cn_name, issue_cert, key_pem, make_ca, san_list

#: Tried in order until one resolves from Maven Central. 4.1.1 is the one we run and test on.
KAFKA_VERSIONS: tuple[str, ...] = ("4.1.1", "4.1.0", "4.0.1")
SCALA_VERSION = "2.13"
#: slf4j 1.x binding so the broker's own log lines reach our log file.
LOG4J_SLF4J_BINDING = ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.24.3")

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.fleetbus</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>{log_group}</groupId>
      <artifactId>{log_artifact}</artifactId>
      <version>{log_version}</version>
    </dependency>
  </dependencies>
</project>
"""

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


#: Principal (certificate CN) of the brokers themselves in ``security="mtls"`` mode.
BROKER_PRINCIPAL: Final = "broker"
#: Principal of the operator / test harness: a super user like the brokers.
ADMIN_PRINCIPAL: Final = "admin"
#: ``User:<CN>`` from a subject DN ``CN=<CN>`` (our certificates carry only a CN).
PRINCIPAL_MAPPING_RULES: Final = "RULE:^CN=([^,]+)$/$1/,DEFAULT"
Security = Literal["plaintext", "mtls"]


def cache_root() -> Path:
    """Where jars and default cluster state live: ``$FLEETBUS_CACHE`` or ``~/.cache/fleetbus``."""
    env = os.environ.get("FLEETBUS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fleetbus"


def _require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"'{name}' is not on PATH; {hint}")
    return path


def resolve_jars(
    versions: Sequence[str] = KAFKA_VERSIONS, *, quiet: bool = True
) -> tuple[str, Path]:
    """Return ``(version, libs_dir)`` for the first Kafka version whose jars resolve.

    A version already in the cache is used without touching the network.
    """
    root = cache_root() / "kafka"
    for version in versions:
        libs = root / version / "libs"
        if (libs / ".complete").exists():
            return version, libs
    mvn = _require_tool("mvn", "install Maven (Debian: apt-get install maven)")
    failures: list[str] = []
    for version in versions:
        vdir = root / version
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / "pom.xml").write_text(
            _POM.format(
                scala=SCALA_VERSION,
                version=version,
                log_group=LOG4J_SLF4J_BINDING[0],
                log_artifact=LOG4J_SLF4J_BINDING[1],
                log_version=LOG4J_SLF4J_BINDING[2],
            )
        )
        staging = Path(tempfile.mkdtemp(prefix="libs-", dir=vdir))
        cmd = [
            mvn,
            "-B",
            *(["-q"] if quiet else []),
            "-f",
            str(vdir / "pom.xml"),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
        if proc.returncode != 0 or not any(staging.glob(f"kafka_{SCALA_VERSION}-*.jar")):
            shutil.rmtree(staging, ignore_errors=True)
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            failures.append(f"{version}: {' | '.join(tail)}")
            continue
        libs = vdir / "libs"
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        (libs / ".complete").write_text(version + "\n")
        return version, libs
    raise ConfigError("no Kafka version resolved from Maven: " + "; ".join(failures))


EPHEMERAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ephemeral_ports() -> range:
    """The kernel's range of ephemeral (client source) ports."""
    try:
        low, high = (int(v) for v in EPHEMERAL_PORT_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port(low: int = 10000, high: int = 19000) -> int:
    """A TCP port free on 127.0.0.1 now, below the ephemeral range (see ``find_free_base_port``)
    and below the ports this module's clusters use."""
    for _ in range(200):
        port = low + secrets.randbelow(high - low)
        if port_is_free(port):
            return port
    raise ConfigError(f"no free port between {low} and {high}")


def find_free_base_port(count: int, start: int = 29092, stop: int = 32768) -> int:
    """A base port such that ``count`` consecutive ports from it are free on 127.0.0.1, outside
    the ephemeral range: a port that is free now is bound only seconds later, when the broker
    has started, and meanwhile any client connection could take an ephemeral one as its source
    port (a three-broker start in CI failed with "Address already in use" that way)."""
    ephemeral = ephemeral_ports()
    for base in range(start, stop, 10):
        if base <= ephemeral[-1] and ephemeral[0] < base + count:
            continue
        if all(port_is_free(base + i) for i in range(count)):
            return base
    raise ConfigError(
        f"no {count} consecutive free ports between {start} and {stop} outside the ephemeral "
        f"range {ephemeral[0]}-{ephemeral[-1]}"
    )


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
        _ensure_ca(self.tls_dir)
        return _issue_pair(self.tls_dir, principal, server=False)

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
            pids.append(pid if _alive(pid) else None)
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
        java = _require_tool("java", "install a JDK >= 17 (Debian: openjdk-17-jdk-headless)")
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
            _ensure_ca(self.tls_dir)
            cert, key = _issue_pair(self.tls_dir, BROKER_PRINCIPAL, server=True)
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
                proc = subprocess.Popen(  # noqa: S603
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
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
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
            sockets_open = all(_port_accepts(self.client_port(i)) for i in range(self.brokers))
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
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        for i in range(self.brokers):
            self.pid_file(i).unlink(missing_ok=True)

    def kill_node(self, index: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Kill one node (for fault tests); ``up()`` restarts it with its data intact."""
        pid = self._pids()[index]
        if pid is not None:
            os.killpg(pid, sig)
            while _alive(pid):
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


# -- ACLs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AclGrant:
    """One ALLOW binding: ``principal`` (a certificate CN) may ``operation`` on a resource.

    Names are kafka-python enum member names: operation ``READ``/``WRITE``/``DESCRIBE``/...,
    resource_type ``TOPIC``/``GROUP``/``CLUSTER``/``TRANSACTIONAL_ID``, pattern
    ``LITERAL``/``PREFIXED``.
    """

    principal: str
    operation: str
    resource_type: str
    name: str
    pattern: str = "LITERAL"


def fleet_acls(
    topics: Any,
    *,
    app_id: str,
    worker: str,
    dispatchers: Sequence[str] = (),
    vehicles: Sequence[str] = (),
    status_readers: Sequence[str] = (),
    key_publishers: Sequence[str] = (),
) -> list[AclGrant]:
    """Least-privilege bindings for a fleet's principals (``topics`` is a ``TopicNames``).

    - dispatchers: WRITE and DESCRIBE ``commands.requested`` and ``commands.approvals``; nothing
      else.
    - status_readers: READ and DESCRIBE ``commands.status`` (no consumer group: the SDK assigns
      partitions). A dispatch console that waits for outcomes (``CommandHandle.wait``) is in
      both lists; a fire-and-forget dispatcher only in the first. Status events carry the
      command ids, states, reason codes and vehicle ids of every dispatcher's commands (no
      payloads), so READ on them is a grant of its own.
    - vehicles (or a vehicle gateway / simulator principal): READ ``commands.outbound`` with a
      consumer group named ``{app_id}.vehicles.*``; WRITE ``commands.responses`` and
      ``telemetry.raw``; READ the key topic (no group: every agent reads all of it).
    - key_publishers (whoever runs ``fleetbus keys ... --bootstrap``): WRITE and DESCRIBE the
      key topic, nothing else — the only writer besides the workers' prefix grant.
    - the worker: every topic under the prefix (it reads, writes and creates its state topics),
      its groups and transactional ids (prefix ``{app_id}``), idempotent writes.
    """

    def full(name: str) -> str:
        return str(topics.full(name))

    grants: list[AclGrant] = []
    for who in dispatchers:
        for name in (topics.commands_requested, topics.commands_approvals):
            grants += [
                AclGrant(who, "WRITE", "TOPIC", full(name)),
                AclGrant(who, "DESCRIBE", "TOPIC", full(name)),
            ]
    for who in status_readers:
        grants += [
            AclGrant(who, "READ", "TOPIC", full(topics.commands_status)),
            AclGrant(who, "DESCRIBE", "TOPIC", full(topics.commands_status)),
        ]
    for who in vehicles:
        grants += [
            AclGrant(who, "READ", "TOPIC", full(topics.commands_outbound)),
            AclGrant(who, "DESCRIBE", "TOPIC", full(topics.commands_outbound)),
            AclGrant(who, "READ", "GROUP", f"{app_id}.vehicles.", "PREFIXED"),
        ]
        for name in (topics.commands_responses, topics.telemetry_raw):
            grants += [
                AclGrant(who, "WRITE", "TOPIC", full(name)),
                AclGrant(who, "DESCRIBE", "TOPIC", full(name)),
            ]
        grants += [
            AclGrant(who, "READ", "TOPIC", full(topics.keys)),
            AclGrant(who, "DESCRIBE", "TOPIC", full(topics.keys)),
        ]
    for who in key_publishers:
        grants += [
            AclGrant(who, "WRITE", "TOPIC", full(topics.keys)),
            AclGrant(who, "DESCRIBE", "TOPIC", full(topics.keys)),
        ]
    for op in ("READ", "WRITE", "DESCRIBE", "CREATE", "DESCRIBE_CONFIGS"):
        grants.append(AclGrant(worker, op, "TOPIC", topics.prefix, "PREFIXED"))
    grants += [
        AclGrant(worker, "READ", "GROUP", app_id, "PREFIXED"),
        AclGrant(worker, "DESCRIBE", "GROUP", app_id, "PREFIXED"),
        AclGrant(worker, "WRITE", "TRANSACTIONAL_ID", f"{app_id}-", "PREFIXED"),
        AclGrant(worker, "DESCRIBE", "TRANSACTIONAL_ID", f"{app_id}-", "PREFIXED"),
        AclGrant(worker, "IDEMPOTENT_WRITE", "CLUSTER", "kafka-cluster"),
    ]
    return grants


def create_acls(
    bootstrap: str,
    grants: Iterable[AclGrant],
    client_config: Mapping[str, Any] | None = None,
    *,
    apply_timeout_s: float = 30.0,
) -> int:
    """Create ALLOW bindings (a super user's ``client_config``); how many the broker accepted.
    Creating a binding that exists already is a no-op, so this is safe to repeat.

    The controller answers once the bindings are committed; a broker enforces them only after it
    has applied the metadata log, and until then a client is refused (an idempotent producer
    on InitProducerId, with ClusterAuthorizationFailed). So this returns only when a broker's
    authorizer lists every binding, or raises ``ConfigError`` after ``apply_timeout_s``."""
    from kafka import KafkaAdminClient
    from kafka.admin import (
        ACL,
        ACLFilter,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourcePatternFilter,
        ResourceType,
    )

    acls = [
        ACL(
            principal=f"User:{g.principal}",
            host="*",
            operation=ACLOperation[g.operation],
            permission_type=ACLPermissionType.ALLOW,
            resource_pattern=ResourcePattern(
                ResourceType[g.resource_type],
                g.name,
                ACLResourcePatternType[g.pattern],
            ),
        )
        for g in grants
    ]
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="fleetbus-acls", **dict(client_config or {})
    )
    everything = ACLFilter(
        principal=None,
        host=None,
        operation=ACLOperation.ANY,
        permission_type=ACLPermissionType.ANY,
        resource_pattern=ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY),
    )
    try:
        result = admin.create_acls(acls)
        failed = result.get("failed", [])
        if failed:
            raise ConfigError(f"{len(failed)} ACL binding(s) refused: {failed[:3]}")
        deadline = time.monotonic() + apply_timeout_s
        while True:
            listed, _ = admin.describe_acls(everything)
            missing = set(acls) - set(listed)
            if not missing:
                break
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"{len(missing)} ACL binding(s) created but not applied by the broker "
                    f"after {apply_timeout_s:.0f} s"
                )
            time.sleep(0.2)
    finally:
        admin.close()
    return len(result.get("succeeded", []))


def write_pki(
    out: Path,
    *,
    broker_sans: Sequence[str] = (),
    clients: Sequence[str] = (),
    mounted_at: str | None = None,
) -> list[Path]:
    """A broker PKI in ``out`` for a cluster outside this machine's tests (docker-compose):
    ``ca.pem``/``ca.key``; the broker's ``broker.pem``/``.key`` naming ``localhost``,
    ``127.0.0.1`` and ``broker_sans`` (DNS names or IP addresses); for every client
    ``<cn>.pem``/``.key``; Kafka's PEM key store (key, then certificate) for each of them as
    ``<cn>.keystore.pem``; and for every client a Java client config ``<cn>.properties``
    (for Kafka's own tools, ``--command-config``) naming the files under ``mounted_at``
    (default: ``out``). Existing files are kept. Returns the files; private ones are 0600."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    _ensure_ca(out)
    where = (mounted_at or str(out)).rstrip("/")
    written = [out / "ca.pem", out / "ca.key"]
    for cn, server in [(BROKER_PRINCIPAL, True), *((c, False) for c in clients)]:
        cert, key = _issue_pair(out, cn, server=server, sans=broker_sans if server else ())
        keystore = out / f"{cn}.keystore.pem"
        if not keystore.exists():
            write_private_file(keystore, key.read_bytes() + cert.read_bytes())
        written += [cert, key, keystore]
        if not server:
            config = out / f"{cn}.properties"
            config.write_text(
                "security.protocol=SSL\n"
                "ssl.keystore.type=PEM\n"
                f"ssl.keystore.location={where}/{cn}.keystore.pem\n"
                "ssl.truststore.type=PEM\n"
                f"ssl.truststore.location={where}/ca.pem\n"
            )
            written.append(config)
    return written


# -- the throw-away CA ----------------------------------------------------------------------


def _ensure_ca(tls_dir: Path) -> None:
    """Write ``ca.pem`` / ``ca.key`` (EC P-256, 30 days) unless they exist."""
    if (tls_dir / "ca.pem").exists() and (tls_dir / "ca.key").exists():
        return
    from cryptography.hazmat.primitives import serialization

    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = make_ca(cn_name("fleetbus dev Kafka CA"), 30)
    write_private_file(tls_dir / "ca.key", key_pem(key))
    (tls_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue_pair(
    tls_dir: Path, cn: str, *, server: bool, sans: Sequence[str] = ()
) -> tuple[Path, Path]:
    """``<cn>.pem`` / ``<cn>.key`` signed by the CA (subject exactly ``CN=<cn>``, which
    ``PRINCIPAL_MAPPING_RULES`` turn into ``User:<cn>``), reused if present.

    Broker certificates are for server and client use (brokers connect to each other) and
    name ``localhost`` / ``127.0.0.1`` and ``sans``; client certificates are for client use
    only.
    """
    import re

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", cn):
        raise ConfigError(f"invalid principal {cn!r} for a certificate CN")
    names = san_list(["localhost", "127.0.0.1", *sans]) if server else []
    cert_path, key_path = tls_dir / f"{cn}.pem", tls_dir / f"{cn}.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    ca_cert = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_cert(
        cn_name(cn),
        key.public_key(),
        ca_cert,
        ca_key,
        server=server,
        client=True,
        valid_days=30,
        sans=names,
    )
    write_private_file(key_path, key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
    except OSError:
        return ""


def status_json(cluster: LocalKafka) -> str:
    return json.dumps(cluster.status(), indent=2)
