"""The execute-once store of a vehicle agent: which commands each vehicle started and finished,
the response it gave, the wire-format-v2 messages it holds until their epoch is delivered
again, and which uplink epoch each answer went in (SQLite, fsync'ed on every commit)."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["EpochAnswers", "ExecutedStore", "HeldMessage"]

#: Longest command id the store gives back (the wire's text limit, bus.commands).
_MAX_ID: Final = 256


@dataclass(frozen=True)
class HeldMessage:
    """A v2 message of an unknown epoch, kept unopened (docs/wire-format.md V2.7)."""

    digest: bytes  # SHA-256 of ``record``: identifies it (a redelivery is the same message)
    record: bytes
    topic: str


@dataclass(frozen=True)
class EpochAnswers:
    """What the store remembers of the answers sent in one uplink epoch (``answers``)."""

    command_ids: tuple[str, ...]  # in the order they were sent
    unreadable: tuple[str, ...]  # why each corrupt entry was refused


class ExecutedStore:
    """Which commands each vehicle has started and finished, and the response it gave.

    SQLite with ``synchronous=FULL``: a commit is on disk (fsync) before it returns, so
    ``begin`` before running a handler makes execution at most once across crashes, and
    ``finish`` before producing the answer lets a redelivery be answered with the same response.
    ``begin_many`` / ``finish_many`` do the same for many commands in one transaction (one
    fsync): ``VehicleAgent`` claims a whole poll batch at once and records its results at once.

    The same file holds the v2 messages a vehicle cannot open yet (``hold``): their offsets are
    committed once held, so they must survive a restart until the establishment comes again.
    They are unauthenticated bytes: a message is identified by its digest, not by the epoch
    id and sequence in its clear header, so a forged header cannot displace a genuine message.

    And it remembers in which uplink epoch each answer went (``record_answers``), so that the
    answers of an epoch the bus reports unknown are sent again by this process or a later one
    (docs/wire-format.md V2.7.1). Only command ids: the responses are the ``executed`` rows.
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
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS held ("
            " vehicle_id TEXT NOT NULL, digest BLOB NOT NULL, epoch_id BLOB NOT NULL,"
            " sequence INTEGER NOT NULL, expires_at REAL NOT NULL, record BLOB NOT NULL,"
            " topic TEXT NOT NULL, PRIMARY KEY (vehicle_id, digest))"
        )
        # ``n`` orders the answers (SQLite gives a new row a rowid above every existing one).
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answered ("
            " n INTEGER PRIMARY KEY, vehicle_id TEXT NOT NULL, epoch_id BLOB NOT NULL,"
            " command_id TEXT NOT NULL, UNIQUE (vehicle_id, epoch_id, command_id))"
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

    def hold(
        self,
        vehicle_id: str,
        epoch_id: bytes,
        sequence: int,
        expires_at: float,
        record: bytes,
        topic: str,
        *,
        expired_before: float,
        limit: int,
    ) -> bool:
        """Keep a message of an unknown epoch (durable when this returns); False when the
        vehicle already holds ``limit`` unexpired messages. Messages of the vehicle that expired
        before ``expired_before`` are dropped first; holding the same record again is a no-op."""
        digest = hashlib.sha256(record).digest()
        with self._lock, self._transaction():
            self._db.execute(
                "DELETE FROM held WHERE vehicle_id = ? AND expires_at < ?",
                (vehicle_id, expired_before),
            )
            if self._db.execute(
                "SELECT 1 FROM held WHERE vehicle_id = ? AND digest = ?", (vehicle_id, digest)
            ).fetchone():
                return True
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM held WHERE vehicle_id = ?", (vehicle_id,)
            ).fetchone()
            if count >= limit:
                return False
            self._db.execute(
                "INSERT INTO held VALUES (?, ?, ?, ?, ?, ?, ?)",
                (vehicle_id, digest, epoch_id, sequence, expires_at, record, topic),
            )
        return True

    def held(self, vehicle_id: str, epoch_id: bytes, *, expired_before: float) -> list[HeldMessage]:
        """The unexpired messages the vehicle holds for ``epoch_id``, in sequence order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT digest, record, topic FROM held WHERE vehicle_id = ? AND epoch_id = ?"
                " AND expires_at >= ? ORDER BY sequence, digest",
                (vehicle_id, epoch_id, expired_before),
            ).fetchall()
        return [HeldMessage(bytes(d), bytes(r), str(t)) for d, r, t in rows]

    def held_epochs(self, vehicle_id: str, *, expired_before: float) -> list[tuple[bytes, int]]:
        """``(epoch id, lowest sequence)`` of each epoch the vehicle holds unexpired messages of,
        ordered by epoch id."""
        with self._lock:
            rows = self._db.execute(
                "SELECT epoch_id, MIN(sequence) FROM held WHERE vehicle_id = ? AND expires_at >= ?"
                " GROUP BY epoch_id ORDER BY epoch_id",
                (vehicle_id, expired_before),
            ).fetchall()
        return [(bytes(e), int(q)) for e, q in rows]

    def release(self, vehicle_id: str, digests: Sequence[bytes]) -> None:
        """Forget held messages that were handled (one transaction)."""
        if not digests:
            return
        with self._lock, self._transaction():
            self._db.executemany(
                "DELETE FROM held WHERE vehicle_id = ? AND digest = ?",
                [(vehicle_id, d) for d in digests],
            )

    def record_answers(
        self, answers: Sequence[tuple[str, bytes, str]], *, epochs: int, id_bytes: int
    ) -> None:
        """Remember the uplink epoch of each ``(vehicle_id, epoch_id, command_id)`` answer sent,
        in one transaction (durable when this returns). Per vehicle only the ``epochs`` epochs
        answered in last and at most ``id_bytes`` bytes of command ids are kept, the oldest
        answers forgotten first; past ``id_bytes``, down to three quarters of it, so that the
        trim runs once per quarter of the bound, not on every write."""
        if not answers:
            return
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO answered (vehicle_id, epoch_id, command_id)"
                " VALUES (?, ?, ?)",
                answers,
            )
            for vehicle_id in sorted({vid for vid, _, _ in answers}):
                kept, size = self._db.execute(
                    "SELECT COUNT(DISTINCT epoch_id), SUM(length(CAST(command_id AS BLOB)))"
                    " FROM answered WHERE vehicle_id = ?",
                    (vehicle_id,),
                ).fetchone()
                if kept > epochs:
                    self._db.execute(
                        "DELETE FROM answered WHERE vehicle_id = ? AND epoch_id NOT IN ("
                        " SELECT epoch_id FROM answered WHERE vehicle_id = ?"
                        " GROUP BY epoch_id ORDER BY MAX(n) DESC LIMIT ?)",
                        (vehicle_id, vehicle_id, epochs),
                    )
                if size > id_bytes:
                    self._db.execute(
                        "DELETE FROM answered WHERE vehicle_id = ? AND n <= ("
                        " SELECT MAX(n) FROM (SELECT n, SUM(length(CAST(command_id AS BLOB)))"
                        " OVER (ORDER BY n DESC) AS newer FROM answered WHERE vehicle_id = ?)"
                        " WHERE newer > ?)",
                        (vehicle_id, vehicle_id, id_bytes * 3 // 4),
                    )

    def answers(self, vehicle_id: str, epoch_id: bytes) -> EpochAnswers:
        """The answers ``vehicle_id`` sent in uplink ``epoch_id``, as far as the store has them.
        An entry that is not a command id (a corrupt file, a bad write) is refused, not given
        back, and said why in ``unreadable``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT n, command_id FROM answered WHERE vehicle_id = ? AND epoch_id = ?"
                " ORDER BY n",
                (vehicle_id, epoch_id),
            ).fetchall()
        ids: list[str] = []
        unreadable: list[str] = []
        for n, command_id in rows:
            if type(command_id) is str and 0 < len(command_id) <= _MAX_ID and command_id.isascii():
                ids.append(command_id)
            else:
                size = len(command_id) if isinstance(command_id, str | bytes) else 0
                unreadable.append(
                    f"answer entry {n} of uplink epoch {epoch_id.hex()} in {self.path} is not a"
                    f" command id (a {type(command_id).__name__} of length {size})"
                )
        return EpochAnswers(tuple(ids), tuple(unreadable))

    def forget_answers(self, vehicle_id: str, epoch_id: bytes) -> None:
        """Forget the answers of an uplink epoch once they were sent again (durable)."""
        with self._lock, self._transaction():
            self._db.execute(
                "DELETE FROM answered WHERE vehicle_id = ? AND epoch_id = ?", (vehicle_id, epoch_id)
            )

    def prune(self, now: float, *, skew_s: float = 0.0) -> int:
        """Forget commands whose envelopes can no longer be opened (expired + grace), held
        messages past their expiry (+ ``skew_s``, the clock skew the opener allows), and the
        answers whose command is forgotten (nothing left to send again)."""
        with self._lock:
            executed = self._db.execute("DELETE FROM executed WHERE keep_until < ?", (now,))
            held = self._db.execute("DELETE FROM held WHERE expires_at < ?", (now - skew_s,))
            answered = self._db.execute(
                "DELETE FROM answered WHERE NOT EXISTS (SELECT 1 FROM executed e WHERE"
                " e.vehicle_id = answered.vehicle_id AND e.command_id = answered.command_id)"
            )
            return executed.rowcount + held.rowcount + answered.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
