"""The foundation's smoke pipeline: records through a faust worker on a real broker."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fleetbus.bus.topics import ensure_topics


class WorkerProcess:
    """A ``fleetbus worker`` in its own process group, with its output in a log file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleetbus.cli.main", "worker"],
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run_smoke_demo(bootstrap: str, *, messages: int, console: Console) -> dict[str, object]:
    """Push ``messages`` records through a forwarding worker; report what came out."""
    from kafka import KafkaConsumer, KafkaProducer

    run_id = uuid.uuid4().hex[:8]
    source, sink = f"fleet.smoke.{run_id}.in", f"fleet.smoke.{run_id}.out"
    ensure_topics(bootstrap, [source, sink], partitions=2)
    workdir = Path(tempfile.mkdtemp(prefix="fleetbus-demo-"))
    env = {
        "FLEETBUS_KAFKA_BOOTSTRAP": bootstrap,
        "FLEETBUS_APP_ID": f"fleetbus-demo-{run_id}",
        "FLEETBUS_SMOKE_SOURCE": source,
        "FLEETBUS_SMOKE_SINK": sink,
        "FLEETBUS_DATA_DIR": str(workdir / "state"),
        "FLEETBUS_WEB_PORT": "0",
        "FLEETBUS_PARTITIONS": "2",
    }
    console.print(
        f"[bold]2/4[/bold] starting a faust worker (exactly-once) forwarding {source} → {sink}"
    )
    worker = WorkerProcess(env, workdir / "worker.log")
    consumer = KafkaConsumer(
        sink,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
    )
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    latencies: list[float] = []
    seen: set[bytes] = set()
    try:
        console.print(f"[bold]3/4[/bold] sending {messages} records and waiting for them")
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        with progress:
            task = progress.add_task("forwarded", total=messages)
            for i in range(messages):
                key = f"V-{i % 50:04d}".encode()
                producer.send(source, key=key, value=f"{i}:{time.time()}".encode())
            producer.flush()
            deadline = time.monotonic() + 90
            while len(seen) < messages and time.monotonic() < deadline:
                if not worker.running():
                    raise RuntimeError("worker exited:\n" + worker.output()[-3000:])
                for rec in consumer:
                    _, sent_at = rec.value.decode().split(":")
                    if rec.value not in seen:
                        seen.add(rec.value)
                        latencies.append(rec.timestamp / 1000 - float(sent_at))
                        progress.update(task, completed=len(seen))
    finally:
        producer.close()
        consumer.close()
        worker.stop()
    latencies.sort()
    return {
        "sent": messages,
        "received": len(seen),
        "p50 latency (ms)": round(statistics.median(latencies) * 1000, 1) if latencies else "-",
        "max latency (ms)": round(latencies[-1] * 1000, 1) if latencies else "-",
        "topics": f"{source} → {sink}",
    }
