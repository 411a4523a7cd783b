"""``fleetbus audit``: read the hash-chained audit trail back from Kafka and verify it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.bus.settings import FleetbusSettings

audit_app = typer.Typer(no_args_is_help=True, help=__doc__)


def read_audit_topic(
    bootstrap: str,
    topic: str,
    *,
    timeout_s: float = 30.0,
    client_config: dict[str, Any] | None = None,
) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every committed record of the audit topic's partition 0, in offset order."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        consumer_timeout_ms=int(timeout_s * 1000),
        **(client_config or {}),
    )
    try:
        tp = TopicPartition(topic, 0)
        if consumer.partitions_for_topic(topic) is None:
            raise ConfigError(f"audit topic {topic} does not exist")
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        out: list[tuple[int, bytes | None, bytes | None]] = []
        while consumer.position(tp) < end:
            batch = consumer.poll(timeout_ms=1000)
            for records in batch.values():
                out.extend((r.offset, r.key, r.value) for r in records)
            if not batch and consumer.position(tp) < end:
                # Only transaction markers (or aborted records) are left before the end.
                polled_again = consumer.poll(timeout_ms=2000)
                if not polled_again:
                    break
                for records in polled_again.values():
                    out.extend((r.offset, r.key, r.value) for r in records)
        return out
    finally:
        consumer.close()


@audit_app.command("verify")
def verify(
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
    topic: Annotated[str | None, typer.Option(help="audit topic [default: from settings]")] = None,
    keys_dir: Annotated[
        Path | None, typer.Option(help="key directory to verify checkpoint signatures")
    ] = None,
    signer: Annotated[
        str | None,
        typer.Option(
            help="principal (of the sealer role) checkpoints must be signed by "
            "[default: the settings' sealer principal]"
        ),
    ] = None,
    max_checkpoint_every: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="most records a chain may have before its first checkpoint, and largest "
            "cadence a checkpoint may promise [default: the settings' audit_checkpoint_every]",
        ),
    ] = None,
    max_unsigned_tail: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="fail a chain whose last N+1 records no checkpoint covers "
            "(0: every record must be signed, for a stopped pipeline)",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable report")] = False,
) -> None:
    """Verify every chain: OK, or the exact chain / seq / offset where it breaks (exit 1).
    Prints, per chain, how many records at the tail no signed checkpoint covers."""
    from fleetbus.bus.directory import RootPublicKey, load_directory
    from fleetbus.processors.audit import verify_entries

    settings = FleetbusSettings()
    bootstrap = bootstrap or settings.kafka_bootstrap
    topic = topic or settings.topics.full(settings.topics.audit)
    folder = (keys_dir or Path(settings.keys_dir)).expanduser()
    if not KeyFolder(folder).root_pub.exists():
        raise ConfigError(f"{KeyFolder(folder).root_pub} not found: checkpoints cannot be verified")
    directory = load_directory(
        KeyFolder(folder).directory,
        RootPublicKey.from_bytes(KeyFolder(folder).root_pub.read_bytes()),
    )
    entries = read_audit_topic(bootstrap, topic, client_config=settings.kafka_client_config())
    report = verify_entries(
        entries,
        directory,
        checkpoint_signer=signer or settings.sealer_principal,
        max_checkpoint_every=max_checkpoint_every or settings.audit_checkpoint_every,
        max_unsigned_tail=max_unsigned_tail,
    )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "records": report.records,
                    "checkpoints": report.checkpoints,
                    "unsigned_tail": report.unsigned_tail,
                    "breaks": [
                        {
                            "chain": b.chain,
                            "seq": b.seq,
                            "offset": b.offset,
                            "kind": b.kind,
                            "detail": b.detail,
                        }
                        for b in report.breaks
                    ],
                },
                indent=2,
                sort_keys=True,
            )
        )
    else:
        for chain in sorted(report.records):
            tail = report.unsigned_tail.get(chain)
            typer.echo(
                f"chain {chain}: {report.records[chain]} records, "
                f"{report.checkpoints.get(chain, 0)} signed checkpoints"
                + ("" if tail is None else f", {tail} at the tail not covered by a signature")
            )
        for brk in report.breaks:
            typer.echo(f"BROKEN {brk}")
        typer.echo("OK" if report.ok else f"FAILED: {len(report.breaks)} chain(s) broken")
    if not report.ok:
        raise typer.Exit(1)
