"""The receiving side's epoch store (wire format v2): accepted epochs and their replay
windows, in memory or SQLite."""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

#: Sequence numbers remembered behind the highest one accepted (docs/wire-format.md V2.5).
REPLAY_WINDOW = 64


# -- receiving ---------------------------------------------------------------------------


@dataclass
class StoredEpoch:
    """What a recipient keeps of an accepted epoch (never the epoch key or the key refs)."""

    recipient: str
    epoch_id: bytes
    sender: str
    sender_key_id: str
    signature_suite: str
    topic: str
    direction: int
    key_path: str
    key_ids: tuple[tuple[str, str], ...]
    not_after_ms: int
    max_messages: int
    est_digest: bytes
    secret: bytes = field(repr=False)
    highest: int = -1
    window: int = 0  # bit i set: sequence highest - i was accepted
    # The establishment record, for a store that keeps no secret and re-derives it
    # (``EpochOpener.rederive``); stores that keep the secret need not keep it.
    record: bytes = field(default=b"", repr=False)


def window_admits(epoch: StoredEpoch, sequence: int) -> bool:
    """Whether ``sequence`` is new for the epoch's replay window (docs V2.5)."""
    if sequence > epoch.highest:
        return True
    offset = epoch.highest - sequence
    return offset < REPLAY_WINDOW and not (epoch.window >> offset) & 1


def window_record(epoch: StoredEpoch, sequence: int) -> None:
    if sequence > epoch.highest:
        shift = sequence - epoch.highest
        epoch.window = ((epoch.window << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
        epoch.highest = sequence
    else:
        epoch.window |= 1 << (epoch.highest - sequence)


class EpochStore(Protocol):
    """A recipient's epochs, by (recipient, epoch id)."""

    def get(self, recipient: str, epoch_id: bytes) -> StoredEpoch | None: ...

    def put(self, epoch: StoredEpoch) -> None: ...

    def record(self, recipient: str, epoch_id: bytes, sequence: int) -> bool:
        """Atomically admit and record ``sequence``; False when it is a replay."""
        ...

    def erase(self, recipient: str, epoch_id: bytes) -> None: ...


class MemoryEpochStore:
    """Epochs in memory (a process that re-establishes after a restart)."""

    def __init__(self) -> None:
        self._epochs: dict[tuple[str, bytes], StoredEpoch] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._epochs)

    def get(self, recipient: str, epoch_id: bytes) -> StoredEpoch | None:
        with self._lock:
            epoch = self._epochs.get((recipient, epoch_id))
            return None if epoch is None else replace(epoch)

    def put(self, epoch: StoredEpoch) -> None:
        with self._lock:
            self._epochs[(epoch.recipient, epoch.epoch_id)] = replace(epoch)

    def record(self, recipient: str, epoch_id: bytes, sequence: int) -> bool:
        with self._lock:
            epoch = self._epochs.get((recipient, epoch_id))
            if epoch is None or not window_admits(epoch, sequence):
                return False
            window_record(epoch, sequence)
            return True

    def erase(self, recipient: str, epoch_id: bytes) -> None:
        with self._lock:
            self._epochs.pop((recipient, epoch_id), None)


class SqliteEpochStore:
    """Epochs on disk (a vehicle's durable store): SQLite, ``synchronous=FULL``.

    The file holds epoch secrets: it needs the protection of the vehicle's private key files.
    An epoch's row, secret included, is deleted once the epoch ends (``prune``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":  # SQLite's in-memory database: no file
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created owner-only before SQLite opens it (its WAL and shm files take the same
            # mode): the rows hold epoch secrets.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS epochs (recipient TEXT, epoch_id BLOB, sender TEXT, "
            "sender_key_id TEXT, suite TEXT, topic TEXT, direction INTEGER, key_path TEXT, "
            "key_ids TEXT, not_after_ms INTEGER, max_messages INTEGER, est_digest BLOB, "
            "secret BLOB, highest INTEGER, window BLOB, PRIMARY KEY (recipient, epoch_id))"
        )
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, recipient: str, epoch_id: bytes) -> StoredEpoch | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM epochs WHERE recipient = ? AND epoch_id = ?", (recipient, epoch_id)
            ).fetchone()
        if row is None:
            return None
        key_ids = tuple(
            (p, k) for p, k in (item.split("\x00", 1) for item in row[8].split("\x01") if item)
        )
        return StoredEpoch(
            row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], key_ids,
            row[9], row[10], row[11], row[12], row[13], int.from_bytes(row[14], "big"),
        )  # fmt: skip

    def put(self, epoch: StoredEpoch) -> None:
        key_ids = "\x01".join(f"{p}\x00{k}" for p, k in epoch.key_ids)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO epochs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    epoch.recipient, epoch.epoch_id, epoch.sender, epoch.sender_key_id,
                    epoch.signature_suite, epoch.topic, epoch.direction, epoch.key_path, key_ids,
                    epoch.not_after_ms, epoch.max_messages, epoch.est_digest, epoch.secret,
                    epoch.highest, epoch.window.to_bytes(8, "big"),
                ),
            )  # fmt: skip

    def record(self, recipient: str, epoch_id: bytes, sequence: int) -> bool:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT highest, window FROM epochs WHERE recipient = ? AND epoch_id = ?",
                    (recipient, epoch_id),
                ).fetchone()
                if row is None:
                    self._db.execute("ROLLBACK")
                    return False
                probe = StoredEpoch(
                    recipient, epoch_id, "", "", "", "", 0, "", (), 0, 0, b"", b"",
                    row[0], int.from_bytes(row[1], "big"),
                )  # fmt: skip
                if not window_admits(probe, sequence):
                    self._db.execute("ROLLBACK")
                    return False
                window_record(probe, sequence)
                self._db.execute(
                    "UPDATE epochs SET highest = ?, window = ? WHERE recipient = ? AND "
                    "epoch_id = ?",
                    (probe.highest, probe.window.to_bytes(8, "big"), recipient, epoch_id),
                )
                self._db.execute("COMMIT")
                return True
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def erase(self, recipient: str, epoch_id: bytes) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM epochs WHERE recipient = ? AND epoch_id = ?", (recipient, epoch_id)
            )

    def prune(self, now: float, skew_s: float = 30.0) -> int:
        """Erase every epoch past its not-after (forward secrecy between epochs)."""
        limit = round((now - skew_s) * 1000)
        with self._lock:
            cursor = self._db.execute("DELETE FROM epochs WHERE not_after_ms < ?", (limit,))
            return cursor.rowcount
