"""The fleetbus demo: the whole command pipeline on real parts, driven through a mixed scenario.

``run_demo`` starts (or reuses) a local Apache Kafka, a KME pair joined by a simulated QKD link,
a ``fleetbus worker`` (authorize, seal, track, telemetry) and a simulated fleet process, then
plays routine traffic, high-criticality commands, attacks and a QKD link outage, and checks
every expectation. ``python -m fleetbus.devtools.demo fleet SPEC`` is the fleet process.
See ``docs/demo.md``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetbus.bus.commands import (
    FINAL_STATES,
    Command,
    CommandState,
    ParamValue,
    SignedCommand,
    StatusEvent,
    Target,
)
from fleetbus.bus.directory import (
    ROOT_SUITE,
    FleetRoot,
    issue_key,
    save_key_file,
    sign_directory,
    write_directory_file,
)
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.bus.settings import FleetbusSettings, TopicNames

SEALER: Final = "bus-sealer"
DISPATCHER: Final = "dispatch-1"
APPROVER: Final = "dispatch-2"
INTRUDER: Final = "intruder"
HUB_SAE: Final = "sae-hub"
QKD_PATH: Final = "qkd-etsi014+xwing"
DISPATCH_SUITE: Final = "composite-mldsa65-ed25519"
DAY_S: Final = 86400.0
FLEET_READY: Final = "fleetbus-fleet ready"
_FINAL: Final = frozenset(str(s) for s in FINAL_STATES)
_KEY_PATH_RE: Final = re.compile(r"key path (\S+)")
#: Routine actions (policy catalogue) and an elevated one dispatchers may send to one vehicle.
ROUTINE_ACTIONS: Final = ("lock_doors", "set_climate", "push_route", "ping", "set_battery_profile")


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs. ``vehicles`` counts cars (PQC and legacy); edge units come on top."""

    vehicles: int = 200
    legacy: int | None = None  # default: vehicles // 10
    edge_units: int = 4
    commands: int = 300
    partitions: int = 2
    approval_window_s: float = 8.0
    outage_s: float = 10.0
    qkd_recovery_timeout_s: float = 60.0
    final_timeout_s: float = 120.0
    seed: int = 7

    @property
    def legacy_count(self) -> int:
        return self.vehicles // 10 if self.legacy is None else self.legacy

    def check(self) -> None:
        if self.vehicles < 4:
            raise ConfigError("the demo needs at least 4 vehicles")
        if not 0 <= self.legacy_count < self.vehicles - 2:
            raise ConfigError("--legacy must leave at least 3 PQC vehicles")
        if self.edge_units < 2:
            raise ConfigError("the demo needs at least 2 edge units")
        if self.commands < 10:
            raise ConfigError("the demo needs at least 10 routine commands")


# --- the fleet on disk ---------------------------------------------------------------------


@dataclass
class DemoFleet:
    """The principals the demo made in ``keys_dir`` (a ``fleetbus keys``-style folder)."""

    keys_dir: Path
    pqc: list[str]
    legacy: list[str]
    edge: list[str]
    edge_sae: dict[str, str]
    groups: dict[str, list[str]]

    @property
    def vehicles(self) -> list[str]:
        return sorted([*self.pqc, *self.legacy])


def build_demo_keys(keys_dir: Path, options: DemoOptions) -> DemoFleet:
    """Fleet root, bus sealer, two operators, an intruder (signed by another root), vehicles
    (PQC: xwing + x25519 KEMs; legacy: x25519 only) and QKD-connected edge units."""
    now = time.time()
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = FleetRoot.generate(ROOT_SUITE)
    save_key_file(KeyFolder(keys_dir).root_key, root.key_file())
    KeyFolder(keys_dir).root_pub.write_bytes(root.public.to_bytes())

    def issue(principal: str, kind: str, suite: str, *, by: FleetRoot = root, **extra: Any) -> Any:
        return issue_key(
            by, principal_id=principal, kind=kind, signature_suite=suite,
            not_before=now - DAY_S, not_after=now + 30 * DAY_S, **extra,
        )  # fmt: skip

    issued = [
        issue(SEALER, "sealer", ROOT_SUITE, kems=("xwing", "x25519")),
        issue(DISPATCHER, "dispatcher", DISPATCH_SUITE),
        issue(APPROVER, "approver", DISPATCH_SUITE),
    ]
    ids = [f"V-{n:04d}" for n in range(1, options.vehicles + 1)]
    # Legacy vehicles are spread evenly over the fleet (and so over both groups).
    step = options.vehicles / options.legacy_count if options.legacy_count else 0.0
    legacy = {ids[int(step * (i + 1)) - 1] for i in range(options.legacy_count)}
    groups: dict[str, list[str]] = {"north": [], "south": [], "depot": []}
    for index, vid in enumerate(ids):
        group = "north" if index % 2 == 0 else "south"
        groups[group].append(vid)
        kems = ("x25519",) if vid in legacy else ("xwing", "x25519")
        issued.append(issue(vid, "vehicle", "ed25519", kems=kems, groups=[group]))
    edge_sae: dict[str, str] = {}
    for n in range(1, options.edge_units + 1):
        eid = f"E-{n:02d}"
        edge_sae[eid] = f"sae-depot-{n:02d}"
        groups["depot"].append(eid)
        issued.append(
            issue(eid, "edge", "ed25519", kems=("xwing", "x25519"), qkd_sae_id=edge_sae[eid],
                  groups=["depot"])
        )  # fmt: skip
    # A well-formed key whose record another root signed: not in the directory.
    intruder = issue(INTRUDER, "dispatcher", "ed25519", by=FleetRoot.generate("ed25519"))
    # A new root starts a new history: head 1, whatever an earlier demo left in the folder.
    head, records = sign_directory(root, [i.signed for i in issued])
    write_directory_file(KeyFolder(keys_dir).directory, head, records)
    for item in [*issued, intruder]:
        save_key_file(KeyFolder(keys_dir).private_key(item.key_file.principal_id), item.key_file)
    return DemoFleet(
        keys_dir=keys_dir,
        pqc=[v for v in ids if v not in legacy],
        legacy=sorted(legacy),
        edge=sorted(edge_sae),
        edge_sae=edge_sae,
        groups=groups,
    )


