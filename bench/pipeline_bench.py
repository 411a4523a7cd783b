"""The pipeline benchmark's orchestrator (``Bench``): topics per mode, the worker and vehicle
processes (``bench_pipeline.py _worker|_vehicle``), saturation rounds and offered loads."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline_measure import (
    LOAD_FRACTIONS,
    VEHICLES,
    ModeRun,
    cpu_readers,
    drive,
    load_average,
    settings_from,
)

from fleetbus.devtools.process import signal_group, spawn

#: The script whose ``_worker`` / ``_vehicle`` commands run a mode's processes.
ROLES_SCRIPT = Path(__file__).with_name("bench_pipeline.py")


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        bootstrap: str,
        work: Path,
        broker_pids: Sequence[int] = (),
    ) -> None:
        from fleetbus.devtools.fleet import DISPATCHER, make_test_fleet

        self.args = args
        self.bootstrap = bootstrap
        self.work = work
        self.broker_pids = list(broker_pids)  # the LocalKafka's, when the benchmark started it
        # --wire2: every vehicle and the bus sealer announce wire2, so the secure modes write
        # wire format v2 both ways (commands to the vehicles, their answers to the bus).
        caps = ["wire2"] if getattr(args, "wire2", False) else []
        self.fleet = make_test_fleet(
            work, vehicles=VEHICLES, vehicle_capabilities=caps, sealer_capabilities=caps
        )
        self.signer = self.fleet.signer(DISPATCHER)
        self.dispatcher = DISPATCHER
        self.results: list[dict[str, Any]] = []
        self.ceiling: dict[int, float] = {}

    def commands(self, count: int) -> list[tuple[bytes, bytes]]:
        """Signed ping commands round-robin over the vehicles (signing is not measured)."""
        from fleetbus.bus.commands import Command, SignedCommand, Target
        from fleetbus.devtools.fleet import vehicle_id

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
        # Where a command's answer is seen, keyed by command id: the vehicle's own record in
        # plaintext; in the secure modes the response stage's verified record (v2 answers are
        # keyed by vehicle id, and an answer counts for the bus only once verified).
        answers = "commands_responses" if mode == "plaintext" else "commands_responses_verified"
        config["responses"] = settings.topics.full(getattr(settings.topics, answers))
        return config

    def spawn(self, role: str, config: dict[str, Any], index: int) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{config['app_id']}-{role}-{index}.log", "ab")  # noqa: SIM115
        proc = spawn(
            [sys.executable, str(ROLES_SCRIPT), f"_{role}", json.dumps(config)],
            env={"PYTHONUNBUFFERED": "1"},
            stdout=log,
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
                signal_group(p.pid, signal.SIGTERM)
        for p in run.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                signal_group(p.pid, signal.SIGKILL)
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
