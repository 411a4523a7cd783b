"""Runs the demo: starts (or reuses) Kafka, the KME pair, the worker and the fleet process, plays
the scenario, collects the report and stops everything it started."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fleetbus.bus.settings import FleetbusSettings, TopicNames
from fleetbus.devtools.demo.agents import ExecutionJournal
from fleetbus.devtools.demo.fleet import HUB_SAE, DemoOptions, build_demo_keys
from fleetbus.devtools.demo.observe import StatusFollower, scrape_failovers
from fleetbus.devtools.demo.report import DemoReport, evaluate
from fleetbus.devtools.demo.scenario import Scenario
from fleetbus.devtools.fleet import process_env
from fleetbus.devtools.process import ChildProcess


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
            env = process_env(settings, work)
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
                          "seal, responses, track, telemetry; /metrics on "
                          f":{metrics_port})")  # fmt: skip
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