# --- processes -----------------------------------------------------------------------------


class ChildProcess:
    """A child in its own session (process group), output to a log file; ``stop`` ends the
    whole group: SIGTERM, then SIGKILL after ``timeout_s``."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                argv,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            _killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Anything the child left in its group goes too.
        _killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def output(self, tail: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-tail:]


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def base_env(settings: FleetbusSettings, workdir: Path) -> dict[str, str]:
    """The FLEETBUS_* variables every demo process shares."""
    prefix = settings.topics.prefix
    return {
        "FLEETBUS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "FLEETBUS_APP_ID": settings.app_id,
        "FLEETBUS_PARTITIONS": str(settings.partitions),
        "FLEETBUS_TOPICS__PREFIX": prefix,
        "FLEETBUS_SMOKE_SOURCE": prefix + "smoke.in",
        "FLEETBUS_SMOKE_SINK": prefix + "smoke.out",
        "FLEETBUS_KEYS_DIR": str(settings.keys_dir),
        "FLEETBUS_DATA_DIR": str(workdir / "state"),
    }


# --- the fleet process ---------------------------------------------------------------------


class ExecutionJournal:
    """One line per handler run (command id, vehicle id, action), flushed at once, so the demo
    can count executions per command per vehicle — independently of the agent's own store."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self.current = threading.local()

    def record(self, command: Command) -> None:
        vid = getattr(self.current, "vehicle_id", "?")
        with self._lock:
            self._file.write(f"{command.id} {vid} {command.action}\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    @staticmethod
    def read(path: Path) -> Counter[tuple[str, str]]:
        counts: Counter[tuple[str, str]] = Counter()
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3:
                    counts[(parts[0], parts[1])] += 1
        return counts


def _journaled_handlers(journal: ExecutionJournal) -> dict[str, Any]:
    from fleetbus.cli.fleet import default_handlers
    from fleetbus.sdk.vehicle import HandlerResult

    def wrap(handler: Callable[[Command], HandlerResult | None]) -> Any:
        def run(command: Command) -> HandlerResult | None:
            journal.record(command)
            return handler(command)

        return run

    handlers: dict[str, Any] = dict(default_handlers())
    handlers["ping"] = lambda command: HandlerResult(200, "pong")
    return {action: wrap(h) for action, h in handlers.items()}


def run_fleet(spec_path: Path) -> int:
    """The simulated fleet: one VehicleAgent for the PQC vehicles, one for the legacy vehicles,
    one per QKD edge unit (each with its own SAE at KME-B). Runs until SIGTERM."""
    from fleetbus.providers.qkd import QKDProvider
    from fleetbus.sdk.vehicle import VehicleAgent, VehicleIdentity, load_key_directory

    class JournaledAgent(VehicleAgent):
        """Tells the journal which vehicle a handler runs for (handlers see only the command)."""

        def __init__(self, journal: ExecutionJournal, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._journal = journal

        def _run_handler(self, vid: str, command: Command) -> Any:
            # Handlers of a poll batch run after the whole batch was read and claimed: name
            # the vehicle right where its handler runs.
            self._journal.current.vehicle_id = vid
            return super()._run_handler(vid, command)

    spec = json.loads(spec_path.read_text())
    keys_dir = Path(spec["keys_dir"])
    store_dir = Path(spec["store_dir"])
    settings = FleetbusSettings()
    directory = load_key_directory(keys_dir)
    journal = ExecutionJournal(Path(spec["journal"]))
    handlers = _journaled_handlers(journal)

    def agent(name: str, ids: list[str], minimum: str, **extra: Any) -> VehicleAgent:
        return JournaledAgent(
            journal,
            settings=settings,
            vehicles=[VehicleIdentity.load(keys_dir, v) for v in ids],
            directory=directory,
            minimum_path=minimum,
            handlers=handlers,
            store_path=store_dir / f"{name}.sqlite",
            sealer_principal=SEALER,
            **extra,
        )

    agents = [agent("pqc", spec["pqc"], "xwing")]
    if spec["legacy"]:
        agents.append(agent("legacy", spec["legacy"], "x25519", uplink_paths=["x25519"]))
    for eid, qkd in spec["edge"].items():
        agents.append(agent(eid, [eid], "xwing", qkd_provider=QKDProvider(**qkd)))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        for a in agents:
            a.start()
        print(FLEET_READY, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for a in agents:
            a.close()
        journal.close()
        stats = {
            "executed": sum(a.stats.executed for a in agents),
            "answered": sum(a.stats.answered for a in agents),
            "redeliveries": sum(a.stats.duplicates for a in agents),
            "envelope_rejects": sum(a.stats.rejected for a in agents),
            "errors": sum(a.stats.errors for a in agents),
        }
        Path(spec["stats"]).write_text(json.dumps(stats))
    return 0


# --- following commands.status -------------------------------------------------------------


class StatusFollower:
    """Reads ``commands.status`` (read_committed) from the beginning in a thread and keeps every
    event by command id, with the time it was read."""

    def __init__(self, settings: FleetbusSettings) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.topic = settings.topics.full(settings.topics.commands_status)
        self._consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            client_id="fleetbus-demo-status",
        )
        partitions = self._consumer.partitions_for_topic(self.topic) or set()
        if not partitions:
            raise ConfigError(f"topic {self.topic} does not exist")
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)
        self._lock = threading.Lock()
        self._events: dict[str, list[StatusEvent]] = {}
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batches = self._consumer.poll(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    try:
                        event = StatusEvent.decode(record.value)
                    except FleetbusError:
                        continue
                    with self._lock:
                        self._events.setdefault(event.command_id, []).append(event)
                        self.count += 1

    def events(self, command_id: str) -> list[StatusEvent]:
        with self._lock:
            return list(self._events.get(command_id, ()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


# --- expectations --------------------------------------------------------------------------


@dataclass
class Expectation:
    """What one (command, vehicle) must end as. ``vehicle_id`` None: the command as a whole."""

    case: str
    command_id: str
    vehicle_id: str | None
    state: str
    reason: str | None
    sent_at: float
    phase: str
    routine: bool
    detail_contains: str | None = None
    outcome: StatusEvent | None = None

    def resolve(self, events: list[StatusEvent]) -> bool:
        if self.outcome is not None:
            return True
        for event in events:
            if str(event.state) not in _FINAL:
                continue
            replay = event.reason is ReasonCode.REPLAYED
            if replay != (self.reason == ReasonCode.REPLAYED.value):
                continue
            if self.vehicle_id and event.vehicle_id not in (self.vehicle_id, None):
                continue
            self.outcome = event
            return True
        return False

    @property
    def held(self) -> bool:
        o = self.outcome
        if o is None or str(o.state) != self.state:
            return False
        if self.reason is not None and (o.reason is None or o.reason.value != self.reason):
            return False
        return self.detail_contains is None or self.detail_contains in o.detail

    @property
    def observed(self) -> str:
        o = self.outcome
        if o is None:
            return "no final status"
        return str(o.state) + (f" ({o.reason.value})" if o.reason else "")

    @property
    def latency_s(self) -> float | None:
        return None if self.outcome is None else max(0.0, self.outcome.at - self.sent_at)


@dataclass
class Check:
    """One line of the scenario verdict."""

    name: str
    expected: str
    observed: str
    ok: bool


@dataclass
class DemoReport:
    """Everything the summary shows; ``ok`` is the exit status."""

    fleet: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    dlq_by_reason: dict[str, int] = field(default_factory=dict)
    envelopes_by_path: dict[str, int] = field(default_factory=dict)
    edge_paths_by_phase: dict[str, dict[str, int]] = field(default_factory=dict)
    failovers: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_split_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)
    workdir: str = ""
    kafka: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> str:
        data = asdict(self)
        data["ok"] = self.ok
        return json.dumps(data, indent=2, sort_keys=True)


# --- the scenario --------------------------------------------------------------------------


class Scenario:
    """Sends the demo's traffic and keeps one ``Expectation`` per outcome it waits for."""

    def __init__(
        self,
        settings: FleetbusSettings,
        fleet: DemoFleet,
        options: DemoOptions,
        kme: Any,
        follower: StatusFollower,
        progress: Progress,
    ) -> None:
        from fleetbus.bus.directory import load_key_file
        from fleetbus.sdk.dispatch import CommandPublisher

        self.settings = settings
        self.fleet = fleet
        self.options = options
        self.kme = kme
        self.follower = follower
        self.progress = progress
        self.rng = random.Random(options.seed)  # noqa: S311 - traffic mix, not crypto
        self.expectations: list[Expectation] = []
        self.phase_of: dict[str, str] = {}
        self.qkd_restored_after_s: float | None = None
        self.signed: dict[str, SignedCommand] = {}
        self.sent: Counter[str] = Counter()
        self.outage_s = 0.0
        self.enclave_ok = ""
        keys = fleet.keys_dir
        self.dispatch = CommandPublisher(
            settings,
            principal_id=DISPATCHER,
            private_key_file=KeyFolder(keys).private_key(DISPATCHER),
        )
        self.approver = CommandPublisher(
            settings, principal_id=APPROVER, private_key_file=KeyFolder(keys).private_key(APPROVER)
        )
        self.intruder = CommandPublisher(
            settings,
            principal_id=INTRUDER,
            signer=load_key_file(KeyFolder(keys).private_key(INTRUDER)).signer(),
        )
        self.task = progress.add_task("starting", total=0)
        self.phase = "ready"
        self.phases: list[str] = []

    def close(self) -> None:
        for publisher in (self.dispatch, self.approver, self.intruder):
            publisher.close()

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.phases.append(phase)
        self.tick()

    # -- sending --------------------------------------------------------------------------

    def _publish(self, publisher: Any, signed: SignedCommand, kind: str) -> None:
        publisher.publish(signed)
        self.signed.setdefault(signed.command.id, signed)
        self.sent[kind] += 1

    def _expect(
        self,
        case: str,
        signed: SignedCommand,
        sent_at: float,
        state: CommandState,
        *,
        reason: ReasonCode | None = None,
        vehicles: list[str] | None = None,
        routine: bool = False,
        detail_contains: str | None = None,
    ) -> None:
        cid = signed.command.id
        self.phase_of.setdefault(cid, self.phase)
        targets: list[str | None] = list(vehicles) if vehicles else [None]
        for vid in targets:
            self.expectations.append(
                Expectation(
                    case=case,
                    command_id=cid,
                    vehicle_id=vid,
                    state=str(state),
                    reason=reason.value if reason else None,
                    sent_at=sent_at,
                    phase=self.phase,
                    routine=routine,
                    detail_contains=detail_contains,
                )
            )
        self.progress.update(self.task, total=len(self.expectations))

    def routine(self, target: str, action: str | None = None, *, group: bool = False) -> str:
        """Send one routine command to a vehicle (or a group) and expect success per vehicle."""
        action = action or self.rng.choice(ROUTINE_ACTIONS[:-1] if group else ROUTINE_ACTIONS)
        catalogue: dict[str, dict[str, ParamValue]] = {
            "lock_doors": {},
            "set_climate": {"celsius": 21},
            "push_route": {"route": f"R-{self.rng.randrange(1000):03d}"},
            "ping": {},
            "set_battery_profile": {"profile": "eco"},
        }
        params = catalogue[action]
        tgt = Target(group=target) if group else Target(vehicle=target)
        signed = self.dispatch.sign(tgt, action, params, ttl_s=self.options.final_timeout_s)
        sent_at = time.time()
        self._publish(self.dispatch, signed, "group commands" if group else "routine commands")
        members = self.fleet.groups[target] if group else [target]
        self._expect(
            "routine", signed, sent_at, CommandState.SUCCEEDED, vehicles=members, routine=True
        )
        return signed.command.id

    def high(
        self, case: str, vehicle: str, decision: str | None, state: CommandState, reason: Any
    ) -> str:
        """A high-criticality command (unlock_doors), approved, denied or left waiting."""
        signed = self.dispatch.sign(Target(vehicle=vehicle), "unlock_doors", {"door": "driver"})
        sent_at = time.time()
        self._publish(self.dispatch, signed, "high-criticality commands")
        if decision is not None:
            self.approver.approve(signed.command.id, decision)
        self._expect(
            case,
            signed,
            sent_at,
            state,
            reason=reason,
            vehicles=[vehicle] if state is CommandState.SUCCEEDED else None,
            detail_contains="approval window elapsed" if decision is None else None,
        )
        return signed.command.id

    def attacks(self) -> None:
        """Unauthorized principals, expired, forged and junk input."""
        victim = self.fleet.pqc[0]
        signed = self.intruder.sign(Target(vehicle=victim), "unlock_doors")
        at = time.time()
        self._publish(self.intruder, signed, "attacks")
        self._expect("intruder (key not in the directory)", signed, at, CommandState.REJECTED,
                     reason=ReasonCode.UNKNOWN_SIGNER)  # fmt: skip
        signed = self.approver.sign(Target(vehicle=victim), "lock_doors")
        at = time.time()
        self._publish(self.approver, signed, "attacks")
        self._expect("approver issuing a command (no dispatcher role)", signed, at,
                     CommandState.REJECTED, reason=ReasonCode.POLICY_DENIED)  # fmt: skip
        signed = self.dispatch.sign(Target(group="south"), "set_battery_profile", {"p": "eco"})
        at = time.time()
        self._publish(self.dispatch, signed, "attacks")
        self._expect("elevated action to a whole group", signed, at, CommandState.REJECTED,
                     reason=ReasonCode.POLICY_DENIED)  # fmt: skip
        old = Command.create(issuer=DISPATCHER, target=Target(vehicle=victim), action="lock_doors",
                             ttl_s=30, now=time.time() - 3600)  # fmt: skip
        signed = SignedCommand.sign(old, self.dispatch.signer)
        at = time.time()
        self._publish(self.dispatch, signed, "attacks")
        self._expect("expired command", signed, at, CommandState.REJECTED,
                     reason=ReasonCode.EXPIRED)  # fmt: skip
        good = self.dispatch.sign(Target(vehicle=victim), "unlock_doors")
        forged = SignedCommand(
            good.command, good.key_id, good.suite, bytes(b ^ 0x5A for b in good.signature)
        )
        at = time.time()
        self._publish(self.dispatch, forged, "attacks")
        self._expect("forged signature", forged, at, CommandState.REJECTED,
                     reason=ReasonCode.BAD_SIGNATURE)  # fmt: skip
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap)
        try:
            producer.send(
                self.settings.topics.full(self.settings.topics.commands_requested),
                key=b"junk",
                value=b"\xff\x00 not a command",
            ).get(timeout=10)
            self.sent["attacks"] += 1
        finally:
            producer.close()

    def replay(self, original: str) -> None:
        """Publish the exact signed bytes of an already executed command again."""
        signed = self.signed[original]
        at = time.time()
        self._publish(self.dispatch, signed, "replays")
        self._expect("replay of an executed command", signed, at, CommandState.REJECTED,
                     reason=ReasonCode.REPLAYED)  # fmt: skip

    # -- waiting --------------------------------------------------------------------------

    def pending(self, select: Callable[[Expectation], bool] | None = None) -> list[Expectation]:
        return [
            e
            for e in self.expectations
            if e.outcome is None and (select is None or select(e))
            and not e.resolve(self.follower.events(e.command_id))
        ]  # fmt: skip

    def tick(self) -> None:
        self.pending()
        done = sum(1 for e in self.expectations if e.outcome is not None)
        self.progress.update(self.task, completed=done, description=self._describe())

    def _describe(self) -> str:
        return f"[bold]{self.phase}[/bold]"

    def wait(self, timeout_s: float, select: Callable[[Expectation], bool] | None = None) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.tick()
            if not self.pending(select):
                return True
            time.sleep(0.2)
        self.tick()
        return not self.pending(select)

    def paced(self, sends: list[Callable[[], object]], duration_s: float) -> None:
        """Run ``sends`` spread evenly over ``duration_s``, updating progress meanwhile."""
        start = time.monotonic()
        for i, send in enumerate(sends):
            due = start + duration_s * i / max(1, len(sends))
            while (left := due - time.monotonic()) > 0:
                self.tick()
                time.sleep(min(left, 0.2))
            send()
        self.tick()

    def sealed_path(self, command_id: str, vehicle_id: str) -> str | None:
        for event in self.follower.events(command_id):
            if str(event.state) == "sealed" and event.vehicle_id == vehicle_id:
                found = _KEY_PATH_RE.search(event.detail)
                return found.group(1).rstrip(",") if found else None
        return None

    # -- the story ------------------------------------------------------------------------

    def play(self, console: Console) -> None:
        opts = self.options
        fleet = self.fleet
        singles = opts.commands - 3  # three group commands
        share = [int(singles * 0.4), int(singles * 0.3)]
        share.append(singles - sum(share))
        targets = [*fleet.vehicles, *fleet.vehicles, *fleet.edge]  # edge units ~2-4 %

        def single() -> Callable[[], object]:
            return lambda: self.routine(self.rng.choice(targets))

        # Ready: one command per kind of recipient proves the pipeline is up end to end.
        self.enter("warm-up")
        console.print("[bold]5/7[/bold] warm-up: one command each to a PQC vehicle, a legacy "
                      "vehicle and an edge unit")  # fmt: skip
        first = self.routine(fleet.pqc[0], "ping")
        for vid in [*fleet.legacy[:1], fleet.edge[0]]:
            self.routine(vid, "ping")
        if not self.wait(120):
            raise ConfigError("the pipeline did not complete the warm-up commands in 120 s")
        for e in self.expectations:
            e.case = "warm-up"

        self.enter("1 QKD link up")
        console.print("[bold]6/7[/bold] scenario: routine traffic, approvals, attacks, "
                      "QKD outage and recovery")  # fmt: skip
        self.high("high-criticality, no approval", fleet.pqc[1], None,
                  CommandState.REJECTED, ReasonCode.POLICY_DENIED)  # fmt: skip
        self.high("high-criticality, approved", fleet.pqc[2], "approve",
                  CommandState.SUCCEEDED, None)  # fmt: skip
        self.high("high-criticality, denied by the approver", fleet.pqc[3], "deny",
                  CommandState.REJECTED, ReasonCode.POLICY_DENIED)  # fmt: skip
        enclave_ok = self.high("high-criticality to an edge unit (enclave: QKD only), approved",
                               fleet.edge[0], "approve", CommandState.SUCCEEDED, None)  # fmt: skip
        self.attacks()
        self.routine("north", "set_climate", group=True)
        self.routine("depot", "push_route", group=True)
        self.replay(first)
        self.paced([single() for _ in range(share[0])], opts.outage_s)
        # No QKD-keyed envelope may be in flight when the link drops (its key could not be
        # fetched at KME-B any more); wait for the edge units' commands.
        self.wait(60, lambda e: e.vehicle_id in fleet.edge)

        self.enter("2 QKD link DOWN")
        self.kme.admin("/admin/link", {"up": False})
        down_at = time.monotonic()
        sends = [single() for _ in range(share[1])]
        for k, eid in enumerate(fleet.edge):
            sends.insert(k * max(1, len(sends) // len(fleet.edge)), self._edge_ping(eid))
        self.paced(sends, opts.outage_s)
        self.high("enclave command during the QKD outage (no fallback)", fleet.edge[1],
                  "approve", CommandState.REJECTED, ReasonCode.KEY_PATH_EXHAUSTED)  # fmt: skip
        self.wait(60, lambda e: e.vehicle_id in fleet.edge or e.reason == "key_path_exhausted")
        outage_s = time.monotonic() - down_at

        self.enter("3 QKD link up again")
        self.kme.admin("/admin/link", {"up": True})
        up_at = time.monotonic()
        self.routine("south", "lock_doors", group=True)
        sends = [single() for _ in range(share[2])]
        self.paced(sends, opts.outage_s)
        # The bus's QKD circuit breaker lets a trial through 30 s after it opened: probe the
        # edge units until an envelope is QKD-keyed again.
        probes: list[tuple[str, str]] = []
        deadline = up_at + opts.qkd_recovery_timeout_s
        while self.qkd_restored_after_s is None and time.monotonic() < deadline:
            eid = fleet.edge[len(probes) % len(fleet.edge)]
            probes.append((self.routine(eid, "ping"), eid))
            for _ in range(10):
                self.tick()
                time.sleep(0.2)
            if any(self.sealed_path(c, v) == QKD_PATH for c, v in probes):
                self.qkd_restored_after_s = time.monotonic() - up_at
        self.outage_s = outage_s
        self.wait(opts.final_timeout_s)
        self.enter("done")
        self.tick()
        self.enclave_ok = enclave_ok

    def _edge_ping(self, eid: str) -> Callable[[], object]:
        return lambda: self.routine(eid, "ping")


# --- reading results -----------------------------------------------------------------------


def read_topic(bootstrap: str, topic: str, *, idle_s: float = 2.0) -> list[Any]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
        consumer_timeout_ms=int(idle_s * 1000),
    )
    try:
        return list(consumer)
    finally:
        consumer.close()


def scrape_failovers(metrics_url: str) -> list[dict[str, Any]]:
    """``fleetbus_keypath_failover_total`` samples from the worker's /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    rows = []
    for line in text.splitlines():
        if not line.startswith("fleetbus_keypath_failover_total{"):
            continue
        labels_text, value = line.rsplit(" ", 1)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
        if float(value) > 0:
            rows.append({**labels, "count": int(float(value))})
    return sorted(rows, key=lambda r: (-r["count"], r.get("profile", "")))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        index = min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))
        return round(ordered[index] * 1000, 1)

    return {
        "p50": round(statistics.median(ordered) * 1000, 1),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": round(ordered[-1] * 1000, 1),
    }


def evaluate(
    scenario: Scenario,
    fleet: DemoFleet,
    settings: FleetbusSettings,
    executions: Counter[tuple[str, str]],
    fleet_stats: Mapping[str, int],
    failovers: list[dict[str, Any]],
    report: DemoReport,
) -> None:
    """Fill ``report`` from the status events, topics, journal and metrics; one Check per
    expectation of the scenario."""
    from fleetbus.bus.envelope import decode_envelope
    from fleetbus.processors.audit import verify_entries
    from fleetbus.processors.eos import DeadLetter
    from fleetbus.sdk.vehicle import load_key_directory

    bootstrap = settings.kafka_bootstrap
    t = settings.topics
    exps = scenario.expectations
    routine = [e for e in exps if e.routine]
    cases = [e for e in exps if not e.routine]
    checks = report.checks

    # Envelopes actually sent to vehicles, with their key paths.
    paths: dict[tuple[str, str], str] = {}
    for r in read_topic(bootstrap, t.full(t.commands_outbound)):
        cid = dict(r.headers or []).get("fleetbus-command-id", b"").decode()
        paths[(cid, r.key.decode())] = decode_envelope(r.value).header.key_path
    report.envelopes_by_path = dict(Counter(paths.values()).most_common())
    edge = set(fleet.edge)
    by_phase: dict[str, Counter[str]] = {}
    for (cid, vid), path in paths.items():
        if vid in edge:
            by_phase.setdefault(scenario.phase_of.get(cid, "?"), Counter())[path] += 1
    order = {phase: i for i, phase in enumerate(scenario.phases)}
    report.edge_paths_by_phase = {
        k: dict(v) for k, v in sorted(by_phase.items(), key=lambda kv: order.get(kv[0], 99))
    }

    # Outcomes.
    succeeded = [e for e in exps if e.outcome is not None and str(e.outcome.state) == "succeeded"]
    failed = [e for e in exps if e.outcome is not None and str(e.outcome.state) == "failed"]
    rejected = Counter(
        e.outcome.reason.value if e.outcome.reason else "?"
        for e in exps
        if e.outcome is not None and str(e.outcome.state) in ("rejected", "expired")
    )
    report.rejected_by_reason = dict(rejected.most_common())
    letters = [DeadLetter.decode(r.value) for r in read_topic(bootstrap, t.full(t.dlq))]
    report.dlq_by_reason = dict(Counter(d.reason.value for d in letters).most_common())
    duplicates = sum(n - 1 for n in executions.values() if n > 1)
    routine_pairs = {(e.command_id, e.vehicle_id or "") for e in routine}
    once = sum(1 for pair in routine_pairs if executions[pair] == 1)
    rejected_ids = {e.command_id for e in cases if e.state != "succeeded"}
    replayed_ids = {e.command_id for e in cases if e.reason == ReasonCode.REPLAYED.value}
    bad_runs = sum(n for (cid, _), n in executions.items() if cid in rejected_ids - replayed_ids)
    report.sent = dict(sorted(scenario.sent.items()))
    report.counts = {
        "routine deliveries expected (command x vehicle)": len(routine_pairs),
        "envelopes sealed to vehicles": len(paths),
        "delivered (answered by the vehicle)": len(succeeded) + len(failed),
        "succeeded": len(succeeded),
        "failed": len(failed),
        "executed exactly once (routine)": once,
        "duplicate executions": duplicates,
        "executions of rejected commands": bad_runs,
        "redeliveries answered from the store": int(fleet_stats.get("redeliveries", 0)),
        "vehicle-side envelope rejects": int(fleet_stats.get("envelope_rejects", 0)),
    }
    report.failovers = failovers
    timed = [e for e in routine if e.case != "warm-up" and e.held and e.outcome is not None]
    report.latency_ms = percentiles([e.outcome.at - e.sent_at for e in timed if e.outcome])
    fan_out = Counter(e.command_id for e in routine)
    singles = [e for e in timed if fan_out[e.command_id] == 1]
    to_sealed: list[float] = []
    sealed_to_done: list[float] = []
    for e in timed:
        sealed = next(
            (x.at for x in scenario.follower.events(e.command_id)
             if str(x.state) == "sealed" and x.vehicle_id == e.vehicle_id),
            None,
        )  # fmt: skip
        if sealed is not None and e.outcome is not None:
            to_sealed.append(sealed - e.sent_at)
            sealed_to_done.append(e.outcome.at - sealed)
    report.latency_split_ms = {
        "single-vehicle commands": percentiles(
            [e.outcome.at - e.sent_at for e in singles if e.outcome]
        ),
        "dispatch → sealed": percentiles(to_sealed),
        "sealed → succeeded (vehicle and back)": percentiles(sealed_to_done),
    }

    # --- checks ---------------------------------------------------------------------------
    ok_routine = [e for e in routine if e.held]
    checks.append(Check("routine commands succeeded", f"{len(routine)} of {len(routine)}",
                        f"{len(ok_routine)} of {len(routine)}",
                        len(ok_routine) == len(routine)))  # fmt: skip
    checks.append(Check("each routine command executed exactly once per vehicle",
                        f"{len(routine_pairs)}", f"{once} (duplicates {duplicates})",
                        once == len(routine_pairs) and duplicates == 0))  # fmt: skip
    checks.append(Check("rejected commands never executed", "0", str(bad_runs), bad_runs == 0))
    for e in cases:
        expected = e.state + (f" ({e.reason})" if e.reason else "")
        checks.append(Check(e.case, expected, e.observed, e.held))
    checks.append(Check("junk bytes on commands.requested", "DLQ (malformed)",
                        f"DLQ malformed: {report.dlq_by_reason.get('malformed', 0)}",
                        report.dlq_by_reason.get("malformed", 0) >= 1))  # fmt: skip
    legacy = set(fleet.legacy)
    legacy_paths = Counter(p for (_, v), p in paths.items() if v in legacy)
    pqc_paths = Counter(p for (_, v), p in paths.items() if v not in legacy and v not in edge)
    checks.append(Check("legacy vehicles (no PQC) sealed on x25519, visibly", "x25519 only",
                        _fmt(legacy_paths), set(legacy_paths) <= {"x25519"}))  # fmt: skip
    checks.append(Check("PQC vehicles never downgraded", "xwing only", _fmt(pqc_paths),
                        set(pqc_paths) == {"xwing"}))  # fmt: skip
    p1 = by_phase.get("1 QKD link up", Counter())
    p2 = by_phase.get("2 QKD link DOWN", Counter())
    checks.append(Check("edge units before the outage", f"{QKD_PATH} only", _fmt(p1),
                        bool(p1) and set(p1) == {QKD_PATH}))  # fmt: skip
    checks.append(Check("edge units during the outage: failover to xwing", "xwing only",
                        _fmt(p2), bool(p2) and set(p2) == {"xwing"}))  # fmt: skip
    standard = sum(
        r["count"] for r in failovers
        if r.get("profile") == "standard" and r.get("to_path") == "xwing"
    )  # fmt: skip
    checks.append(Check("failover metric (standard → xwing)", ">= 1", str(standard),
                        standard >= 1))  # fmt: skip
    restored = scenario.qkd_restored_after_s
    checks.append(Check("QKD key path back after the link came up",
                        f"within {scenario.options.qkd_recovery_timeout_s:.0f} s",
                        f"after {restored:.1f} s" if restored is not None else "not seen",
                        restored is not None))  # fmt: skip
    enclave_path = paths.get((scenario.enclave_ok, fleet.edge[0]))
    checks.append(Check("enclave command keyed by QKD", QKD_PATH, str(enclave_path),
                        enclave_path == QKD_PATH))  # fmt: skip
    audit = read_topic(bootstrap, t.full(t.audit))
    verdict = verify_entries(
        [(r.offset, r.key, r.value) for r in audit],
        load_key_directory(fleet.keys_dir),
        checkpoint_signer=settings.sealer_principal,
        max_checkpoint_every=settings.audit_checkpoint_every,
    )
    records = sum(verdict.records.values())
    checkpoints = sum(verdict.checkpoints.values())
    unsigned = sum(verdict.unsigned_tail.values())
    checks.append(Check("audit trail verifies (hash chain + signed checkpoints)", "OK",
                        f"{'OK' if verdict.ok else 'BROKEN'}: {records} records, "
                        f"{checkpoints} checkpoints, {unsigned} not yet signed",
                        verdict.ok and records > 0 and checkpoints > 0))  # fmt: skip


def _fmt(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


# --- rendering -----------------------------------------------------------------------------


def summary_tables(report: DemoReport) -> list[Table]:
    """The summary (counts, reasons, key paths, failovers, latency) and the verdict."""
    summary = Table(title="fleetbus demo — summary", title_justify="left")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    f = report.fleet
    summary.add_row(
        "fleet",
        f"{f.get('vehicles', 0)} vehicles ({f.get('pqc', 0)} PQC, {f.get('legacy', 0)} legacy) "
        f"+ {f.get('edge', 0)} QKD edge units",
    )
    summary.add_row("commands sent", str(sum(report.sent.values())))
    for kind, n in report.sent.items():
        summary.add_row(f"  {kind}", str(n))
    for key, value in report.counts.items():
        summary.add_row(key, str(value))
    summary.add_row("rejected by reason", _fmt(report.rejected_by_reason))
    summary.add_row("DLQ records by reason", _fmt(report.dlq_by_reason))
    summary.add_row("envelopes by key path", _fmt(report.envelopes_by_path))
    for phase, paths in report.edge_paths_by_phase.items():
        summary.add_row(f"  edge units, phase {phase}", _fmt(paths))
    for row in report.failovers:
        summary.add_row(
            f"failover {row.get('profile')}: {row.get('from_path')} → {row.get('to_path')}",
            f"{row['count']} ({row.get('reason')})",
        )
    lat = report.latency_ms
    if lat:
        summary.add_row(
            "end-to-end latency (dispatch → succeeded)",
            f"p50 {lat['p50']:.0f} ms  p95 {lat['p95']:.0f} ms  p99 {lat['p99']:.0f} ms",
        )
    for what, split in report.latency_split_ms.items():
        if split:
            summary.add_row(
                f"  {what}",
                f"p50 {split['p50']:.0f} ms  p95 {split['p95']:.0f} ms  p99 {split['p99']:.0f} ms",
            )
    for what, seconds in report.timings_s.items():
        summary.add_row(what, f"{seconds:.1f} s")
    verdict = Table(title="scenario expectations", title_justify="left")
    verdict.add_column("case")
    verdict.add_column("expected")
    verdict.add_column("observed")
    verdict.add_column("", justify="center")
    for c in report.checks:
        verdict.add_row(c.name, c.expected, c.observed, "✔" if c.ok else "[red]✘[/red]")
    return [summary, verdict]


# --- orchestration -------------------------------------------------------------------------


def _delete_topics(bootstrap: str, prefix: str, app_id: str) -> None:
    """Remove this run's topics from a broker (best effort)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    try:
        names = [n for n in admin.list_topics() if n.startswith(prefix) or n.startswith(app_id)]
        if names:
            admin.delete_topics(names, timeout_ms=15000)
    finally:
        admin.close()


@dataclass
class _Running:
    """What the demo started, so that ``finally`` stops exactly that."""

    children: list[ChildProcess] = field(default_factory=list)
    kme: Any = None

    def stop_all(self, console: Console) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as exc:  # keep stopping the others
                console.print(f"[red]could not stop {child.name}: {exc}[/red]")
        if self.kme is not None:
            try:
                self.kme.stop()
            except Exception as exc:
                console.print(f"[red]could not stop the KME pair: {exc}[/red]")


def run_demo(
    options: DemoOptions,
    *,
    console: Console,
    bootstrap: str | None = None,
    base_port: int = 19092,
    kafka_home: Path | None = None,
    workdir: Path | None = None,
    keep_workdir: bool = False,
) -> DemoReport:
    """Run the whole demo and return its report. Everything started here is stopped here."""
    from fleetbus.devtools.kafka import LocalKafka, cache_root, free_port
    from fleetbus.devtools.kme import KMEPairProcess
    from fleetbus.processors.app import ensure_pipeline_topics

    options.check()
    report = DemoReport()
    started = time.monotonic()
    run = uuid.uuid4().hex[:8]
    own_workdir = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="fleetbus-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    report.workdir = str(work)
    cluster: LocalKafka | None = None
    running = _Running()
    settings: FleetbusSettings | None = None
    failed = True
    scenario_done = threading.Event()
    with ExitStack() as stack:
        try:
            # 1. Kafka
            if bootstrap is None:
                home = kafka_home or cache_root() / "run" / "kafka-1"
                candidate = LocalKafka(home=home, brokers=1, base_port=base_port)
                if candidate.answers_metadata(timeout_s=2):
                    console.print(f"[bold]1/7[/bold] using the Kafka running at "
                                  f"{candidate.bootstrap}")  # fmt: skip
                    report.kafka = f"reused {candidate.bootstrap}"
                else:
                    console.print("[bold]1/7[/bold] starting Apache Kafka (KRaft) on 127.0.0.1 …")
                    cluster = candidate
                    version = cluster.up()
                    console.print(f"      Kafka {version} ready at {cluster.bootstrap}")
                    report.kafka = f"started Kafka {version} at {cluster.bootstrap}"
                bootstrap = candidate.bootstrap
            else:
                console.print(f"[bold]1/7[/bold] using the Kafka at {bootstrap}")
                report.kafka = f"given {bootstrap}"
            report.timings_s["kafka ready after"] = time.monotonic() - started

            # 2. keys and the KME pair
            console.print(f"[bold]2/7[/bold] keys for {options.vehicles} vehicles "
                          f"({options.legacy_count} legacy) and {options.edge_units} edge "
                          "units; KME pair with its PKI")  # fmt: skip
            fleet = build_demo_keys(work / "keys", options)
            report.fleet = {
                "vehicles": len(fleet.vehicles),
                "pqc": len(fleet.pqc),
                "legacy": len(fleet.legacy),
                "edge": len(fleet.edge),
            }
            kme = KMEPairProcess(work / "kme", sae_a=[HUB_SAE], sae_b=list(fleet.edge_sae.values()))
            running.kme = kme
            kme.start()
            if kme.pid is not None:
                report.processes["kme"] = kme.pid

            # 3. topics and the worker
            settings = FleetbusSettings(
                kafka_bootstrap=bootstrap,
                app_id=f"fleetbus-demo-{run}",
                partitions=options.partitions,
                topics=TopicNames(prefix=f"demo-{run}."),
                keys_dir=str(fleet.keys_dir),
            )
            # The topics the worker creates, created up front so the status follower can start.
            ensure_pipeline_topics(settings)
            metrics_port = free_port()
            env = base_env(settings, work)
            pki = kme.pki
            worker_env = {
                **env,
                "FLEETBUS_PIPELINE": "on",
                "FLEETBUS_WEB_PORT": "0",
                "FLEETBUS_METRICS_PORT": str(metrics_port),
                "FLEETBUS_APPROVAL_WINDOW_S": str(options.approval_window_s),
                "FLEETBUS_TICK_INTERVAL_S": "0.5",
                # Probe a tripped QKD path after 5 s, so recovery shows within the demo.
                "FLEETBUS_KEYPATH_BREAKER_RESET_S": "5",
                "FLEETBUS_AUDIT_CHECKPOINT_EVERY": "25",
                "FLEETBUS_QKD_KME_URL": kme.urls["kme_a"],
                "FLEETBUS_QKD_KME_ID": kme.kme_id("kme_a"),
                "FLEETBUS_QKD_SAE_ID": HUB_SAE,
                "FLEETBUS_QKD_CA_FILE": str(pki / "ca.pem"),
                "FLEETBUS_QKD_CERT_FILE": str(pki / f"{HUB_SAE}.pem"),
                "FLEETBUS_QKD_KEY_FILE": str(pki / f"{HUB_SAE}.key"),
            }
            console.print("[bold]3/7[/bold] starting the processors (fleetbus worker: authorize, "
                          f"seal, track, telemetry; /metrics on :{metrics_port})")  # fmt: skip
            worker = ChildProcess(
                "worker",
                [sys.executable, "-m", "fleetbus.cli.main", "worker"],
                worker_env,
                work / "worker.log",
            )
            running.children.append(worker)
            report.processes["worker"] = worker.pid

            # 4. the fleet
            spec = {
                "keys_dir": str(fleet.keys_dir),
                "store_dir": str(work / "fleet-store"),
                "journal": str(work / "executions.log"),
                "stats": str(work / "fleet-stats.json"),
                "pqc": fleet.pqc,
                "legacy": fleet.legacy,
                "edge": {
                    eid: kme.provider_config(sae, master_sae_id=HUB_SAE)
                    for eid, sae in fleet.edge_sae.items()
                },
            }
            (work / "fleet.json").write_text(json.dumps(spec))
            console.print(f"[bold]4/7[/bold] starting the simulated fleet "
                          f"({len(fleet.vehicles) + len(fleet.edge)} vehicle agents)")  # fmt: skip
            fleet_proc = ChildProcess(
                "fleet",
                [sys.executable, "-m", "fleetbus.devtools.demo", "fleet", str(work / "fleet.json")],
                env,
                work / "fleet.log",
            )
            running.children.append(fleet_proc)
            report.processes["fleet"] = fleet_proc.pid
            report.timings_s["processes started after"] = time.monotonic() - started

            follower = StatusFollower(settings)
            stack.callback(follower.close)
            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("outcomes"),
                TimeElapsedColumn(),
                console=console,
            )
            scenario = Scenario(settings, fleet, options, kme, follower, progress)
            stack.callback(scenario.close)
            scenario_started = time.monotonic()
            with progress:
                threading.Thread(
                    target=_watch, args=(running.children, scenario_done, console), daemon=True
                ).start()
                scenario.play(console)
            scenario_done.set()
            report.timings_s["scenario"] = time.monotonic() - scenario_started
            if scenario.outage_s:
                report.timings_s["QKD link down for"] = scenario.outage_s

            # 7. results
            console.print("[bold]7/7[/bold] collecting results and stopping everything")
            failovers = scrape_failovers(f"http://127.0.0.1:{metrics_port}/metrics")
            fleet_proc.stop()
            fleet_stats = _read_json(work / "fleet-stats.json")
            executions = ExecutionJournal.read(work / "executions.log")
            evaluate(scenario, fleet, settings, executions, fleet_stats, failovers, report)
            failed = not report.ok
        except KeyboardInterrupt:
            console.print("[red]interrupted; stopping everything[/red]")
            raise
        finally:
            scenario_done.set()
            stack.close()
            running.stop_all(console)
            if settings is not None and bootstrap is not None:
                try:
                    _delete_topics(bootstrap, settings.topics.prefix, settings.app_id)
                except Exception as exc:
                    console.print(f"[yellow]could not delete the demo's topics: {exc}[/yellow]")
            if cluster is not None:
                cluster.down()
            report.timings_s["total"] = time.monotonic() - started
            if failed:
                console.print(f"[yellow]logs kept in {work}[/yellow]")
            elif own_workdir and not keep_workdir:
                shutil.rmtree(work, ignore_errors=True)
    return report


def _watch(children: list[ChildProcess], done: threading.Event, console: Console) -> None:
    """Fail fast when a child dies during the scenario: it would only time out otherwise.
    Interrupts the main thread (KeyboardInterrupt), whose ``finally`` stops everything."""
    while not done.wait(1.0):
        for child in children:
            if not child.running() and not done.is_set():
                console.print(
                    f"[red]{child.name} exited ({child.proc.returncode}):[/red]\n{child.output()}"
                )
                import _thread

                _thread.interrupt_main()
                return


def _read_json(path: Path) -> dict[str, int]:
    try:
        data: dict[str, int] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def processes_of(workdir: Path) -> Iterator[int]:
    """Pids of live processes whose command line or environment mentions ``workdir``."""
    needle = str(workdir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for name in ("cmdline", "environ"):
            try:
                if needle in (entry / name).read_bytes():
                    yield int(entry.name)
                    break
            except OSError:
                continue


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "fleet":
        sys.exit(run_fleet(Path(sys.argv[2])))
    sys.exit("usage: python -m fleetbus.devtools.demo fleet SPEC.json")
