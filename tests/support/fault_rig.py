"""A command pipeline on a three-broker cluster, with switches to break it and exact counts.

Shared by ``tests/integration/test_faults.py`` (bounded, in CI) and ``tests/soak/run_soak.py``
(longer). ``FaultRig`` holds: a ``LocalKafka(brokers=3)`` (RF 3, min ISR 2, every topic created
with replication factor 3), a KME pair on fixed ports (so it can be stopped and restarted at the
same address with the same PKI and the same state directory, so that keys handed out before a
restart are still there after it), a fleet of ``V-0001..V-NNNN`` vehicles plus one QKD edge unit
``E-0001``, a ``fleetbus worker`` subprocess, one in-process ``VehicleAgent`` for all vehicles
and one for the edge unit, and a ``CommandPublisher``.

``run(fault, commands)`` streams commands while ``fault`` runs and returns ``FaultCounts``:
counted from the handlers (every invocation), the agents' durable executed stores, and the
``commands.responses`` / ``commands.status`` topics.

Over 500 lines because the rig is one object: its faults, processes and counts share the
cluster, KME pair and fleet it starts.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from fleetbus.bus.commands import Command, CommandState, SignedCommand, StatusEvent, Target
from fleetbus.bus.errors import KafkaUnavailableError
from fleetbus.bus.settings import FleetbusSettings, TopicNames
from fleetbus.bus.topics import ensure_topics
from fleetbus.devtools.fleet import process_env
from fleetbus.devtools.kafka import LocalKafka, find_free_base_port, free_port
from fleetbus.devtools.kme_pki import DEFAULT_KME_IDS
from fleetbus.devtools.process import WorkerProcess, spawn, stop_group
from fleetbus.processors.app import STAGES, state_topic
from fleetbus.sdk.dispatch import CommandPublisher
from fleetbus.sdk.vehicle import HandlerResult, VehicleAgent
from tests.support.pipeline import DISPATCHER, TestFleet, make_test_fleet, read_topic

MASTER_SAE = "sae-hub"
EDGE_SAE = "sae-edge-1"
EDGE = "E-0001"


class KMEProcess:
    """``fleetbus kme serve`` on fixed ports: ``stop()`` and ``start()`` keep its address and its
    state directory (the key pool and keys reserved but not yet fetched)."""

    def __init__(self, workdir: Path) -> None:
        from fleetbus.devtools.kme_pki import make_test_pki

        self.workdir = workdir
        self.pki = make_test_pki(workdir / "pki", [MASTER_SAE, EDGE_SAE])
        self.ports = {"a": free_port(), "b": free_port(), "admin": free_port()}
        self.state_dir = workdir / "state"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url_a(self) -> str:
        return f"https://127.0.0.1:{self.ports['a']}"

    @property
    def url_b(self) -> str:
        return f"https://127.0.0.1:{self.ports['b']}"

    def start(self, timeout_s: float = 60.0) -> None:
        log = self.workdir / "kme.out"
        args = [
            sys.executable, "-m", "fleetbus.cli.kme", "serve",
            "--cert-dir", str(self.pki.directory),
            "--port-a", str(self.ports["a"]), "--port-b", str(self.ports["b"]),
            "--admin-port", str(self.ports["admin"]),
            "--state-dir", str(self.state_dir),
            "--sae-a", MASTER_SAE, "--sae-b", EDGE_SAE,
            "--key-rate", "2000000", "--pool-size", "4096", "--max-key-per-request", "128",
        ]  # fmt: skip
        with open(log, "wb") as out:
            self.proc = spawn(args, stdout=out)
        deadline = time.monotonic() + timeout_s
        while b"fleetbus-kme ready" not in log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("KME did not start:\n" + log.read_text(errors="replace"))
            time.sleep(0.1)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_group(self.proc, 15, sig)

    def reserved_in_state(self) -> int:
        """Reserved, unfetched keys in the state file (read while the KME is down)."""
        doc = json.loads((self.state_dir / "kme-pool.json").read_text())
        return len(doc["state"]["reservations"])

    def admin(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['admin']}{path}",
            data=json.dumps(body).encode(),
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result


class Executions:
    """Counts every handler invocation per (command id, vehicle): the ground truth for
    "executed twice", independent of the agents' own de-duplication."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def handler(self, command: Command) -> HandlerResult:
        with self.lock:
            self.counts[command.id] += 1
        return HandlerResult(200, "ok")

    def executed(self, ids: list[str]) -> int:
        with self.lock:
            return sum(1 for c in ids if self.counts[c] >= 1)


