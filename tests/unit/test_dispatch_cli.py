"""``fleetbus dispatch send`` shows each state while it waits and names the last one on timeout;
``approve`` signs exactly the command ``send --save-command`` wrote.

The publisher is replaced by one whose handle replays a fixed list of status events through
``CommandHandle.wait`` itself (only the Kafka read is replaced), so the CLI's own output is what
is checked.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleetbus.bus.commands import (
    Command,
    CommandState,
    SignedApproval,
    SignedCommand,
    StatusEvent,
    Target,
)
from fleetbus.bus.registry import load_signature_suite
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.cli import fleet as cli_fleet
from fleetbus.sdk import dispatch
from fleetbus.sdk.dispatch import CommandHandle, CommandPublisher
from fleetbus.sdk.transport import MemoryTransport


def handle_with(events: list[tuple[CommandState, str]]) -> CommandHandle:
    suite = load_signature_suite("ed25519")
    private, _ = suite.generate()
    command = Command.create(
        issuer="dispatch-1", target=Target(vehicle="V-0017"), action="unlock_doors"
    )
    signed = SignedCommand.sign(command, suite.signer(private, "k1"))
    handle = CommandHandle(
        signed=signed,
        settings=FleetbusSettings(),
        published_at_ms=round(time.time() * 1000),
        partition=0,
        offset=0,
    )
    handle.script = [  # type: ignore[attr-defined]
        StatusEvent(command.id, state, time.time(), detail) for state, detail in events
    ]
    return handle


class FakePublisher:
    def __init__(self, handle: CommandHandle) -> None:
        self.handle = handle

    def __enter__(self) -> FakePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def send(self, *args: Any, **kwargs: Any) -> CommandHandle:
        return self.handle


class ScriptedReader:
    """Stands in for the status reader: the script's events in one poll, then nothing until
    the timeout."""

    def __init__(self, events: list[StatusEvent], timeout_s: float) -> None:
        self._events = list(events)
        self._deadline = time.monotonic() + timeout_s

    def __enter__(self) -> ScriptedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def time_left(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def poll(self) -> list[StatusEvent]:
        events, self._events = self._events, []
        if not events:
            time.sleep(0.05)
        return events

    def caught_up(self) -> bool:
        return True


def run_send(monkeypatch: pytest.MonkeyPatch, handle: CommandHandle) -> Any:
    def reader(settings: Any, command_id: str, *, since_ms: int, timeout_s: float) -> Any:
        return ScriptedReader(handle.script, timeout_s)  # type: ignore[attr-defined]

    monkeypatch.setattr(dispatch, "StatusReader", reader)
    monkeypatch.setattr(cli_fleet, "_publisher", lambda keys_dir, principal: FakePublisher(handle))
    args = ["send", "--keys-dir", str(Path("keys")), "--principal", "dispatch-1"]
    args += ["--vehicle", "V-0017", "--action", "unlock_doors", "--timeout", "1"]
    return CliRunner().invoke(cli_fleet.dispatch_app, args)


def test_send_prints_each_state_while_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    handle = handle_with(
        [
            (CommandState.REQUESTED, ""),
            (CommandState.PENDING, "pending: approval-required within 300 s"),
            (CommandState.AUTHORIZED, ""),
            (CommandState.SUCCEEDED, "unlocked"),
        ]
    )
    result = run_send(monkeypatch, handle)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [handle.command_id, "succeeded: unlocked"]
    progress = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert progress == [
        "requested",
        "pending: pending: approval-required within 300 s",
        "authorized",
        "succeeded: unlocked",
    ]


def test_send_names_the_last_state_on_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    handle = handle_with([(CommandState.REQUESTED, ""), (CommandState.PENDING, "")])
    result = run_send(monkeypatch, handle)
    assert result.exit_code == 1
    assert "last state seen: pending" in result.stderr.splitlines()[-1]


def test_send_saves_the_command_and_approve_signs_exactly_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``approve`` needs the signed command itself (not only its id), shows what it approves
    and signs its digest."""
    handle = handle_with([(CommandState.SUCCEEDED, "")])
    saved = tmp_path / "command.cbor"
    monkeypatch.setattr(dispatch, "StatusReader", lambda *a, **k: ScriptedReader([], 0))
    monkeypatch.setattr(cli_fleet, "_publisher", lambda keys_dir, principal: FakePublisher(handle))
    args = ["send", "--keys-dir", "keys", "--principal", "dispatch-1", "--vehicle", "V-0017"]
    args += ["--action", "unlock_doors", "--no-wait", "--save-command", str(saved)]
    assert CliRunner().invoke(cli_fleet.dispatch_app, args).exit_code == 0
    assert saved.read_bytes() == handle.signed.encode()

    suite = load_signature_suite("ed25519")
    private, _ = suite.generate()
    transport = MemoryTransport()
    approver = CommandPublisher(
        FleetbusSettings(),
        principal_id="dispatch-2",
        signer=suite.signer(private, "k2"),
        transport=transport,
    )
    monkeypatch.setattr(cli_fleet, "_publisher", lambda keys_dir, principal: approver)
    args = ["approve", "--keys-dir", "keys", "--principal", "dispatch-2"]
    result = CliRunner().invoke(cli_fleet.dispatch_app, [*args, "--command-file", str(saved)])
    assert result.exit_code == 0, result.output
    assert handle.signed.digest().hex() in result.stderr
    [record] = transport.sent
    assert record.key == handle.command_id.encode()
    approval = SignedApproval.decode(record.value or b"").approval
    assert approval.is_for(handle.signed)
    assert str(approval.decision) == "approve"
    # Without the command there is nothing to approve.
    result = CliRunner().invoke(cli_fleet.dispatch_app, [*args, "--command-id", handle.command_id])
    assert result.exit_code != 0


def group_wait(monkeypatch: pytest.MonkeyPatch, events: list[StatusEvent]) -> Any:
    suite = load_signature_suite("ed25519")
    private, _ = suite.generate()
    command = Command.create(issuer="dispatch-1", target=Target(group="north"), action="ping")
    handle = CommandHandle(
        signed=SignedCommand.sign(command, suite.signer(private, "k1")),
        settings=FleetbusSettings(),
        published_at_ms=round(time.time() * 1000),
        partition=0,
        offset=0,
    )
    script = [replace(e, command_id=command.id) for e in events]

    def reader(settings: Any, command_id: str, *, since_ms: int, timeout_s: float) -> Any:
        return ScriptedReader(script, timeout_s)

    monkeypatch.setattr(dispatch, "StatusReader", reader)
    return handle.wait(timeout_s=0.3)


def test_a_group_wait_settles_only_once_every_announced_vehicle_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seal-stage partitions name a group's vehicles in separate transactions: one member's
    final state must not settle the wait while the group's authorized event announces two."""
    from fleetbus.bus.commands import group_targets_detail
    from fleetbus.sdk.dispatch import StatusTimeoutError

    now = time.time()
    authorized = StatusEvent("x", CommandState.AUTHORIZED, now, group_targets_detail(2, "ok"))
    v1 = StatusEvent("x", CommandState.SUCCEEDED, now, vehicle_id="V-1")
    v2 = StatusEvent("x", CommandState.SUCCEEDED, now, vehicle_id="V-2")
    with pytest.raises(StatusTimeoutError):
        group_wait(monkeypatch, [authorized, v1])
    outcome = group_wait(monkeypatch, [authorized, v1, v2])
    assert sorted(outcome.vehicles) == ["V-1", "V-2"]
