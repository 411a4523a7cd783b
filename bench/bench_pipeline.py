"""What security costs: the command pipeline (authorize → seal → vehicle) against the real Kafka
broker, secure and in plaintext, side by side in one run. Not a test: numbers depend on the
machine and its load (the load average is recorded with every measurement).

    .venv/bin/python bench/bench_pipeline.py --quick            # 1 partition, 3 interleaved rounds
    .venv/bin/python bench/bench_pipeline.py                    # 1, 2 and 4 partitions
    .venv/bin/python bench/bench_pipeline.py --bootstrap 127.0.0.1:9092

Without ``--bootstrap`` the benchmark starts its own ``LocalKafka`` (a KRaft broker in a
temporary folder) and stops it at the end.

Modes, each the same topology — a worker process (or several) running the ``authorize`` and
``seal`` stages in ``processors.eos.TransactionalStage`` (the same runner, transactions, batch
size and Kafka path in every mode) and a ``VehicleAgent`` process answering on
``commands.responses``:

- ``raw``: aiokafka produce → consume on one topic with the command's record size: the ceiling
  of this client stack (one hop, no transactions).
- ``plaintext``: benchmark-only stage logic (``PlainAuthorize`` / ``PlainSeal``, below) on the
  same topics: strict CBOR decode of the signed command, routing by target vehicle, the
  authorized / outbound / status records. No signature check, no Cedar, no replay state, no
  audit chain, no envelope. The vehicle (``PlainVehicleAgent``) decodes the command, records it
  in the same execute-once SQLite store and answers with the plain response.
- ``secure``: the production stages from ``processors.app.build_pipeline`` with key epochs and
  batch signing off: per-message X-Wing KEM and composite ML-DSA-65+Ed25519 signature.
- ``secure-epochs``: the same with ``seal_epochs`` and ``batch_signing`` on (and the vehicles'
  answers on key epochs: ``VehicleAgent(uplink_epochs=...)``).

All modes of a partition count run side by side; ``--rounds`` saturation rounds are interleaved
mode by mode so that the machine's changing load hits every mode alike, and each mode reports
the median of its rounds and their spread (see bench/README.md).

Measured per (mode, partitions): sustained throughput at saturation (a backlog of commands,
completion rate between the 10th and 90th percentile of answers; a round counts as saturated
when the whole backlog was on the broker before that window opened), end-to-end latency
(publish → response record read; scheduled send time, so no coordinated omission) at 25/50/80%
of the plaintext ceiling of the same partition count (open-loop offered load), CPU seconds per
command of the worker + vehicle processes (``/proc/<pid>/stat``) and bytes per command on every
topic. Writes bench/results/pipeline.{json,md} and latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetbus.bus.keyfolder import KeyFolder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test fleet builder (integration.pipeline_support)

RESULTS = Path(__file__).parent / "results"
STAGES = ("authorize", "seal")
MODES = ("raw", "plaintext", "secure", "secure-epochs")
TARGET_RATIO = 0.75  # issue 6: secure-epochs / plaintext throughput
LOAD_FRACTIONS = (0.25, 0.5, 0.8)
VEHICLES = 16
TICKS = os.sysconf("SC_CLK_TCK")


# --- benchmark-only plaintext stage logic (same runner, same topics) -----------------------


def plain_stages(settings: Any) -> list[Any]:
    """authorize + seal without crypto and policy, run by the production TransactionalStage."""
    from fleetbus.bus.commands import CommandState, SignedCommand
    from fleetbus.bus.errors import FleetbusError, ReasonCode
    from fleetbus.processors.app import stage_runner
    from fleetbus.processors.eos import InputRecord, Output, PartitionState, StageResult
    from fleetbus.processors.stages import AuthorizedCommand, PipelineTopics, _status

    topics = PipelineTopics.from_settings(settings.topics)

    class PlainAuthorize:
        name = "authorize"

        def input_topics(self) -> Sequence[str]:
            return [topics.requested, topics.approvals]

        def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
            signed = SignedCommand.decode(record.value or b"", max_size=settings.max_message_bytes)
            command = signed.command
            vehicle = command.target.vehicle
            if vehicle is None:
                raise FleetbusError(
                    "plaintext bench: vehicle targets only", reason=ReasonCode.MALFORMED
                )
            auth = AuthorizedCommand(
                command_id=command.id,
                vehicle_id=vehicle,
                issuer=command.issuer,
                action=command.action,
                criticality="routine",
                issued_at=command.issued_at,
                expires_at=command.expires_at,
                signed_command=record.value or b"",
                decision="plaintext",
                authorized_at=now,
            )
            return StageResult(
                outputs=[
                    Output(topics.authorized, command.id.encode(), auth.encode()),
                    _status(topics, command.id, CommandState.AUTHORIZED, now, vehicle_id=vehicle),
                ]
            )

        def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
            return StageResult()

    class PlainSeal:
        name = "seal"

        def input_topics(self) -> Sequence[str]:
            return [topics.authorized]

        def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
            auth = AuthorizedCommand.decode(record.value)
            return StageResult(
                outputs=[
                    Output(
                        topics.outbound,
                        auth.vehicle_id.encode(),
                        auth.signed_command,
                        headers=(("fleetbus-command-id", auth.command_id.encode()),),
                    ),
                    _status(
                        topics,
                        auth.command_id,
                        CommandState.SEALED,
                        now,
                        detail="plaintext",
                        vehicle_id=auth.vehicle_id,
                    ),
                ]
            )

        def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
            return StageResult()

    return [stage_runner(settings, logic) for logic in (PlainAuthorize(), PlainSeal())]


def settings_from(config: dict[str, Any]) -> Any:
    from fleetbus.bus.settings import FleetbusSettings, TopicNames

    return FleetbusSettings(
        kafka_bootstrap=config["bootstrap"],
        app_id=config["app_id"],
        partitions=config["partitions"],
        topics=TopicNames(prefix=config["prefix"]),
        keys_dir=config["keys_dir"],
        data_dir=str(Path(config["keys_dir"]).parent / "state"),
        sealer_principal="bus-sealer",
        pipeline="on",
        web_port=0,
        seal_epochs=config["mode"] == "secure-epochs",
        batch_signing=config["mode"] == "secure-epochs",
        broker_session_timeout_s=10.0,
        broker_heartbeat_interval_s=1.0,
    )


def run_worker(config: dict[str, Any]) -> None:
    """Subprocess: the authorize and seal stages of one worker until SIGTERM."""
    settings = settings_from(config)
    if config["mode"] == "plaintext":
        stages = plain_stages(settings)
    else:
        from fleetbus.processors.app import build_pipeline

        stages = [s for s in build_pipeline(settings).stages if s.stage in STAGES]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: [loop.create_task(s.stop()) for s in stages])
        await asyncio.gather(*(s.run() for s in stages))

    asyncio.run(main())


def run_vehicle(config: dict[str, Any]) -> None:
    """Subprocess: a VehicleAgent (plaintext: PlainVehicleAgent) for the fleet until SIGTERM."""
    import threading

    from integration.pipeline_support import vehicle_id

    from fleetbus.bus.commands import SignedCommand
    from fleetbus.bus.directory import load_key_file
    from fleetbus.providers.sealing import EpochPolicy
    from fleetbus.sdk.vehicle import VehicleAgent, _trace_headers, load_key_directory

    settings = settings_from(config)
    keys_dir = Path(config["keys_dir"])

    class PlainVehicleAgent(VehicleAgent):
        """Same consumer/producer loop and execute-once store; no envelope, no signature."""

        def _handle(self, vehicle: Any, value: object, topic: str) -> list[Any]:
            assert isinstance(value, bytes)
            command = SignedCommand.decode(value, max_size=self._max_size).command
            return self._execute(vehicle, command, command.expires_at)

        def _publish_response(self, vehicle: Any, response: Any) -> list[Any]:
            self.stats.answered += 1
            value = response.encode()
            return [self._send(self._responses, response.command_id, value, _trace_headers())]

    cls = PlainVehicleAgent if config["mode"] == "plaintext" else VehicleAgent
    agent = cls(
        settings,
        vehicles=[
            load_key_file(KeyFolder(keys_dir).private_key(vehicle_id(n)))
            for n in range(1, VEHICLES + 1)
        ],
        directory=load_key_directory(keys_dir),
        minimum_path="xwing",
        handlers={"ping": lambda command: None},
        store_path=Path(config["store"]),
        group_id=f"{config['app_id']}.vehicles",
        uplink_epochs=EpochPolicy(settings.epoch_max_age_s, settings.epoch_max_messages)
        if settings.seal_epochs
        else None,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        agent.run(stop, poll_s=0.2)
    finally:
        agent.close()


# --- the orchestrator -----------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every CPU, every process), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


def cpu_readers(broker_pids: Sequence[int]) -> dict[str, Callable[[], float]]:
    """CPU seconds so far, apart from the mode's processes: this load generator's ("driver"),
    the whole machine's and, when its pids are known, the broker's."""
    readers: dict[str, Callable[[], float]] = {
        "driver": time.process_time,
        "machine": machine_busy_seconds,
    }
    if broker_pids:
        readers["broker"] = lambda: cpu_seconds(broker_pids)
    return readers


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Drive:
    """One load run: sent / answered, per-command latencies, timing, CPU."""

    offered_rate: float | None  # None: saturation backlog
    sent: int
    answered: int
    latencies_ms: list[float] = field(repr=False)
    completion_s: list[float] = field(repr=False)
    cpu_s: float
    cpu_by_role: dict[str, float]
    shared_cpu: dict[str, float]  # broker, driver (this process), machine: not in cpu_s
    duration_s: float
    load: list[float]
    sent_s: float = 0.0  # when the last command was acknowledged by the broker
    load_after: list[float] = field(default_factory=list)

    def window(self) -> tuple[float, float] | None:
        """The 10th and 90th percentile of completion times (seconds after the first send)."""
        done = sorted(self.completion_s)
        if len(done) < 20:
            return None
        return done[len(done) // 10], done[len(done) * 9 // 10]

    def throughput(self) -> float | None:
        """Answers per second between the 10th and 90th percentile of completions."""
        window = self.window()
        if window is None:
            return None
        n = len(self.completion_s)
        lo, hi = window
        return (n * 9 // 10 - n // 10) / (hi - lo) if hi > lo else None

    def saturated(self) -> bool | None:
        """A saturation drive measures the pipeline's ceiling only if its input never ran dry:
        the whole backlog was on the broker before the measuring window opened."""
        if self.offered_rate is not None:
            return None
        window = self.window()
        return window is not None and self.sent_s <= window[0] and window[1] - window[0] >= 2.0

    def per_command(self, cpu_s: float | None) -> float | None:
        """CPU milliseconds per answered command."""
        if cpu_s is None or not self.answered:
            return None
        return _round(1000 * cpu_s / self.answered)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "offered_rate": None if self.offered_rate is None else round(self.offered_rate, 1),
            "sent": self.sent,
            "answered": self.answered,
            "throughput": _round(self.throughput()),
            "achieved_rate": round(self.answered / self.duration_s, 1) if self.duration_s else 0,
            "p50_ms": _round(percentile(lat, 50)),
            "p95_ms": _round(percentile(lat, 95)),
            "p99_ms": _round(percentile(lat, 99)),
            "mean_ms": _round(statistics.fmean(lat) if lat else None),
            "cpu_ms_per_command": self.per_command(self.cpu_s),
            "cpu_ms_per_command_by_role": {
                role: self.per_command(cpu) for role, cpu in self.cpu_by_role.items()
            }
            if self.answered
            else {},
            # Everything that ran on the machine meanwhile (broker, load generator, the idle
            # modes' polling, other jobs): what the pipeline costs the machine per command.
            "machine_cpu_ms_per_command": self.per_command(self.shared_cpu["machine"]),
            # The same less the machine's idle rate (measured just before, nothing published)
            # times the run's duration: slower modes are not charged more of the idle polling.
            "machine_net_cpu_ms_per_command": self.per_command(self.shared_cpu.get("machine_net")),
            "shared_cpu_ms_per_command": {
                name: self.per_command(cpu) for name, cpu in self.shared_cpu.items()
            }
            if self.answered
            else {},
            "load_average": self.load,
            "load_average_after": self.load_after,
            **(
                {}
                if self.offered_rate is not None
                else {
                    "saturated": self.saturated(),
                    "backlog_sent_s": _round(self.sent_s),
                    "window_s": _round((w[1] - w[0]) if (w := self.window()) else None),
                }
            ),
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


async def drive(
    bootstrap: str,
    in_topic: str,
    out_topic: str,
    commands: Sequence[tuple[bytes, bytes]],
    *,
    rate: float | None,
    pids: dict[str, list[int]],
    drain_s: float,
    broker_pids: Sequence[int] = (),
    idle_rates: dict[str, float] | None = None,
) -> Drive:
    """Publish ``commands`` (key, value) to ``in_topic`` — as fast as possible, or open-loop at
    ``rate`` per second — and time each key's first record on ``out_topic``. CPU: the mode's
    worker and vehicle processes; apart from them the broker's (``broker_pids``), this load
    generator's, and the whole machine's."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await consumer.start()
    await producer.start()
    try:
        parts = consumer.partitions_for_topic(out_topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(out_topic) or set()
        tps = [TopicPartition(out_topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        scheduled: dict[bytes, float] = {}
        received: dict[bytes, float] = {}
        all_sent = asyncio.Event()

        async def collect() -> None:
            while True:
                batches = await consumer.getmany(timeout_ms=100, max_records=2000)
                now = time.monotonic()
                for records in batches.values():
                    for r in records:
                        if r.key in scheduled and r.key not in received:
                            received[r.key] = now
                if all_sent.is_set() and len(received) >= len(commands):
                    return

        collector = asyncio.create_task(collect())
        load = load_average()
        cpu0 = {role: cpu_seconds(p) for role, p in pids.items()}
        shared = cpu_readers(broker_pids)
        shared0 = {name: read() for name, read in shared.items()}
        t0 = time.monotonic()
        futures = []
        for i, (key, value) in enumerate(commands):
            if rate is not None:
                due = t0 + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                scheduled[key] = due
            else:
                scheduled[key] = time.monotonic()
            futures.append(await producer.send(in_topic, value=value, key=key))
        await asyncio.gather(*futures)
        all_sent.set()
        sent_s = time.monotonic() - t0
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(collector, timeout=drain_s)
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        end = max(received.values()) if received else time.monotonic()
        cpu = {role: cpu_seconds(p) - cpu0[role] for role, p in pids.items()}
        shared_cpu = {name: read() - shared0[name] for name, read in shared.items()}
        if idle_rates:  # what the machine burns anyway (idle polling of every mode, ...)
            elapsed = time.monotonic() - t0
            for name, idle in idle_rates.items():
                shared_cpu[f"{name}_net"] = max(0.0, shared_cpu[name] - idle * elapsed)
        return Drive(
            offered_rate=rate,
            sent=len(commands),
            answered=len(received),
            latencies_ms=[1000 * (t - scheduled[k]) for k, t in received.items()],
            completion_s=[t - t0 for t in received.values()],
            cpu_s=sum(cpu.values()),
            cpu_by_role=cpu,
            shared_cpu=shared_cpu,
            duration_s=max(end - t0, sent_s),
            load=load,
            sent_s=sent_s,
            load_after=load_average(),
        )
    finally:
        await producer.stop()
        await consumer.stop()


@dataclass
class ModeRun:
    """One mode's processes for one partition count, and its measurements round by round."""

    mode: str
    partitions: int
    workers: int
    config: dict[str, Any]
    out_topic: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    pids: dict[str, list[int]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    loads: list[dict[str, Any]] = field(default_factory=list)
    bytes_per_command: dict[str, float] | None = None
    error: str | None = None

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.rounds if r.get(key) is not None]

    def median(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.median(values) if values else None

    def row(self) -> dict[str, Any]:
        """The report row: ``saturation`` holds the medians over the rounds (throughput, CPU,
        latency) and the round closest to the median throughput for the rest."""
        if self.error is not None or not self.rounds:
            return {
                "mode": self.mode,
                "partitions": self.partitions,
                "workers": self.workers,
                "error": self.error or "no round measured",
                "rounds": self.rounds,
                "load_average": load_average(),
            }
        tput = self.median("throughput")
        closest = min(
            self.rounds,
            key=lambda r: abs((r["throughput"] or 0) - (tput or 0)),
        )
        saturation = dict(closest)
        saturation.pop("round", None)
        for key in (
            "throughput",
            "cpu_ms_per_command",
            "machine_cpu_ms_per_command",
            "machine_net_cpu_ms_per_command",
            "p50_ms",
            "p99_ms",
        ):
            saturation[key] = _round(self.median(key))
        throughputs = self.values("throughput")
        saturation["spread"] = {
            "throughput_min": _round(min(throughputs)) if throughputs else None,
            "throughput_max": _round(max(throughputs)) if throughputs else None,
            "throughput_rel_spread": _round((max(throughputs) - min(throughputs)) / tput, 3)
            if throughputs and tput
            else None,
            "cpu_ms_min": _round(min(self.values("cpu_ms_per_command"), default=None)),
            "cpu_ms_max": _round(max(self.values("cpu_ms_per_command"), default=None)),
            "saturated_rounds": sum(1 for r in self.rounds if r.get("saturated")),
        }
        row: dict[str, Any] = {
            "mode": self.mode,
            "partitions": self.partitions,
            "workers": self.workers,
            "saturation": saturation,
            "rounds": self.rounds,
            "loads": self.loads,
        }
        if self.bytes_per_command is not None:
            row["bytes_per_command"] = self.bytes_per_command
        return row


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        bootstrap: str,
        work: Path,
        broker_pids: Sequence[int] = (),
    ) -> None:
        from integration.pipeline_support import DISPATCHER, make_test_fleet

        self.args = args
        self.bootstrap = bootstrap
        self.work = work
        self.broker_pids = list(broker_pids)  # the LocalKafka's, when the benchmark started it
        # --wire2: every vehicle announces wire2, so the secure modes write wire format v2.
        caps = ["wire2"] if getattr(args, "wire2", False) else []
        self.fleet = make_test_fleet(work, vehicles=VEHICLES, vehicle_capabilities=caps)
        self.signer = self.fleet.signer(DISPATCHER)
        self.dispatcher = DISPATCHER
        self.results: list[dict[str, Any]] = []
        self.ceiling: dict[int, float] = {}

    def commands(self, count: int) -> list[tuple[bytes, bytes]]:
        """Signed ping commands round-robin over the vehicles (signing is not measured)."""
        from integration.pipeline_support import vehicle_id

        from fleetbus.bus.commands import Command, SignedCommand, Target

        out = []
        for i in range(count):
            command = Command.create(
                issuer=self.dispatcher,
                target=Target(vehicle=vehicle_id(i % VEHICLES + 1)),
                action="ping",
                params={"seq": i, "note": "benchmark"},
                ttl_s=600.0,
            )
            out.append((command.id.encode(), SignedCommand.sign(command, self.signer).encode()))
        return out

    def topics(self, mode: str, partitions: int) -> dict[str, Any]:
        from fleetbus.processors.app import ensure_pipeline_topics

        run = uuid.uuid4().hex[:8]
        config = {
            "bootstrap": self.bootstrap,
            "app_id": f"bench-{mode}-{partitions}-{run}",
            "prefix": f"b{run}.",
            "partitions": partitions,
            "keys_dir": str(self.fleet.keys_dir),
            "mode": mode,
        }
        settings = settings_from(config)
        config["all_topics"] = ensure_pipeline_topics(settings)
        config["requested"] = settings.topics.full(settings.topics.commands_requested)
        config["responses"] = settings.topics.full(settings.topics.commands_responses)
        return config

    def spawn(self, role: str, config: dict[str, Any], index: int) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{config['app_id']}-{role}-{index}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(  # noqa: S603 (this script, with our own JSON)
            [sys.executable, __file__, f"_{role}", json.dumps(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        return proc

    def start_mode(self, mode: str, partitions: int, workers: int) -> ModeRun:
        """Create the mode's topics, start its worker and vehicle processes and warm them up."""
        print(f"== start {mode}, {partitions} partition(s), {workers} worker(s)", flush=True)
        config = self.topics(mode, partitions)
        run = ModeRun(
            mode=mode,
            partitions=partitions,
            workers=workers if mode != "raw" else 0,
            config=config,
            out_topic=config["requested"] if mode == "raw" else config["responses"],
        )
        if mode != "raw":
            for i in range(workers):
                run.procs.append(self.spawn("worker", config, i))
                vconf = {**config, "store": str(self.work / f"{config['app_id']}-{i}.sqlite")}
                run.procs.append(self.spawn("vehicle", vconf, i))
        run.pids = {
            role: [p.pid for p in run.procs if p.args[2] == f"_{role}"]
            for role in ("worker", "vehicle")
        }
        try:
            if mode != "raw":
                self.warm_up(config, run.out_topic, run.pids)
        except Exception as exc:
            run.error = str(exc)
            print(f"   FAILED: {exc}\n{self.log_tail(config)}", file=sys.stderr, flush=True)
            self.stop_mode(run)
        return run

    def idle_rates(self, seconds: float = 2.0) -> dict[str, float]:
        """CPU seconds per second that the broker and the machine spend with nothing published
        (every mode's processes polling, the broker's housekeeping, other jobs)."""
        readers = cpu_readers(self.broker_pids)
        del readers["driver"]  # this process, asleep meanwhile
        before = {name: read() for name, read in readers.items()}
        t0 = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        return {name: (read() - before[name]) / elapsed for name, read in readers.items()}

    def saturate(self, run: ModeRun, round_no: int) -> None:
        """One saturation measurement: a backlog of commands published as fast as possible."""
        backlog = self.args.raw_backlog if run.mode == "raw" else self.args.backlog
        idle = self.idle_rates()
        try:
            sat = asyncio.run(
                drive(
                    self.bootstrap,
                    run.config["requested"],
                    run.out_topic,
                    self.commands(backlog),
                    rate=None,
                    pids=run.pids,
                    broker_pids=self.broker_pids,
                    idle_rates=idle,
                    drain_s=self.args.drain_s * 6,
                )
            )
        except Exception as exc:
            run.error = f"round {round_no}: {exc}"
            print(f"   FAILED: {run.error}\n{self.log_tail(run.config)}", file=sys.stderr)
            self.stop_mode(run)
            return
        summary = {"round": round_no, **sat.summary()}
        run.rounds.append(summary)
        print(f"   round {round_no} {run.mode}: {json.dumps(summary)}", flush=True)

    def offered_loads(self, run: ModeRun, ceiling: float) -> None:
        """Latency at 25/50/80% of the plaintext ceiling (open-loop)."""
        for fraction in LOAD_FRACTIONS:
            rate = fraction * ceiling
            n = max(10, int(rate * self.args.duration_s))
            d = asyncio.run(
                drive(
                    self.bootstrap,
                    run.config["requested"],
                    run.out_topic,
                    self.commands(n),
                    rate=rate,
                    pids=run.pids,
                    broker_pids=self.broker_pids,
                    drain_s=self.args.drain_s,
                )
            )
            summary = {"fraction": fraction, **d.summary()}
            run.loads.append(summary)
            print(f"   {run.mode} {fraction:.0%}: {json.dumps(summary)}", flush=True)

    def stop_mode(self, run: ModeRun) -> None:
        for p in run.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in run.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        run.procs = []

    def run_partitions(self, modes: Sequence[str], partitions: int, workers: int) -> list[ModeRun]:
        """All modes of one partition count: start them all, then ``--rounds`` rounds of
        saturation measurements interleaved mode by mode (plaintext, secure-epochs, plaintext,
        ... so that a change of the machine's load hits every mode alike), then the latency
        runs and the bytes per command of each mode."""
        runs = [self.start_mode(mode, partitions, workers) for mode in modes]
        try:
            for round_no in range(1, self.args.rounds + 1):
                print(f"== round {round_no}/{self.args.rounds}, load {load_average()}", flush=True)
                for run in runs:
                    if run.error is None:
                        self.saturate(run, round_no)
            plain = next((r for r in runs if r.mode == "plaintext" and r.error is None), None)
            ceiling = plain.median("throughput") if plain else None
            for run in runs:
                if run.error is not None:
                    continue
                try:
                    if ceiling:
                        self.offered_loads(run, ceiling)
                    if run.mode != "raw":
                        run.bytes_per_command = self.wire_bytes(run.config)
                except Exception as exc:
                    run.error = str(exc)
                    print(f"   FAILED: {exc}\n{self.log_tail(run.config)}", file=sys.stderr)
        finally:
            for run in runs:
                self.stop_mode(run)
        return runs

    def warm_up(self, config: dict[str, Any], out_topic: str, pids: dict[str, list[int]]) -> None:
        """Until two rounds of commands come back complete (assignment settled, epochs up)."""
        deadline = time.monotonic() + 300
        good = 0
        while good < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up of {config['app_id']} did not finish")
            d = asyncio.run(
                drive(
                    self.bootstrap,
                    config["requested"],
                    out_topic,
                    self.commands(2 * VEHICLES),
                    rate=None,
                    pids=pids,
                    drain_s=60,
                )
            )
            good = good + 1 if d.answered == d.sent else 0

    def log_tail(self, config: dict[str, Any], lines: int = 15) -> str:
        out = []
        for log in sorted(self.work.glob(f"{config['app_id']}-*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def wire_bytes(self, config: dict[str, Any]) -> dict[str, float]:
        """Bytes (key + value + headers) per answered command on every topic of the run."""
        return asyncio.run(_topic_bytes(self.bootstrap, config))


async def _topic_bytes(bootstrap: str, config: dict[str, Any]) -> dict[str, float]:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [
            TopicPartition(t, p)
            for t in config["all_topics"]
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        sizes: dict[str, int] = {}
        counts: dict[str, int] = {}
        pending = {tp for tp in tps if ends[tp] > 0}
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for tp, records in batches.items():
                for r in records:
                    size = len(r.key or b"") + len(r.value or b"")
                    size += sum(len(k) + len(v) for k, v in (r.headers or ()))
                    sizes[tp.topic] = sizes.get(tp.topic, 0) + size
                    counts[tp.topic] = counts.get(tp.topic, 0) + 1
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    prefix = config["prefix"]
    commands = counts.get(config["requested"], 0) or 1
    out = {t.removeprefix(prefix): round(sizes[t] / commands, 1) for t in sorted(sizes)}
    out["total"] = round(sum(sizes.values()) / commands, 1)
    return out


# --- reporting ------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Pipeline benchmark: what security costs",
        "",
        f"Run {report['started']} on {report['machine']['cpus']} CPU(s), "
        f"{report['machine']['python']}, Kafka at {report['kafka']}; "
        f"load average before/after: {report['load_before']} / {report['load_after']}. "
        f"Mode: {'quick' if report['quick'] else 'full'}.",
        "",
        "## Saturation (median of the rounds)",
        "",
        f"{report['rounds']} rounds of {report['backlog']} commands per mode, interleaved.",
        "",
        "| mode | partitions | workers | commands/s (median) | min-max | ratio to plaintext "
        "| ratio paired by round (min-max) | CPU ms/command (min-max) | CPU ratio "
        "| machine CPU ms/command (broker) | the same less idle | bytes/command "
        "| p50 ms (backlog) "
        "| saturated rounds | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        sat = row["saturation"]
        spread = sat["spread"]
        paired = row.get("ratio_paired", {})
        lines.append(
            f"| {row['mode']} | {row['partitions']} | {row['workers']} | {sat['throughput']} "
            f"| {spread['throughput_min']}-{spread['throughput_max']} | {row.get('ratio', '')} "
            f"| {paired.get('median')} ({paired.get('min')}-{paired.get('max')}) "
            f"| {sat['cpu_ms_per_command'] or ''} ({spread['cpu_ms_min']}-{spread['cpu_ms_max']}) "
            f"| {row.get('ratio_cpu') or ''} "
            f"| {sat.get('machine_cpu_ms_per_command')} "
            f"({sat.get('shared_cpu_ms_per_command', {}).get('broker')}) "
            f"| {sat.get('machine_net_cpu_ms_per_command')} "
            f"| {row.get('bytes_per_command', {}).get('total', '')} | {sat['p50_ms']} "
            f"| {spread['saturated_rounds']}/{len(row['rounds'])} "
            f"| {', '.join(str(r['load_average'][0]) for r in row['rounds'])} |"
        )
    lines += [
        "",
        "## Rounds",
        "",
        "| round | mode | partitions | commands/s | CPU ms/command (worker / vehicle) "
        "| machine CPU ms/command (broker / load generator) "
        "| saturated | backlog sent s | window s | load avg before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(
        ((r["round"], row) for row in report["rows"] for r in row["rounds"]),
        key=lambda item: (item[1]["partitions"], item[0]),
    )
    for round_no, row in ordered:
        r = row["rounds"][round_no - 1]
        roles = r.get("cpu_ms_per_command_by_role", {})
        shared = r.get("shared_cpu_ms_per_command", {})
        lines.append(
            f"| {round_no} | {row['mode']} | {row['partitions']} | {r['throughput']} "
            f"| {r['cpu_ms_per_command']} ({roles.get('worker')} / {roles.get('vehicle')}) "
            f"| {r.get('machine_cpu_ms_per_command')} ({shared.get('broker')} / "
            f"{shared.get('driver')}) "
            f"| {r.get('saturated')} | {r.get('backlog_sent_s')} | {r.get('window_s')} "
            f"| {r['load_average'][0]} / {(r.get('load_average_after') or [None])[0]} |"
        )
    lines += [
        "",
        "## Latency at offered load (fraction of the plaintext ceiling, same partitions)",
        "",
        "| mode | partitions | offered/s | answered/sent | p50 ms | p95 ms | p99 ms "
        "| CPU ms/command | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        for load in row["loads"]:
            lines.append(
                f"| {row['mode']} | {row['partitions']} | {load['offered_rate']} "
                f"({load['fraction']:.0%}) | {load['answered']}/{load['sent']} "
                f"| {load['p50_ms']} | {load['p95_ms']} | {load['p99_ms']} "
                f"| {load['cpu_ms_per_command']} | {load['load_average'][0]} |"
            )
    lines += ["", "## Bytes per command on each topic", ""]
    for row in report["rows"]:
        if "bytes_per_command" in row:
            parts = ", ".join(f"{k}: {v}" for k, v in row["bytes_per_command"].items())
            lines.append(f"- {row['mode']} / {row['partitions']} partition(s): {parts}")
    for row in report["failed"]:
        lines.append(
            f"- FAILED: {row['mode']} / {row['partitions']} partition(s): {row['error']} "
            f"(load average {row['load_average']}, {len(row['rounds'])} round(s) measured)"
        )
    lines += ["", *[f"- {note}" for note in report["notes"]], ""]
    if "floor" in report:
        import bench_floor

        lines += bench_floor.markdown(report["floor"])
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = sorted({row["partitions"] for row in report["rows"]})
    fig, axes = plt.subplots(1, len(partitions), figsize=(6 * len(partitions), 4.5), squeeze=False)
    for ax, p in zip(axes[0], partitions, strict=True):
        for row in report["rows"]:
            if row["partitions"] != p or not row["loads"]:
                continue
            xs = [load["offered_rate"] for load in row["loads"]]
            for q, style in (("p50_ms", "-o"), ("p99_ms", "--x")):
                ys = [load[q] for load in row["loads"]]
                ax.plot(xs, ys, style, label=f"{row['mode']} {q[:3]}")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (commands/s)")
        ax.set_ylabel("end-to-end latency (ms)")
        ax.set_title(f"{p} partition(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(report: dict[str, Any]) -> None:
    print()
    print(
        f"{'mode':<14}{'P':>3}{'W':>3}{'cmd/s':>10}{'spread':>8}{'ratio':>7}{'paired':>8}"
        f"{'cpu ms':>8}{'cpu r':>7}{'mach ms':>8}{'B/cmd':>8}"
        f"{'p50@25%':>9}{'p99@25%':>9}{'p50@50%':>9}{'p99@50%':>9}{'p50@80%':>9}{'p99@80%':>9}"
    )
    for row in report["rows"]:
        sat = row["saturation"]
        cells = []
        for load in row["loads"]:
            cells += [load["p50_ms"], load["p99_ms"]]
        cells += [None] * (6 - len(cells))
        print(
            f"{row['mode']:<14}{row['partitions']:>3}{row['workers']:>3}"
            f"{sat['throughput'] or 0:>10.1f}{sat['spread']['throughput_rel_spread'] or 0:>8.2f}"
            f"{row.get('ratio') or 0:>7.2f}{row['ratio_paired']['median'] or 0:>8.2f}"
            f"{sat['cpu_ms_per_command'] or 0:>8.2f}{row.get('ratio_cpu') or 0:>7.2f}"
            f"{sat.get('machine_cpu_ms_per_command') or 0:>8.2f}"
            f"{row.get('bytes_per_command', {}).get('total', 0):>8.0f}"
            + "".join(f"{c if c is not None else float('nan'):>9.1f}" for c in cells)
        )
    print("spread: (max - min) / median of the rounds' throughput; paired: median per-round ratio")
    print("cpu ms: worker + vehicle processes; mach ms: the whole machine (broker, driver, all)")
    print()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 partition, short runs")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting a LocalKafka")
    parser.add_argument("--partitions", type=int, nargs="*", help="default: 1 2 4 (quick: 1)")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--rounds",
        type=int,
        help="saturation rounds per mode, interleaved mode by mode (default 3; full run 5)",
    )
    parser.add_argument("--backlog", type=int, help="commands per saturation round")
    parser.add_argument(
        "--wire2",
        action="store_true",
        help="vehicles announce wire2: the secure modes write wire format v2",
    )
    args = parser.parse_args(argv)
    args.partitions = args.partitions or ([1] if args.quick else [1, 2, 4])
    args.rounds = args.rounds or (3 if args.quick else 5)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.backlog = args.backlog or (2500 if args.quick else 6000)
    args.raw_backlog = 5000 if args.quick else 30000
    args.duration_s = 4.0 if args.quick else 10.0
    args.drain_s = 5.0 if args.quick else 10.0
    if "plaintext" not in args.modes:
        parser.error("the plaintext mode is the reference; keep it in --modes")

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = load_average()
    print(f"load average {load_before} on {os.cpu_count()} CPU(s)", flush=True)
    cluster = None
    with tempfile.TemporaryDirectory(prefix="fleetbus-bench-") as tmp:
        work = Path(tmp)
        bootstrap = args.bootstrap
        if bootstrap is None:
            from fleetbus.devtools.kafka import LocalKafka, find_free_base_port

            cluster = LocalKafka(home=work / "kafka", base_port=find_free_base_port(2), heap_mb=768)
            print("starting LocalKafka ...", flush=True)
            cluster.up()
            bootstrap = cluster.bootstrap
        try:
            broker_pids = (
                [n["pid"] for n in cluster.status()["nodes"] if n["pid"]]  # type: ignore[index]
                if cluster is not None
                else []
            )
            bench = Bench(args, bootstrap, work, broker_pids)
            runs: list[ModeRun] = []
            order = [m for m in ("plaintext", "secure-epochs", "secure", "raw") if m in args.modes]
            for p in args.partitions:
                runs += bench.run_partitions(order, p, min(p, args.max_workers))
        finally:
            if cluster is not None:
                cluster.down()
    all_rows = [run.row() for run in runs]
    failed = [row for row in all_rows if "error" in row]
    rows = [row for row in all_rows if "error" not in row]
    for row in rows:
        plain = next(
            (r for r in rows if r["mode"] == "plaintext" and r["partitions"] == row["partitions"]),
            None,
        )
        mine, ref = row["saturation"]["throughput"], plain and plain["saturation"]["throughput"]
        row["ratio"] = round(mine / ref, 3) if mine and ref else None
        # Paired by round: the two modes measured back to back, under nearly the same load.
        paired = [
            mr["throughput"] / pr["throughput"]
            for mr, pr in zip(row["rounds"], plain["rounds"] if plain else [], strict=False)
            if mr["throughput"] and pr["throughput"]
        ]
        row["ratio_paired"] = {
            "median": _round(statistics.median(paired), 3) if paired else None,
            "min": _round(min(paired), 3) if paired else None,
            "max": _round(max(paired), 3) if paired else None,
        }
        mine_cpu = row["saturation"]["cpu_ms_per_command"]
        ref_cpu = plain and plain["saturation"]["cpu_ms_per_command"]
        row["ratio_cpu"] = round(ref_cpu / mine_cpu, 3) if mine_cpu and ref_cpu else None
    report = {
        "started": started,
        "quick": args.quick,
        "rounds": args.rounds,
        "backlog": args.backlog,
        "kafka": "LocalKafka (started by the benchmark)" if cluster else args.bootstrap,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "load_before": load_before,
        "load_after": load_average(),
        "rows": rows,
        "failed": failed,
        "notes": [
            "ratio: median saturation throughput of the mode over the rounds / the plaintext "
            "median, same partitions and workers; ratio_paired: the same per round (the two "
            "modes measured back to back), median and range; ratio_cpu: plaintext CPU ms per "
            "command / the mode's (medians).",
            f"rounds: {args.rounds} saturation rounds per mode of {args.backlog} commands each, "
            "interleaved (plaintext, secure-epochs, ... then again), every mode's processes "
            "running for the whole partition count; the idle modes' processes only poll.",
            "saturated: the whole backlog was acknowledged by the broker before the 10th "
            "percentile of answers (the measuring window opens), and the window is >= 2 s.",
            "workers: worker processes (authorize + seal) and as many VehicleAgent processes; "
            f"capped at --max-workers={args.max_workers} (CPUs) — more processes than cores "
            "measure contention, not scaling.",
            "CPU ms/command: user+system time of the worker and vehicle processes over the run "
            "divided by answered commands (the broker and the load generator are not included); "
            "machine CPU ms/command: every CPU's busy time over the run (/proc/stat), broker "
            "and load generator included, divided by answered commands.",
            "raw: aiokafka produce → consume on commands.requested with the same records; one "
            "hop, no transactions: the client stack's ceiling.",
            "The broker, the load generator and the processes share the machine's CPUs.",
        ],
    }
    if "secure-epochs" in args.modes and "plaintext" in args.modes:
        import bench_floor

        print("== floor: the primitives of one secure-epochs command, timed alone", flush=True)
        report["floor"] = bench_floor.floor_report(report, target=TARGET_RATIO)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "pipeline.md").write_text(markdown(report))
    plot(report, args.out / "latency.png")
    print_table(report)
    if "floor" in report:
        bench_floor.print_report(report["floor"])
    print(f"wrote {args.out / 'pipeline.json'}, pipeline.md, latency.png", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] in ("_worker", "_vehicle"):
        role_config = json.loads(sys.argv[2])
        (run_worker if sys.argv[1] == "_worker" else run_vehicle)(role_config)
        sys.exit(0)
    sys.exit(main())
