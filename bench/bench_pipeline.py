"""What security costs: the command pipeline (authorize → seal → vehicle) against the real Kafka
broker, secure and in plaintext, side by side in one run. Not a test: numbers depend on the
machine and its load (the load average is recorded with every measurement).

    .venv/bin/python bench/bench_pipeline.py --quick            # < 3 minutes, 1 partition
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

Measured per (mode, partitions): sustained throughput at saturation (a backlog of commands,
completion rate between the 10th and 90th percentile of answers), end-to-end latency
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test fleet builder (integration.pipeline_support)

RESULTS = Path(__file__).parent / "results"
STAGES = ("authorize", "seal")
MODES = ("raw", "plaintext", "secure", "secure-epochs")
LOAD_FRACTIONS = (0.25, 0.5, 0.8)
VEHICLES = 16
TICKS = os.sysconf("SC_CLK_TCK")


# --- benchmark-only plaintext stage logic (same runner, same topics) -----------------------


def plain_stages(settings: Any) -> list[Any]:
    """authorize + seal without crypto and policy, run by the production TransactionalStage."""
    from fleetbus.bus.commands import CommandState, SignedCommand
    from fleetbus.bus.errors import FleetbusError, ReasonCode
    from fleetbus.processors.app import state_topic
    from fleetbus.processors.eos import (
        InputRecord,
        Output,
        PartitionState,
        StageResult,
        TransactionalStage,
    )
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

    return [
        TransactionalStage(
            logic,
            bootstrap=settings.kafka_bootstrap,
            app_id=settings.app_id,
            state_topic=state_topic(settings, logic.name),
            audit_topic=topics.audit,
            dlq_topic=topics.dlq,
            batch_size=settings.stage_batch_size,
            tick_interval_s=settings.tick_interval_s,
            consumer_options={
                "session_timeout_ms": int(settings.broker_session_timeout_s * 1000),
                "heartbeat_interval_ms": int(settings.broker_heartbeat_interval_s * 1000),
            },
        )
        for logic in (PlainAuthorize(), PlainSeal())
    ]


def settings_from(config: dict[str, Any]) -> Any:
    from fleetbus.bus.settings import FleetbusSettings, TopicNames

    return FleetbusSettings(
        kafka_bootstrap=config["bootstrap"],
        app_id=config["app_id"],
        partitions=config["partitions"],
        topics=TopicNames(prefix=config["prefix"]),
        keys_dir=config["keys_dir"],
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
    from fleetbus.bus.vehicle import VehicleAgent, _trace_headers, load_key_directory
    from fleetbus.providers.sealing import EpochPolicy

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
        vehicles=[load_key_file(keys_dir / f"{vehicle_id(n)}.key") for n in range(1, VEHICLES + 1)],
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
    duration_s: float
    load: list[float]

    def throughput(self) -> float | None:
        """Answers per second between the 10th and 90th percentile of completions."""
        done = sorted(self.completion_s)
        if len(done) < 20:
            return None
        lo, hi = done[len(done) // 10], done[len(done) * 9 // 10]
        return (len(done) * 9 // 10 - len(done) // 10) / (hi - lo) if hi > lo else None

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
            "cpu_ms_per_command": _round(1000 * self.cpu_s / self.answered)
            if self.answered
            else None,
            "cpu_ms_per_command_by_role": {
                role: _round(1000 * cpu / self.answered) for role, cpu in self.cpu_by_role.items()
            }
            if self.answered
            else {},
            "load_average": self.load,
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
) -> Drive:
    """Publish ``commands`` (key, value) to ``in_topic`` — as fast as possible, or open-loop at
    ``rate`` per second — and time each key's first record on ``out_topic``."""
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
        return Drive(
            offered_rate=rate,
            sent=len(commands),
            answered=len(received),
            latencies_ms=[1000 * (t - scheduled[k]) for k, t in received.items()],
            completion_s=[t - t0 for t in received.values()],
            cpu_s=sum(cpu.values()),
            cpu_by_role=cpu,
            duration_s=max(end - t0, sent_s),
            load=load,
        )
    finally:
        await producer.stop()
        await consumer.stop()