@dataclass
class FaultCounts:
    fault: str
    sent: int = 0
    executed: int = 0
    executed_twice: int = 0
    lost: int = 0
    lost_to_vehicles: int = 0
    failed_qkd_unavailable: int = 0
    store_finished: int = 0
    responses: int = 0
    answered: int = 0
    status_succeeded: int = 0
    status_succeeded_twice: int = 0
    publish_retries: int = 0
    via_edge: int = 0
    drain_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FaultRig:
    workdir: Path
    vehicles: int = 500
    partitions: int = 3
    cluster: LocalKafka = field(init=False)
    kme: KMEProcess = field(init=False)
    fleet: TestFleet = field(init=False)
    settings: FleetbusSettings = field(init=False)
    worker: WorkerProcess = field(init=False)
    executions: Executions = field(init=False)
    agents: list[VehicleAgent] = field(init=False)
    publisher: CommandPublisher = field(init=False)
    #: Keys handed to the worker but not yet to the edge unit when the KME was last killed.
    kme_reserved_at_kill: int | None = None
    _workers_started: int = 0

    # -- set-up ---------------------------------------------------------------------------

    def start(self) -> FaultRig:
        self.cluster = LocalKafka(
            home=self.workdir / "kafka",
            brokers=3,
            base_port=find_free_base_port(6, start=21092),
            heap_mb=384,
        )
        self.cluster.up(timeout_s=180)
        self.kme = KMEProcess(self.workdir / "kme")
        self.kme.start()
        self.fleet = make_test_fleet(self.workdir, vehicles=self.vehicles)
        self.fleet.add_edge_unit(EDGE, qkd_sae_id=EDGE_SAE)
        self.settings = self._settings()
        self.worker = self.start_worker()
        self.executions = Executions()
        self.agents = [self._vehicle_agent(), self._edge_agent()]
        for agent in self.agents:
            agent.start()
        self.publisher = CommandPublisher(
            self.settings,
            principal_id=DISPATCHER,
            private_key_file=self.fleet.key_file_path(DISPATCHER),
        )
        # Warm-up: one command each way, so that later counts measure faults, not start-up.
        self.run(lambda: None, 4, rate_per_s=50)
        return self

    def _settings(self) -> FleetbusSettings:
        run = uuid.uuid4().hex[:8]
        topics = TopicNames(prefix=f"f{run}.")
        settings = FleetbusSettings(
            kafka_bootstrap=self.cluster.bootstrap,
            app_id=f"fleetbus-faults-{run}",
            partitions=self.partitions,
            topics=topics,
            keys_dir=str(self.fleet.keys_dir),
        )
        bootstrap = self.cluster.bootstrap
        names = [topics.full(getattr(topics, n)) for n in TopicNames.model_fields if n != "prefix"]
        regular = [n for n in names if n != topics.full(topics.keys)]
        regular += [topics.prefix + "smoke.in", topics.prefix + "smoke.out"]
        compacted = [topics.full(topics.keys), *(state_topic(settings, s) for s in STAGES)]
        # Created here, with replication factor 3, before the worker would create them with 1.
        ensure_topics(bootstrap, regular, partitions=self.partitions, replication_factor=3)
        ensure_topics(
            bootstrap,
            compacted,
            partitions=self.partitions,
            replication_factor=3,
            configs={"cleanup.policy": "compact"},
        )
        return settings

    def worker_env(self) -> dict[str, str]:
        s = self.settings
        master = self.kme.pki.saes[MASTER_SAE]
        return {
            **process_env(s, self.workdir),
            "FLEETBUS_WEB_PORT": "0",
            "FLEETBUS_KEYS_DIR": str(self.fleet.keys_dir),
            "FLEETBUS_PIPELINE": "on",
            "FLEETBUS_TICK_INTERVAL_S": "1.0",
            "FLEETBUS_QKD_KME_URL": self.kme.url_a,
            "FLEETBUS_QKD_KME_ID": DEFAULT_KME_IDS[0],
            "FLEETBUS_QKD_SAE_ID": MASTER_SAE,
            "FLEETBUS_QKD_CA_FILE": str(self.kme.pki.ca_cert),
            "FLEETBUS_QKD_CERT_FILE": str(master.cert),
            "FLEETBUS_QKD_KEY_FILE": str(master.key),
        }

    def start_worker(self) -> WorkerProcess:
        self._workers_started += 1
        return WorkerProcess(
            self.worker_env(), self.workdir / f"worker-{self._workers_started}.log"
        )

    def _vehicle_agent(self) -> VehicleAgent:
        ids = [v for v in self.fleet.vehicle_ids]
        return VehicleAgent(
            self.settings,
            vehicles=self.fleet.vehicles(ids),
            directory=self.fleet.directory,
            minimum_path="xwing",
            handlers={"ping": self.executions.handler},
            store_path=self.workdir / "vehicles.sqlite",
        )

    def _edge_agent(self) -> VehicleAgent:
        from fleetbus.providers.qkd import QKDProvider

        pair = self.kme.pki.saes[EDGE_SAE]
        qkd = QKDProvider(
            kme_url=self.kme.url_b,
            kme_id=DEFAULT_KME_IDS[1],
            sae_id=EDGE_SAE,
            ca_file=self.kme.pki.ca_cert,
            cert_file=pair.cert,
            key_file=pair.key,
            master_sae_id=MASTER_SAE,
        )
        return VehicleAgent(
            self.settings,
            vehicles=[self.fleet.vehicle(EDGE)],
            directory=self.fleet.directory,
            minimum_path="xwing",
            handlers={"ping": self.executions.handler},
            store_path=self.workdir / "edge.sqlite",
            qkd_provider=qkd,
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.publisher.close()
        for agent in getattr(self, "agents", []):
            with contextlib.suppress(Exception):
                agent.close()
        if hasattr(self, "worker"):
            self.worker.stop()
        if hasattr(self, "kme"):
            self.kme.stop()
        if hasattr(self, "cluster"):
            self.cluster.down()

    # -- faults ---------------------------------------------------------------------------

    def topic(self, name: str) -> str:
        return self.settings.topics.full(getattr(self.settings.topics, name))

    def leader_of(self, topic: str, partition: int = 0) -> int:
        """0-based index of the node leading ``topic``'s ``partition``."""
        admin = KafkaAdminClient(bootstrap_servers=self.cluster.bootstrap)
        try:
            (desc,) = admin.describe_topics([topic])
        finally:
            admin.close()
        for p in desc["partitions"]:
            if p.get("partition_index", p.get("partition")) == partition:
                return int(p.get("leader_id", p.get("leader"))) - 1
        raise LookupError(f"{topic}[{partition}] has no leader")

    def kill_leader(self, topic_name: str = "commands_outbound", down_s: float = 5.0) -> None:
        index = self.leader_of(self.topic(topic_name))
        self.cluster.kill_node(index, signal.SIGKILL)
        time.sleep(down_s)
        self.cluster.up(timeout_s=120)

    def kill_worker(self, down_s: float = 2.0) -> None:
        self.worker.kill()
        time.sleep(down_s)
        self.worker = self.start_worker()

    def restart_kme(self, down_s: float = 4.0) -> None:
        self.kme.stop(signal.SIGKILL)
        self.kme_reserved_at_kill = self.kme.reserved_in_state()
        time.sleep(down_s)
        self.kme.start()

    def cut_qkd_link(self, down_s: float = 4.0) -> None:
        self.kme.admin("/admin/link", {"up": False})
        time.sleep(down_s)
        self.kme.admin("/admin/link", {"up": True})

    # -- a run ----------------------------------------------------------------------------

    def sign_commands(self, n: int, *, edge_every: int = 10) -> list[SignedCommand]:
        """``n`` pings: every ``edge_every``-th to the QKD edge unit, the others spread over
        the vehicles."""
        out = []
        for i in range(n):
            vid = EDGE if i % edge_every == 0 else self.fleet.vehicle_ids[i % self.vehicles]
            out.append(self.publisher.sign(Target(vehicle=vid), "ping", ttl_s=600))
        return out

    def publish(self, signed: SignedCommand) -> int:
        """Publish until the broker acknowledges; returns the retries it took. A retry sends the
        same signed command: if an unacknowledged attempt did land, the bus drops the copy."""
        for attempt in range(30):
            try:
                self.publisher.publish(signed)
                return attempt
            except KafkaUnavailableError:
                time.sleep(1.0)
        raise RuntimeError(f"command {signed.command.id} could not be published")

    def run(
        self,
        fault: Callable[[], None],
        commands: int,
        *,
        name: str = "",
        rate_per_s: float = 25.0,
        fault_after: float = 0.3,
        timeout_s: float = 180.0,
    ) -> FaultCounts:
        signed = self.sign_commands(commands)
        ids = [s.command.id for s in signed]
        retries = 0
        slowest_publish = 0.0
        fault_at = int(commands * fault_after)
        fault_s: list[float] = []

        def timed_fault() -> None:
            began = time.monotonic()
            fault()
            fault_s.append(time.monotonic() - began)

        fault_thread = threading.Thread(target=timed_fault, name=f"fault-{name}", daemon=True)
        started = time.monotonic()
        for i, command in enumerate(signed):
            if i == fault_at:
                fault_thread.start()
            began = time.monotonic()
            retries += self.publish(command)
            slowest_publish = max(slowest_publish, time.monotonic() - began)
            pause = started + (i + 1) / rate_per_s - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        if not fault_thread.is_alive() and fault_thread.ident is None:
            fault_thread.start()
        fault_thread.join()
        sent_done = time.monotonic()
        deadline = sent_done + timeout_s
        while time.monotonic() < deadline:
            with self.executions.lock:
                missing = {c for c in ids if self.executions.counts[c] == 0}
            # A command that failed visibly (503 from the edge unit) will not run any more.
            if not missing or missing <= self.failed_qkd(missing, idle_s=1.0):
                break
            time.sleep(2.0)
        drain_s = time.monotonic() - sent_done
        counts = self.count(name, signed, retries=retries, drain_s=drain_s)
        counts.extra["fault_and_recovery_s"] = round(fault_s[0], 1) if fault_s else None
        counts.extra["send_s"] = round(sent_done - started, 1)
        counts.extra["slowest_publish_s"] = round(slowest_publish, 2)
        return counts

    def count(
        self,
        name: str,
        signed: list[SignedCommand],
        *,
        retries: int = 0,
        drain_s: float = 0.0,
        settle_s: float = 3.0,
    ) -> FaultCounts:
        """The counts for ``signed``, ``settle_s`` after the last handler ran: handlers run
        before their batch is recorded as finished and answered, so the last batch finishes
        (and late duplicates, if any, show up) before anything is read."""
        time.sleep(settle_s)
        ids = [s.command.id for s in signed]
        wanted = set(ids)
        with self.executions.lock:
            runs = {c: self.executions.counts[c] for c in ids}
        responses = Counter(
            r.key.decode() for r in self.read("commands_responses") if r.key.decode() in wanted
        )
        succeeded: Counter[str] = Counter()
        for r in self.read("commands_status"):
            if r.key is None or r.key.decode() not in wanted:
                continue
            event = StatusEvent.decode(r.value)
            if event.state is CommandState.SUCCEEDED:
                succeeded[event.command_id] += 1
        # The stores last: an agent records a command as finished before it answers, so every
        # answer read above has its store row by now.
        finished = 0
        for store in ("vehicles.sqlite", "edge.sqlite"):
            db = sqlite3.connect(f"file:{self.workdir / store}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT command_id FROM executed WHERE state = 'finished'")
                finished += sum(1 for (cid,) in rows if cid in wanted)
            finally:
                db.close()
        edge = {s.command.id for s in signed if s.command.target.vehicle == EDGE}
        not_run = {c for c in ids if runs[c] == 0}
        return FaultCounts(
            fault=name,
            sent=len(ids),
            executed=sum(1 for c in ids if runs[c] >= 1),
            executed_twice=sum(1 for c in ids if runs[c] >= 2),
            lost=len(not_run),
            lost_to_vehicles=len(not_run - edge),
            failed_qkd_unavailable=len(self.failed_qkd(not_run)) if not_run else 0,
            store_finished=finished,
            responses=sum(responses.values()),
            answered=len(responses),
            status_succeeded=len(succeeded),
            status_succeeded_twice=sum(1 for n in succeeded.values() if n >= 2),
            publish_retries=retries,
            via_edge=sum(1 for s in signed if s.command.target.vehicle == EDGE),
            drain_s=round(drain_s, 1),
        )

    def failed_qkd(self, wanted: set[str], idle_s: float = 3.0) -> set[str]:
        """Commands of ``wanted`` that ended ``failed`` because their QKD key could not be had:
        503 qkd_unavailable (never fetched before expiry), or 400 unknown_key_id (a KME that no
        longer knows a reserved key; the rig's KME keeps them in its state directory)."""
        failed = set()
        for r in self.read("commands_status", idle_s=idle_s):
            if r.key is None or r.key.decode() not in wanted:
                continue
            event = StatusEvent.decode(r.value)
            qkd_loss = "qkd_unavailable" in event.detail or "unknown_key_id" in event.detail
            if event.state is CommandState.FAILED and qkd_loss:
                failed.add(event.command_id)
        return failed

    def read(self, topic_name: str, idle_s: float = 3.0) -> list[Any]:
        return read_topic(self.cluster.bootstrap, self.topic(topic_name), idle_s=idle_s)

    # -- back-pressure --------------------------------------------------------------------

    def burst(self, signed: list[SignedCommand]) -> float:
        """Publish pre-signed commands as fast as one producer can; returns the seconds."""
        producer = KafkaProducer(
            bootstrap_servers=self.cluster.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
        )
        topic = self.topic("commands_requested")
        started = time.monotonic()
        try:
            futures = [
                producer.send(topic, key=s.command.id.encode(), value=s.encode()) for s in signed
            ]
            producer.flush(timeout=120)
            for f in futures:
                f.get(timeout=60)
        finally:
            producer.close()
        return time.monotonic() - started

    def backlog(self, stage: str = "authorize") -> int:
        """Records in ``commands.requested`` not yet committed by the authorize stage."""
        topic = self.topic("commands_requested")
        tps = [TopicPartition(topic, p) for p in range(self.partitions)]
        consumer = KafkaConsumer(
            bootstrap_servers=self.cluster.bootstrap,
            group_id=f"{self.settings.app_id}-{stage}",
            enable_auto_commit=False,
        )
        try:
            ends = consumer.end_offsets(tps)
            return sum(max(0, ends[tp] - (consumer.committed(tp) or 0)) for tp in tps)
        finally:
            consumer.close()

    def wait_executed(self, ids: list[str], timeout_s: float) -> float:
        started = time.monotonic()
        deadline = started + timeout_s
        while self.executions.executed(ids) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.2)
        return time.monotonic() - started


def peak_rss_mb(pid: int) -> float:
    """``VmHWM`` (peak resident set) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmHWM for pid {pid}")
