"""The ``fleetbus`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fleetbus.bus.errors import FleetbusError
from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.bus.settings_env import load_settings, settings_reference, settings_rows
from fleetbus.cli.audit import audit_app
from fleetbus.cli.fleet import dispatch_app, fleet_app
from fleetbus.cli.keys import keys_app
from fleetbus.cli.kme import kme_app
from fleetbus.devtools.kafka import ADMIN_PRINCIPAL, LocalKafka, cache_root

console = Console(stderr=True)
app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
dev_app = typer.Typer(no_args_is_help=True, help="Developer tooling.")
kafka_app = typer.Typer(
    no_args_is_help=True, help="A local Apache Kafka (KRaft) on 127.0.0.1, jars from Maven."
)
app.add_typer(dev_app, name="dev")
dev_app.add_typer(kafka_app, name="kafka")
app.add_typer(keys_app, name="keys")
app.add_typer(kme_app, name="kme")
app.add_typer(audit_app, name="audit")


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"fleetbus {version('fleetbus')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """The ``fleetbus`` command line."""


@app.command("settings")
def settings_command() -> None:
    """Print every FLEETBUS_* variable with its type, default and meaning (docs/settings.md)."""
    typer.echo(settings_reference(), nl=False)


def _settings_epilog() -> str:
    # Click rewraps epilog paragraphs; \b keeps this one's lines as they are.
    names = [row[0] for row in settings_rows()]
    return (
        "Settings (environment; `fleetbus settings` or docs/settings.md say what each means):"
        "\n\n\b\n" + "\n".join(names)
    )


app.add_typer(fleet_app, name="fleet")
app.add_typer(dispatch_app, name="dispatch")

HomeOpt = Annotated[
    Path | None,
    typer.Option(help="cluster state directory [default: ~/.cache/fleetbus/run/kafka-N]"),
]
BrokersOpt = Annotated[int, typer.Option(help="1, or 3 for replication factor 3")]
BasePortOpt = Annotated[int, typer.Option(help="client port of node 1; node i uses base+2(i-1)")]


def _cluster(home: Path | None, brokers: int, base_port: int) -> LocalKafka:
    home = home or cache_root() / "run" / f"kafka-{brokers}"
    return LocalKafka(home=home, brokers=brokers, base_port=base_port)


@kafka_app.command("up")
def kafka_up(home: HomeOpt = None, brokers: BrokersOpt = 1, base_port: BasePortOpt = 19092) -> None:
    """Resolve the jars (first run only), start the cluster and wait until it answers."""
    cluster = _cluster(home, brokers, base_port)
    console.print(f"starting Kafka ({brokers} node(s)) in {cluster.home} …")
    version = cluster.up()
    console.print(f"Kafka {version} ready at [bold]{cluster.bootstrap}[/bold]")
    typer.echo(cluster.bootstrap)


RecordedPortOpt = Annotated[
    int | None,
    typer.Option(help="client port of node 1 [default: as `up` set up the cluster in its home]"),
]


def _recorded(home: Path | None, brokers: int, base_port: int | None) -> LocalKafka:
    # status and down act on the cluster `up` made: its ports are in its home, whatever
    # --base-port `up` was given.
    cluster_home = home or cache_root() / "run" / f"kafka-{brokers}"
    recorded = LocalKafka.recorded(cluster_home)
    if recorded is not None and base_port is None:
        return recorded
    return _cluster(home, brokers, 19092 if base_port is None else base_port)


@kafka_app.command("down")
def kafka_down(
    home: HomeOpt = None, brokers: BrokersOpt = 1, base_port: RecordedPortOpt = None
) -> None:
    """Stop the cluster's processes (data is kept; `up` resumes it)."""
    _recorded(home, brokers, base_port).down()
    console.print("Kafka stopped")


@kafka_app.command("status")
def kafka_status(
    home: HomeOpt = None, brokers: BrokersOpt = 1, base_port: RecordedPortOpt = None
) -> None:
    """Print the cluster's processes and whether it answers metadata requests; exit code 0
    when it is ready, 1 when not."""
    status = _recorded(home, brokers, base_port).status()
    typer.echo(json.dumps(status, indent=2))
    if not status["ready"]:
        raise typer.Exit(1)


@kafka_app.command("certs")
def kafka_certs(
    out: Annotated[Path, typer.Option(help="folder for the CA, broker and client files")],
    san: Annotated[
        list[str] | None,
        typer.Option(help="extra DNS name or IP of the broker certificate (repeatable)"),
    ] = None,
    client: Annotated[
        list[str] | None,
        typer.Option(help="client certificate to issue; its CN is the Kafka principal"),
    ] = None,
    mounted_at: Annotated[
        str | None, typer.Option(help="where clients will see --out (for <cn>.properties)")
    ] = None,
) -> None:
    """A test PKI for a broker with mutual TLS (docker-compose): CA, broker certificate,
    client certificates and PEM key stores. Keeps files that exist. Not for production."""
    from fleetbus.devtools.kafka import write_pki

    files = write_pki(
        out,
        broker_sans=san or [],
        clients=[ADMIN_PRINCIPAL, *(client or [])],
        mounted_at=mounted_at,
    )
    console.print(f"wrote {len(files)} files to {out}")


