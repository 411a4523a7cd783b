"""Fuzz the command-bus message codecs (``fleetbus.bus.commands``): SignedCommand,
SignedApproval, Response, StatusEvent and Telemetry ``decode``, and ``SignedCommand.verify``
against the corpus fleet's key directory.

A crash is: any exception other than ``FleetbusError``; or an accepted message whose
``encode()`` differs from the input (the codecs must accept exactly the canonical encoding).
See fuzz/README.md.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from fleetbus.bus.keyfolder import KeyFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Crash, instrumented, main, note

with instrumented():
    from fleetbus.bus.commands import (
        Response,
        SignedApproval,
        SignedCommand,
        StatusEvent,
        Telemetry,
    )
    from fleetbus.bus.directory import RootPublicKey, load_directory
    from fleetbus.bus.errors import FleetbusError


FLEET = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "hostile" / "fleet"
DIRECTORY = load_directory(
    KeyFolder(FLEET).directory, RootPublicKey.from_bytes(KeyFolder(FLEET).root_pub.read_bytes())
)
OPEN_AT = 1_800_000_000.0
CODECS = (SignedCommand, SignedApproval, Response, StatusEvent, Telemetry)


def test_one_input(data: bytes) -> None:
    for codec in CODECS:
        try:
            message = codec.decode(data)  # type: ignore[attr-defined]
        except FleetbusError as exc:
            note(f"{codec.__name__}:{exc.reason.value}:{str(exc)[:40]}")
            continue
        note(f"{codec.__name__}:accepted")
        if message.encode() != data:
            raise Crash(f"{codec.__name__}: accepted bytes that do not re-encode identically")
        if isinstance(message, SignedCommand | SignedApproval):
            with contextlib.suppress(FleetbusError):
                message.verify(DIRECTORY, at=OPEN_AT)


if __name__ == "__main__":
    main(test_one_input, "commands")
