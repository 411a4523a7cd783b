"""Child processes of the dev tools and the tests (Kafka brokers, the KME pair, ``fleetbus
worker``, the demo's fleet): each in its own session (process group), stopped as a group:
SIGTERM, then SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = subprocess.STDOUT,
    text: bool = False,
) -> subprocess.Popen[Any]:
    """Start ``argv`` in a new session with no stdin; ``env`` adds to this process's
    environment."""
    return subprocess.Popen(  # noqa: S603 - our own interpreter, java, or a module of ours
        list(argv),
        env=None if env is None else {**os.environ, **env},
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        text=text,
    )


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process group; one already gone is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie child of ours counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop_group(
    proc: subprocess.Popen[Any], timeout_s: float, sig: signal.Signals = signal.SIGTERM
) -> int:
    """End ``proc``'s group: ``sig`` (SIGTERM), SIGKILL after ``timeout_s``; then whatever else
    the child left in its group. Returns the exit code."""
    if proc.poll() is None:
        signal_group(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Anything the child left in its group goes too.
    signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode


class ChildProcess:
    """A child in its own session (process group), output to a log file; ``stop`` ends the
    whole group: SIGTERM, then SIGKILL after ``timeout_s``."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with open(log, "ab") as out:
            self.proc = spawn(argv, env=env, stdout=out)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int:
        return stop_group(self.proc, timeout_s)

    def output(self, tail: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-tail:]


class WorkerProcess(ChildProcess):
    """A ``fleetbus worker`` in its own process group, with its output in a log file."""

    def __init__(self, env: Mapping[str, str], log: Path) -> None:
        super().__init__("worker", [sys.executable, "-m", "fleetbus.cli.main", "worker"], env, log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def output(self, tail: int | None = None) -> str:
        """The whole log, or its last ``tail`` characters."""
        text = self.log.read_text(errors="replace")
        return text if tail is None else text[-tail:]