@kafka_app.command("acls")
def kafka_acls(
    worker: Annotated[str, typer.Option(help="principal (certificate CN) of the workers")],
    dispatcher: Annotated[
        list[str] | None, typer.Option(help="principal that may only publish commands")
    ] = None,
    vehicles: Annotated[
        list[str] | None, typer.Option(help="principal of a vehicle gateway / simulator")
    ] = None,
    status_reader: Annotated[
        list[str] | None, typer.Option(help="principal that may read commands.status")
    ] = None,
    key_publisher: Annotated[
        list[str] | None,
        typer.Option(help="principal that publishes key changes (fleetbus keys --bootstrap)"),
    ] = None,
) -> None:
    """Create the least-privilege ACLs of docs/reliability.md for the topic prefix and app id
    of FLEETBUS_* settings, connecting with FLEETBUS_KAFKA_SSL_* as a super user."""
    from fleetbus.devtools.kafka import create_acls, fleet_acls

    settings = FleetbusSettings()
    grants = fleet_acls(
        settings.topics,
        app_id=settings.app_id,
        worker=worker,
        dispatchers=dispatcher or [],
        vehicles=vehicles or [],
        status_readers=status_reader or [],
        key_publishers=key_publisher or [],
    )
    count = create_acls(settings.kafka_bootstrap, grants, settings.kafka_client_config())
    console.print(f"{count} ACL bindings in place on {settings.kafka_bootstrap}")


LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format", help="json or text on stderr [default: $FLEETBUS_LOG_FORMAT, else json]"
    ),
]
LogLevelOpt = Annotated[
    str | None, typer.Option("--log-level", help="[default: $FLEETBUS_LOG_LEVEL, else INFO]")
]


@app.command(epilog=_settings_epilog())
def worker(log_format: LogFormatOpt = None, log_level: LogLevelOpt = None) -> None:
    """Run the stream processors (settings from FLEETBUS_* environment variables)."""
    import faust

    from fleetbus.bus.topics import ensure_topics
    from fleetbus.observability.logging import LogFormat, configure_logging, resolve_log_format
    from fleetbus.observability.tracing import setup_tracing
    from fleetbus.processors.app import (
        Pipeline,
        build_pipeline,
        create_app,
        ensure_pipeline_topics,
    )
    from fleetbus.processors.probes import WorkerProbes, serve_probes

    # First, so that every record of this process — ours, faust's, aiokafka's, warnings — goes
    # through the one redacting handler on stderr (JSON lines unless text is asked for).
    fmt = resolve_log_format(log_format)
    configure_logging("fleetbus-worker", log_format=fmt, level=log_level)
    # strict: a misspelt FLEETBUS_* variable stops the worker instead of being ignored.
    settings = load_settings(strict=True)
    # Spans get real ids (and go to OTLP or the console when OTEL_* asks for it), so the trace
    # context each stage writes into its outputs names the worker's own spans.
    setup_tracing("fleetbus-worker")
    # Build everything that reads local configuration (keys, registry, Cedar policies) before
    # the first connection to Kafka: a bad file is reported at once, not after a broker wait.
    pipelines: list[Pipeline] = []

    def build(pipeline_settings: FleetbusSettings) -> Pipeline:
        pipelines.append(build_pipeline(pipeline_settings))
        return pipelines[-1]

    faust_app = create_app(settings, pipeline_factory=build)
    not_ready = None
    if settings.pipeline == "auto" and not pipelines:
        not_ready = (
            f"pipeline=auto found no key directory ({KeyFolder(settings.keys_dir).root_pub}): "
            "this worker runs no command pipeline; mount the keys or set FLEETBUS_PIPELINE=off"
        )
        logging.getLogger("fleetbus.worker").warning("not ready: %s", not_ready)
    if settings.metrics_port:
        # Before Kafka is reached: a worker waiting for its brokers is live but not ready.
        probes = WorkerProbes(
            stages=[stage for p in pipelines for stage in p.stages], not_ready_reason=not_ready
        )
        serve_probes(probes, settings.metrics_port, settings.metrics_bind)
    ensure_topics(
        settings.kafka_bootstrap,
        [settings.smoke_source, settings.smoke_sink],
        partitions=settings.partitions,
        client_config=settings.kafka_client_config(),
    )
    if pipelines:
        ensure_pipeline_topics(settings)
        for pipeline in pipelines:
            pipeline.catch_up()  # revocations already published are in force before any record
    # faust's Worker would replace the root handlers with its own colour text handler and
    # redirect stdout into the log: keep ours (override_logging=False). Without its spinner it
    # logs "Ready" as a record; quiet keeps its few plain prints off stdout in JSON mode.
    faust_worker = faust.Worker(
        faust_app,
        loglevel=logging.getLevelName(logging.getLogger().level),
        override_logging=False,
        quiet=fmt is LogFormat.JSON,
    )
    faust_worker.spinner = None
    faust_worker.execute_from_commandline()


@app.command()
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


def main() -> None:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from fleetbus.bus.settings_env import describe_settings_error

    try:
        app()
    except (ValidationError, SettingsError) as exc:
        # Settings are read by every command; a bad FLEETBUS_* value is a configuration error,
        # said in one line per variable, not a traceback.
        if isinstance(exc, ValidationError) and exc.title != "FleetbusSettings":
            raise
        message = escape(describe_settings_error(exc))
        console.print(f"[red]error[/red] (config): {message}", soft_wrap=True)
        sys.exit(2)
    except FleetbusError as exc:
        console.print(f"[red]error[/red] ({exc.reason}): {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
