"""The pipeline benchmark's parameters and measurements: CPU time from /proc, load averages, one
drive of commands through a mode (``Drive``, ``drive``) and a mode's rounds (``ModeRun``).
Used by ``bench_pipeline.py``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
STAGES = ("authorize", "seal")
MODES = ("raw", "plaintext", "secure", "secure-epochs")
TARGET_RATIO = 0.75  # issue 6: secure-epochs / plaintext throughput
LOAD_FRACTIONS = (0.25, 0.5, 0.8)
VEHICLES = 16
TICKS = os.sysconf("SC_CLK_TCK")


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
        return round_or_none(1000 * cpu_s / self.answered)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "offered_rate": None if self.offered_rate is None else round(self.offered_rate, 1),
            "sent": self.sent,
            "answered": self.answered,
            "throughput": round_or_none(self.throughput()),
            "achieved_rate": round(self.answered / self.duration_s, 1) if self.duration_s else 0,
            "p50_ms": round_or_none(percentile(lat, 50)),
            "p95_ms": round_or_none(percentile(lat, 95)),
            "p99_ms": round_or_none(percentile(lat, 99)),
            "mean_ms": round_or_none(statistics.fmean(lat) if lat else None),
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
                    "backlog_sent_s": round_or_none(self.sent_s),
                    "window_s": round_or_none((w[1] - w[0]) if (w := self.window()) else None),
                }
            ),
        }


def round_or_none(value: float | None, digits: int = 2) -> float | None:
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
            saturation[key] = round_or_none(self.median(key))
        throughputs = self.values("throughput")
        saturation["spread"] = {
            "throughput_min": round_or_none(min(throughputs)) if throughputs else None,
            "throughput_max": round_or_none(max(throughputs)) if throughputs else None,
            "throughput_rel_spread": round_or_none((max(throughputs) - min(throughputs)) / tput, 3)
            if throughputs and tput
            else None,
            "cpu_ms_min": round_or_none(min(self.values("cpu_ms_per_command"), default=None)),
            "cpu_ms_max": round_or_none(max(self.values("cpu_ms_per_command"), default=None)),
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
