"""Atomic file writes: key files, directory files and state files are never seen half-written.

The data goes to a fresh temporary file in the target's folder, created with its final mode
(never chmod-ed after the fact, so a private file is 0600 from the moment it exists), is synced,
and then replaces the target in one rename.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_atomic", "write_private_file"]


def write_atomic(path: Path, data: bytes, mode: int, *, sync_folder: bool = False) -> None:
    """Replace ``path`` with ``data`` in a file of ``mode``; ``sync_folder`` also syncs the
    folder, so the rename itself survives a power cut (a store's only copy of its state)."""
    path = Path(path)
    # Unique per call: a temporary file left by a killed writer (even one that had our pid, as
    # every container's first process does) never blocks the next write.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_folder:
        folder_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a fresh 0600 file, then move it over ``path`` (atomic, never chmod)."""
    write_atomic(path, data, 0o600)
