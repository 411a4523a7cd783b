"""``fleetbus fleet`` (simulated vehicles) and ``fleetbus dispatch`` (send and approve commands).

Both read keys from a ``fleetbus keys`` folder (``--keys-dir``): ``root.pub``, ``directory.cbor``
and ``<principal>.key``. Kafka and topic names come from the ``FLEETBUS_*`` settings.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from fleetbus.bus.commands import ParamValue, SignedCommand, StatusEvent, Target
from fleetbus.bus.errors import ConfigError, FleetbusError
from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.devtools.handlers import default_handlers
from fleetbus.sdk.dispatch import CommandPublisher, StatusTimeoutError
from fleetbus.sdk.vehicle import (
    VehicleAgent,
    VehicleIdentity,
    load_key_directory,
)

fleet_app = typer.Typer(no_args_is_help=True, help="Simulated vehicles for demos and tests.")
dispatch_app = typer.Typer(no_args_is_help=True, help="Send and approve commands.")

KeysDirOpt = Annotated[
    Path, typer.Option("--keys-dir", help="key folder made by `fleetbus keys` (root.pub, ...)")
]
_log = logging.getLogger(__name__)


# --- fleet simulate ------------------------------------------------------------------------


@fleet_app.command("simulate")
def simulate(
    keys_dir: KeysDirOpt,
    vehicles: Annotated[int, typer.Option(help="simulate V-0001 .. V-N")] = 10,
    vehicle: Annotated[
        list[str] | None, typer.Option(help="explicit vehicle id (repeatable; overrides -n)")
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(help="SQLite file of executed commands [default: KEYS_DIR/fleet-sim.sqlite]"),
    ] = None,
    minimum_path: Annotated[str, typer.Option(help="weakest key path accepted")] = "xwing",
    sealer: Annotated[str, typer.Option(help="bus sealer principal")] = "bus-sealer",
    telemetry_every: Annotated[
        float, typer.Option(help="seconds between telemetry rounds; 0: none")
    ] = 0.0,
    summary_every: Annotated[float, typer.Option(help="seconds between summary lines")] = 5.0,
    duration: Annotated[float, typer.Option(help="stop after this many seconds; 0: run")] = 0.0,
    log_format: Annotated[
        str | None,
        typer.Option(help="json or text on stderr [default: $FLEETBUS_LOG_FORMAT, else json]"),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="[default: $FLEETBUS_LOG_LEVEL, else INFO]")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="serve /metrics (vehicle-side rejects) on this port; default: none"),
    ] = None,
    metrics_bind: Annotated[str, typer.Option(help="address of --metrics-port")] = "127.0.0.1",
    follow_key_topic: Annotated[
        bool,
        typer.Option(
            "--follow-key-topic/--no-follow-key-topic",
            help="read the key topic before serving, then follow it, so that a revocation "
            "reaches the vehicles without a restart (the topic must exist: the worker creates "
            "it); --no-follow-key-topic: only the directory file, as loaded at start-up",
        ),
    ] = True,
) -> None:
    """Run simulated vehicles in one process until SIGTERM / Ctrl-C (or --duration).

    Logs go to stderr (JSON lines by default, with the trace id of the command being handled);
    the summary lines go to stdout.
    """
    from fleetbus.observability.logging import configure_logging
    from fleetbus.observability.tracing_setup import setup_tracing

    configure_logging("fleetbus-fleet-sim", log_format=log_format, level=log_level)
    # Real span ids for the vehicles' spans (exported when OTEL_* asks for it), as in the worker.
    setup_tracing("fleetbus-fleet-sim")
    settings = FleetbusSettings()
    ids = list(vehicle or [f"V-{n:04d}" for n in range(1, vehicles + 1)])
    if not ids:
        raise ConfigError("no vehicles to simulate")
    agent = simulator_agent(
        settings,
        keys_dir,
        ids,
        store_path=store or keys_dir / "fleet-sim.sqlite",
        minimum_path=minimum_path,
        sealer=sealer,
        metrics_port=metrics_port,
        metrics_bind=metrics_bind,
        follow_key_topic=follow_key_topic,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _log.info("simulating %d vehicles (group %s)", len(ids), agent.group_id)
    started = last_summary = last_telemetry = time.monotonic()
    try:
        while not stop.is_set():
            agent.poll_once(0.5)
            now = time.monotonic()
            if telemetry_every > 0 and now - last_telemetry >= telemetry_every:
                last_telemetry = now
                for vid in ids:
                    agent.publish_telemetry(vid, _telemetry_sample(vid, now - started))
            if now - last_summary >= summary_every:
                last_summary = now
                typer.echo(_summary(agent))
            if duration > 0 and now - started >= duration:
                break
    finally:
        agent.close()
        typer.echo(_summary(agent))


def simulator_agent(
    settings: FleetbusSettings,
    keys_dir: Path,
    ids: list[str],
    *,
    store_path: Path,
    minimum_path: str = "xwing",
    sealer: str = "bus-sealer",
    metrics_port: int | None = None,
    metrics_bind: str = "127.0.0.1",
    follow_key_topic: bool = True,
) -> VehicleAgent:
    """The ``VehicleAgent`` of ``fleet simulate`` for vehicles ``ids`` of a keys folder."""
    # The highest directory head accepted lives with the executed store (writable, kept across
    # restarts), not in the keys folder, which a deployment mounts read-only. Only set 0 and
    # the simulated vehicles' own records are held: following the key topic then verifies
    # those, not every vehicle of the fleet.
    directory = load_key_directory(keys_dir, state_dir=store_path.parent, vehicles=ids)
    return VehicleAgent(
        settings,
        vehicles=[VehicleIdentity.load(keys_dir, vid) for vid in ids],
        directory=directory,
        minimum_path=minimum_path,
        handlers=default_handlers(),
        store_path=store_path,
        sealer_principal=sealer,
        metrics_port=metrics_port,
        metrics_bind=metrics_bind,
        follow_key_topic=follow_key_topic,
    )


def _telemetry_sample(vid: str, elapsed: float) -> dict[str, ParamValue]:
    seed = sum(vid.encode())
    return {
        "soc": round(0.2 + ((seed + elapsed) % 80) / 100, 3),
        "speed_kmh": round((seed * 7 + elapsed * 3) % 120, 1),
        "doors_locked": int(elapsed) % 2 == 0,
    }


def _summary(agent: VehicleAgent) -> str:
    s = agent.stats
    statuses = " ".join(f"{code}:{n}" for code, n in sorted(s.by_status.items())) or "-"
    return (
        f"vehicles={len(agent.vehicle_ids)} executed={s.executed} answered={s.answered} "
        f"duplicates={s.duplicates} rejected={s.rejected} ignored={s.ignored} "
        f"telemetry={s.telemetry} errors={s.errors} status[{statuses}]"
    )


# --- dispatch send / approve ---------------------------------------------------------------


def parse_param(text: str) -> tuple[str, ParamValue]:
    """``k=v``: v becomes a bool (true/false), an int, a float, or stays text."""
    if "=" not in text:
        raise typer.BadParameter(f"{text!r} is not key=value")
    key, raw = text.split("=", 1)
    value: ParamValue
    if raw in ("true", "false"):
        value = raw == "true"
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = raw
    return key.strip(), value


def _publisher(keys_dir: Path, principal: str) -> CommandPublisher:
    return CommandPublisher(
        FleetbusSettings(),
        principal_id=principal,
        private_key_file=KeyFolder(keys_dir).private_key(principal),
    )


@dispatch_app.command("send")
def send(
    keys_dir: KeysDirOpt,
    principal: Annotated[str, typer.Option(help="issuer principal id (its .key file signs)")],
    action: Annotated[str, typer.Option(help="command action, e.g. unlock_doors")],
    vehicle: Annotated[str | None, typer.Option(help="target vehicle id")] = None,
    group: Annotated[str | None, typer.Option(help="target group name")] = None,
    param: Annotated[list[str] | None, typer.Option(help="key=value (repeatable)")] = None,
    ttl: Annotated[float, typer.Option(help="seconds until the command expires")] = 60.0,
    priority: Annotated[int, typer.Option(help="-1000..1000")] = 0,
    correlation_id: Annotated[str | None, typer.Option(help="your correlation id")] = None,
    wait: Annotated[bool, typer.Option(help="wait for the final status")] = True,
    save_command: Annotated[
        Path | None,
        typer.Option(help="also write the signed command here (what `approve` signs for)"),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="seconds to wait [default: ttl + 30]")
    ] = None,
) -> None:
    """Sign and publish a command; print its id, then (with --wait) its final status.

    Exit code 0 when the command succeeded (or was published, with --no-wait), 1 otherwise.
    """
    if (vehicle is None) == (group is None):
        raise typer.BadParameter("give exactly one of --vehicle or --group")
    params = dict(parse_param(p) for p in param or [])
    with _publisher(keys_dir, principal) as publisher:
        handle = publisher.send(
            Target(vehicle=vehicle, group=group),
            action,
            params,
            ttl_s=ttl,
            priority=priority,
            correlation_id=correlation_id,
        )
    if save_command is not None:
        save_command.write_bytes(handle.signed.encode())
    typer.echo(handle.command_id)
    if not wait:
        return
    wait_s = timeout if timeout is not None else ttl + 30
    typer.echo(f"waiting up to {wait_s:g} s for the final status ...", err=True)
    try:
        # Each state goes to stderr as it arrives, so that a command held for an approval
        # (pending) or for an offline vehicle (sealed) is visible while it waits.
        outcome = handle.wait(wait_s, on_event=lambda e: typer.echo(f"  {_describe(e)}", err=True))
    except StatusTimeoutError as exc:
        typer.echo(f"timeout: {exc}", err=True)
        raise typer.Exit(1) from None
    if len(outcome.vehicles) > 1:  # a group command: each vehicle's final state, then the verdict
        for event in outcome.vehicles.values():
            typer.echo(_describe(event))
    typer.echo(_describe(outcome.event))
    raise typer.Exit(0 if outcome.state == "succeeded" else 1)


def _describe(event: StatusEvent) -> str:
    vehicle = f" [{event.vehicle_id}]" if event.vehicle_id else ""
    reason = f" ({event.reason.value})" if event.reason else ""
    detail = f": {event.detail}" if event.detail else ""
    return f"{event.state}{vehicle}{reason}{detail}"


@dispatch_app.command("approve")
def approve(
    keys_dir: KeysDirOpt,
    principal: Annotated[str, typer.Option(help="approver principal id")],
    command_file: Annotated[
        Path,
        typer.Option(help="the signed command to decide on (written by `send --save-command`)"),
    ],
    deny: Annotated[bool, typer.Option("--deny", help="deny instead of approve")] = False,
) -> None:
    """Sign and publish an approval (or denial) of exactly one signed command."""
    try:
        signed = SignedCommand.decode(command_file.read_bytes())
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {command_file}: {exc.strerror}") from None
    command = signed.command
    # What is approved is shown before it is signed: the approval binds these exact bytes.
    typer.echo(
        f"{command.id}: {command.action} {dict(command.params)} for {command.target} "
        f"by {command.issuer}, digest {signed.digest().hex()}",
        err=True,
    )
    with _publisher(keys_dir, principal) as publisher:
        approval = publisher.approve(signed, "deny" if deny else "approve")
    typer.echo(f"{approval.approval.decision} {command.id} by {principal}")


def _run(app: typer.Typer) -> None:
    try:
        app()
    except FleetbusError as exc:
        typer.echo(f"error ({exc.reason.value}): {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    import sys

    # No logging set-up here: `fleet simulate` configures its own (configure_logging); the
    # interactive dispatch commands print their results and leave logging at Python's default.
    root = typer.Typer(no_args_is_help=True)
    root.add_typer(fleet_app, name="fleet")
    root.add_typer(dispatch_app, name="dispatch")
    _run(root if len(sys.argv) > 1 else fleet_app)
