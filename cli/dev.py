"""``fleetbus dev``: developer tooling — ``dev kafka`` runs a local Apache Kafka (KRaft) and
writes its test PKI and least-privilege ACLs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fleetbus.bus.settings import FleetbusSettings
from fleetbus.devtools.kafka import ADMIN_PRINCIPAL, LocalKafka, cache_root

console = Console(stderr=True)
dev_app = typer.Typer(no_args_is_help=True, help="Developer tooling.")
kafka_app = typer.Typer(
    no_args_is_help=True, help="A local Apache Kafka (KRaft) on 127.0.0.1, jars from Maven."
)
dev_app.add_typer(kafka_app, name="kafka")

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
