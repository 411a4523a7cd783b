"""The key pool's state file: unreserved material and reservations written before each change
returns, read back at start, so a restart keeps what was not yet handed to both sides."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.files import write_atomic


class KMEStateError(ConfigError):
    """The pool's state directory is unusable: locked by another KME, unreadable or corrupt."""


#: Format tag and version of the state file.
STATE_FORMAT = "fleetbus-kme-pool"
STATE_VERSION = 1


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _digest(canonical_state: str) -> str:
    return hashlib.sha256(canonical_state.encode()).hexdigest()


class PoolStateFile:
    """The pool's durable state: one JSON file in a state directory, replaced atomically.

    ``save`` writes a temporary file (mode 0600, created so), fsyncs it, ``os.replace``-s it over
    the old one and fsyncs the directory, so a crash leaves the old or the new state, never a mix.
    An exclusive ``flock`` on a lock file keeps a second KME process off the same directory (two
    writers would hand out the same keys twice); the kernel drops it when the process dies.
    """

    FILE_NAME = "kme-pool.json"
    LOCK_NAME = "kme-pool.lock"

    def __init__(self, directory: Path) -> None:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(directory / self.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KMEStateError(f"KME state directory {directory} unusable: {exc}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise KMEStateError(
                f"KME state directory {directory} is in use by another KME process"
            ) from None
        self.directory = directory
        self.path = directory / self.FILE_NAME
        self._lock_fd: int | None = lock_fd
        #: Writes done and the seconds they took (the cost of durability, see docs/qkd.md).
        self.writes = 0
        self.write_seconds = 0.0

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none yet. Raises ``KMEStateError`` when the
        file exists but cannot be trusted (truncated, edited, another format or version)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KMEStateError(f"cannot read KME state file {self.path}: {exc}") from None
        problem = f"KME state file {self.path} is corrupt or truncated"
        hint = "; move it away to start with a fresh pool (keys it holds are then lost)"
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise KMEStateError(problem + hint) from None
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise KMEStateError(problem + hint)
        if doc.get("version") != STATE_VERSION:
            raise KMEStateError(
                f"KME state file {self.path} has version {doc.get('version')!r}, "
                f"this KME reads version {STATE_VERSION}" + hint
            )
        state = doc.get("state")
        if not isinstance(state, dict) or doc.get("sha256") != _digest(canonical_json(state)):
            raise KMEStateError(problem + " (checksum mismatch)" + hint)
        return state

    def save(self, canonical_state: str) -> None:
        """Write ``canonical_state``: the state as ``json.dumps(..., sort_keys=True,
        separators=(",", ":"))`` would give it (the checksum is taken over that form)."""
        began = time.perf_counter()
        head = canonical_json(
            {"format": STATE_FORMAT, "version": STATE_VERSION, "sha256": _digest(canonical_state)}
        )
        data = (head[:-1] + ',"state":' + canonical_state + "}").encode()
        write_atomic(self.path, data, 0o600, sync_folder=True)
        self.writes += 1
        self.write_seconds += time.perf_counter() - began

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def b64_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
