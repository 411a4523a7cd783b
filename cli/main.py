"""The ``fleetbus`` command line: wires one module per command group into ``app``.

``audit``, ``demo``, ``dev`` (local Kafka), ``fleet`` / ``dispatch`` (the SDKs at a terminal),
``keys``, ``kme`` and ``worker`` each live in ``fleetbus.cli.<group>``; ``settings`` and the
error handling of every command are here.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fleetbus.bus.errors import FleetbusError
from fleetbus.bus.settings_env import settings_reference
from fleetbus.cli.audit import audit_app
from fleetbus.cli.demo import demo
from fleetbus.cli.dev import dev_app
from fleetbus.cli.fleet import dispatch_app, fleet_app
from fleetbus.cli.keys import keys_app
from fleetbus.cli.kme import kme_app
from fleetbus.cli.worker import settings_epilog, worker

console = Console(stderr=True)
app = typer.Typer(no_args_is_help=True, add_completion=False, help="The ``fleetbus`` command line.")
app.add_typer(dev_app, name="dev")
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


app.add_typer(fleet_app, name="fleet")
app.add_typer(dispatch_app, name="dispatch")
app.command(epilog=settings_epilog())(worker)
app.command()(demo)


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
