"""The execute-once store of a vehicle agent: which commands each vehicle started and finished,
and the response it gave (SQLite, fsync'ed on every commit)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["ExecutedStore"]


class ExecutedStore:
    """Which commands each vehicle has started and finished, and the response it gave.

    SQLite with ``synchronous=FULL``: a commit is on disk (fsync) before it returns, so
    ``begin`` before running a handler makes execution at most once across crashes, and
    ``finish`` before producing the answer lets a redelivery be answered with the same response.
    ``begin_many`` / ``finish_many`` do the same for many commands in one transaction (one
    fsync): ``VehicleAgent`` claims a whole poll batch at once and records its results at once.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS executed ("
            " vehicle_id TEXT NOT NULL, command_id TEXT NOT NULL,"
            " state TEXT NOT NULL CHECK (state IN ('started', 'finished')),"
            " response BLOB, keep_until REAL NOT NULL,"
            " PRIMARY KEY (vehicle_id, command_id))"
        )

    def lookup(self, vehicle_id: str, command_id: str) -> tuple[str, bytes | None] | None:
        """``(state, response bytes)`` of a command, or None if this vehicle never started it."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, response FROM executed WHERE vehicle_id = ? AND command_id = ?",
                (vehicle_id, command_id),
            ).fetchone()
        return None if row is None else (str(row[0]), row[1])

    def begin(self, vehicle_id: str, command_id: str, *, keep_until: float) -> bool:
        """Record that execution starts; False if the command was already started."""
        return bool(self.begin_many([(vehicle_id, command_id, keep_until)]))

    def begin_many(self, claims: Sequence[tuple[str, str, float]]) -> set[tuple[str, str]]:
        """Record that execution of each ``(vehicle_id, command_id, keep_until)`` starts, all in
        one transaction (durable when this returns); the ``(vehicle_id, command_id)`` pairs that
        were not started before. Nothing is recorded if it raises."""
        started: set[tuple[str, str]] = set()
        if not claims:
            return started
        with self._lock, self._transaction():
            for vehicle_id, command_id, keep_until in claims:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO executed VALUES (?, ?, 'started', NULL, ?)",
                    (vehicle_id, command_id, keep_until),
                )
                if cursor.rowcount == 1:
                    started.add((vehicle_id, command_id))
        return started

    def finish(self, vehicle_id: str, command_id: str, response: bytes) -> None:
        self.finish_many([(vehicle_id, command_id, response)])

    def finish_many(self, results: Sequence[tuple[str, str, bytes]]) -> None:
        """Record ``(vehicle_id, command_id, response)`` of finished commands in one transaction
        (durable when this returns)."""
        if not results:
            return
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE executed SET state = 'finished', response = ?"
                " WHERE vehicle_id = ? AND command_id = ?",
                [(response, vid, cid) for vid, cid, response in results],
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def prune(self, now: float) -> int:
        """Forget commands whose envelopes can no longer be opened (expired + grace)."""
        with self._lock:
            return self._db.execute("DELETE FROM executed WHERE keep_until < ?", (now,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