class Bench:
    def __init__(self, args: argparse.Namespace, bootstrap: str, work: Path) -> None:
        from integration.pipeline_support import DISPATCHER, make_test_fleet

        self.args = args
        self.bootstrap = bootstrap
        self.work = work
        self.fleet = make_test_fleet(work, vehicles=VEHICLES)
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
        from fleetbus.bus.topics import ensure_topics
        from fleetbus.processors.app import pipeline_topics

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
        regular, compacted = pipeline_topics(settings)
        audit = settings.topics.full(settings.topics.audit)
        ensure_topics(self.bootstrap, regular, partitions=partitions)
        ensure_topics(
            self.bootstrap, compacted, partitions=partitions, configs={"cleanup.policy": "compact"}
        )
        ensure_topics(self.bootstrap, [audit], partitions=1)
        config["requested"] = settings.topics.full(settings.topics.commands_requested)
        config["responses"] = settings.topics.full(settings.topics.commands_responses)
        config["all_topics"] = [*regular, *compacted, audit]
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

    def run_config(self, mode: str, partitions: int, workers: int) -> dict[str, Any]:
        print(f"== {mode}, {partitions} partition(s), {workers} worker(s)", flush=True)
        config = self.topics(mode, partitions)
        procs: list[subprocess.Popen[bytes]] = []
        out_topic = config["requested"] if mode == "raw" else config["responses"]
        try:
            if mode != "raw":
                for i in range(workers):
                    procs.append(self.spawn("worker", config, i))
                    vconf = {**config, "store": str(self.work / f"{config['app_id']}-{i}.sqlite")}
                    procs.append(self.spawn("vehicle", vconf, i))
            pids = {
                role: [p.pid for p in procs if p.args[2] == f"_{role}"]
                for role in ("worker", "vehicle")
            }
            if mode != "raw":
                self.warm_up(config, out_topic, pids)
            sat_n = self.args.raw_backlog if mode == "raw" else self.args.backlog
            sat = asyncio.run(
                drive(
                    self.bootstrap,
                    config["requested"],
                    out_topic,
                    self.commands(sat_n),
                    rate=None,
                    pids=pids,
                    drain_s=self.args.drain_s * 6,
                )
            )
            row: dict[str, Any] = {
                "mode": mode,
                "partitions": partitions,
                "workers": workers if mode != "raw" else 0,
                "saturation": sat.summary(),
                "loads": [],
            }
            print(f"   saturation: {json.dumps(sat.summary())}", flush=True)
            if mode == "plaintext" and sat.throughput():
                self.ceiling[partitions] = float(sat.throughput() or 0)
            ceiling = self.ceiling.get(partitions)
            if ceiling:
                row["plaintext_ceiling"] = round(ceiling, 1)
                for fraction in LOAD_FRACTIONS:
                    rate = fraction * ceiling
                    n = max(10, int(rate * self.args.duration_s))
                    d = asyncio.run(
                        drive(
                            self.bootstrap,
                            config["requested"],
                            out_topic,
                            self.commands(n),
                            rate=rate,
                            pids=pids,
                            drain_s=self.args.drain_s,
                        )
                    )
                    summary = {"fraction": fraction, **d.summary()}
                    row["loads"].append(summary)
                    print(f"   {fraction:.0%}: {json.dumps(summary)}", flush=True)
            if mode != "raw":
                row["bytes_per_command"] = self.wire_bytes(config)
            return row
        except Exception as exc:
            print(f"   FAILED: {exc}\n{self.log_tail(config)}", file=sys.stderr, flush=True)
            return {
                "mode": mode,
                "partitions": partitions,
                "workers": workers,
                "error": str(exc),
                "load_average": load_average(),
            }
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()

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
        "## Saturation",
        "",
        "| mode | partitions | workers | commands/s | ratio to plaintext | CPU ms/command "
        "| bytes/command | p50 ms (backlog) | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        sat = row["saturation"]
        lines.append(
            f"| {row['mode']} | {row['partitions']} | {row['workers']} | {sat['throughput']} "
            f"| {row.get('ratio', '')} | {sat['cpu_ms_per_command'] or ''} "
            f"| {row.get('bytes_per_command', {}).get('total', '')} | {sat['p50_ms']} "
            f"| {sat['load_average'][0]} |"
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
            f"(load average {row['load_average']})"
        )
    lines += ["", *[f"- {note}" for note in report["notes"]], ""]
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
        f"{'mode':<14}{'P':>3}{'W':>3}{'cmd/s':>10}{'ratio':>7}{'cpu ms':>8}{'B/cmd':>8}"
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
            f"{sat['throughput'] or 0:>10.1f}{row.get('ratio') or 0:>7.2f}"
            f"{sat['cpu_ms_per_command'] or 0:>8.2f}"
            f"{row.get('bytes_per_command', {}).get('total', 0):>8.0f}"
            + "".join(f"{c if c is not None else float('nan'):>9.1f}" for c in cells)
        )
    print()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 partition, short runs (< 3 min)")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting a LocalKafka")
    parser.add_argument("--partitions", type=int, nargs="*", help="default: 1 2 4 (quick: 1)")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.partitions = args.partitions or ([1] if args.quick else [1, 2, 4])
    args.backlog = 600 if args.quick else 2000
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
            from fleetbus.bus.dev.kafka import LocalKafka, find_free_base_port

            cluster = LocalKafka(home=work / "kafka", base_port=find_free_base_port(2), heap_mb=768)
            print("starting LocalKafka ...", flush=True)
            cluster.up()
            bootstrap = cluster.bootstrap
        try:
            bench = Bench(args, bootstrap, work)
            rows = []
            order = [m for m in ("plaintext", "raw", "secure", "secure-epochs") if m in args.modes]
            for p in args.partitions:
                workers = min(p, args.max_workers)
                for mode in order:
                    rows.append(bench.run_config(mode, p, workers))
        finally:
            if cluster is not None:
                cluster.down()
    failed = [row for row in rows if "error" in row]
    rows = [row for row in rows if "error" not in row]
    for row in rows:
        plain = next(
            (r for r in rows if r["mode"] == "plaintext" and r["partitions"] == row["partitions"]),
            None,
        )
        mine, ref = row["saturation"]["throughput"], plain and plain["saturation"]["throughput"]
        row["ratio"] = round(mine / ref, 3) if mine and ref else None
    report = {
        "started": started,
        "quick": args.quick,
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
            "ratio: saturation throughput of the mode / plaintext, same partitions and workers.",
            "workers: worker processes (authorize + seal) and as many VehicleAgent processes; "
            f"capped at --max-workers={args.max_workers} (CPUs) — more processes than cores "
            "measure contention, not scaling.",
            "CPU ms/command: user+system time of the worker and vehicle processes over the run "
            "divided by answered commands (the broker and the load generator are not included).",
            "raw: aiokafka produce → consume on commands.requested with the same records; one "
            "hop, no transactions: the client stack's ceiling.",
            "The broker, the load generator and the processes share the machine's CPUs.",
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "pipeline.md").write_text(markdown(report))
    plot(report, args.out / "latency.png")
    print_table(report)
    print(f"wrote {args.out / 'pipeline.json'}, pipeline.md, latency.png", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] in ("_worker", "_vehicle"):
        role_config = json.loads(sys.argv[2])
        (run_worker if sys.argv[1] == "_worker" else run_vehicle)(role_config)
        sys.exit(0)
    sys.exit(main())
