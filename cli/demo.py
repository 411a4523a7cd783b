"""``fleetbus demo``: the command pipeline on real parts through a mixed scenario."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fleetbus.cli.dev import BasePortOpt, HomeOpt

console = Console(stderr=True)


def demo(
    vehicles: Annotated[int, typer.Option(help="simulated vehicles (PQC and legacy)")] = 200,
    commands: Annotated[int, typer.Option(help="routine commands (3 of them to groups)")] = 300,
    legacy: Annotated[
        int | None, typer.Option(help="vehicles without PQC [default: vehicles / 10]")
    ] = None,
    edge_units: Annotated[int, typer.Option(help="QKD-connected edge units")] = 4,
    phase_seconds: Annotated[float, typer.Option(help="seconds of traffic per phase")] = 10.0,
    bootstrap: Annotated[
        str | None, typer.Option(help="use this Kafka (never started or stopped by the demo)")
    ] = None,
    base_port: BasePortOpt = 19092,
    kafka_home: HomeOpt = None,
    workdir: Annotated[
        Path | None, typer.Option(help="keys, logs and stores [default: a temp dir]")
    ] = None,
    keep_workdir: Annotated[bool, typer.Option(help="keep the temp dir afterwards")] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the summary as JSON here")
    ] = None,
) -> None:
    """Run the command pipeline on real parts through a mixed scenario; see docs/demo.md.

    Starts (or reuses) Kafka, a KME pair, the worker and a simulated fleet; plays routine
    traffic, approvals, attacks and a QKD link outage; prints a summary; stops everything.
    Exit code 0 only if every expectation of the scenario held.
    """
    import signal

    from fleetbus.devtools.demo import DemoOptions, run_demo, summary_tables

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)  # so that `finally` stops what the demo started
    options = DemoOptions(
        vehicles=vehicles,
        commands=commands,
        legacy=legacy,
        edge_units=edge_units,
        outage_s=phase_seconds,
    )
    try:
        report = run_demo(
            options,
            console=console,
            bootstrap=bootstrap,
            base_port=base_port,
            kafka_home=kafka_home,
            workdir=workdir,
            keep_workdir=keep_workdir,
        )
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if json_out is not None:
        json_out.write_text(report.to_json())
    out = Console()
    for table in summary_tables(report):
        out.print(table)
    if not report.ok:
        out.print("[red]the scenario did not go as expected[/red]")
        raise typer.Exit(1)
    out.print("[green]every expectation of the scenario held[/green]")
