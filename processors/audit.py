"""The hash-chained audit trail: records, signed checkpoints, and a verifier that finds breaks.

One chain per writer: every (stage, input partition) pair owns a chain named
``"{stage}-{partition}"``, written only by that partition's transactional producer, so the
chain's order is the order of committed transactions. All chains share the single-partition
audit topic, keyed by chain id. The format and the verify rules are in ``docs/audit.md``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import cbor2

from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import Signer, Verifier
from fleetbus.observability.metrics import AUDIT_RECORDS, on_commit

__all__ = [
    "AUDIT_FORMAT",
    "GENESIS_HASH",
    "AuditBreak",
    "AuditChain",
    "AuditEvent",
    "AuditRecord",
    "ChainHead",
    "Checkpoint",
    "VerifyReport",
    "checkpoint_signing_input",
    "decode_entry",
    "record_hash",
    "verify_entries",
]

AUDIT_FORMAT: Final = 1
GENESIS_HASH: Final = b"\x00" * 32
CHECKPOINT_CONTEXT: Final = "fleetbus-audit-checkpoint-v1"

DetailValue = str | int | float | bool | None


def _dumps(value: object) -> bytes:
    return cbor2.dumps(value, canonical=True)


def _malformed(what: str) -> FleetbusError:
    return FleetbusError(f"malformed audit entry: {what}", reason=ReasonCode.MALFORMED)


@dataclass(frozen=True)
class AuditEvent:
    """What a stage wants on the record: who did what to which command, and why."""

    actor: str
    event: str
    command_id: str | None = None
    reason: str | None = None
    detail: Mapping[str, DetailValue] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    """One link of a chain. ``at`` is epoch milliseconds."""

    chain: str
    seq: int
    prev_hash: bytes
    at: int
    actor: str
    event: str
    command_id: str | None
    reason: str | None
    detail: Mapping[str, DetailValue]

    def to_cbor(self) -> bytes:
        return _dumps(
            {
                "chain": self.chain,
                "seq": self.seq,
                "prev_hash": self.prev_hash,
                "at": self.at,
                "actor": self.actor,
                "event": self.event,
                "command_id": self.command_id,
                "reason": self.reason,
                "detail": dict(self.detail),
            }
        )

    @classmethod
    def from_cbor(cls, data: bytes) -> AuditRecord:
        try:
            m = cbor2.loads(data)
            record = cls(
                chain=str(m["chain"]),
                seq=int(m["seq"]),
                prev_hash=bytes(m["prev_hash"]),
                at=int(m["at"]),
                actor=str(m["actor"]),
                event=str(m["event"]),
                command_id=m["command_id"],
                reason=m["reason"],
                detail=dict(m["detail"]),
            )
        except Exception as exc:
            raise _malformed("record body") from exc
        return record


def record_hash(prev_hash: bytes, record_bytes: bytes) -> bytes:
    """``SHA-256(prev_hash || record bytes)``: the link to the next record."""
    return hashlib.sha256(prev_hash + record_bytes).digest()


@dataclass(frozen=True)
class Checkpoint:
    """A signature by the bus sealer over a chain's head after record ``seq``."""

    chain: str
    seq: int
    head: bytes
    at: int
    signer: str
    key_id: str
    suite: str
    signature: bytes = field(repr=False)

    def signing_input(self) -> bytes:
        return checkpoint_signing_input(
            self.chain, self.seq, self.head, self.at, self.signer, self.key_id, self.suite
        )


def checkpoint_signing_input(
    chain: str, seq: int, head: bytes, at: int, signer: str, key_id: str, suite: str
) -> bytes:
    """``canonical CBOR([context, chain, seq, head, at, signer, key id, suite])``."""
    return _dumps([CHECKPOINT_CONTEXT, chain, seq, head, at, signer, key_id, suite])


def encode_record_entry(record: AuditRecord) -> tuple[bytes, bytes]:
    """The Kafka value of a record and the record's hash."""
    body = record.to_cbor()
    digest = record_hash(record.prev_hash, body)
    return _dumps({"v": AUDIT_FORMAT, "type": "record", "record": body, "hash": digest}), digest


def encode_checkpoint_entry(cp: Checkpoint) -> bytes:
    return _dumps(
        {
            "v": AUDIT_FORMAT,
            "type": "checkpoint",
            "chain": cp.chain,
            "seq": cp.seq,
            "head": cp.head,
            "at": cp.at,
            "signer": cp.signer,
            "key_id": cp.key_id,
            "suite": cp.suite,
            "signature": cp.signature,
        }
    )


@dataclass(frozen=True)
class RecordEntry:
    record: AuditRecord
    body: bytes
    stored_hash: bytes


def decode_entry(value: bytes) -> RecordEntry | Checkpoint:
    """Parse an audit-topic value into a record entry or a checkpoint (MALFORMED otherwise)."""
    try:
        m = cbor2.loads(value)
        if not isinstance(m, dict) or m.get("v") != AUDIT_FORMAT:
            raise _malformed("unknown format")
        if m["type"] == "record":
            body = bytes(m["record"])
            return RecordEntry(AuditRecord.from_cbor(body), body, bytes(m["hash"]))
        if m["type"] == "checkpoint":
            return Checkpoint(
                chain=str(m["chain"]),
                seq=int(m["seq"]),
                head=bytes(m["head"]),
                at=int(m["at"]),
                signer=str(m["signer"]),
                key_id=str(m["key_id"]),
                suite=str(m["suite"]),
                signature=bytes(m["signature"]),
            )
    except FleetbusError:
        raise
    except Exception as exc:
        raise _malformed("not an audit entry") from exc
    raise _malformed(f"unknown entry type {m.get('type')!r}")


# --- writing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainHead:
    """Where a chain stands: the next sequence number and the hash of the last record."""

    next_seq: int = 0
    last_hash: bytes = GENESIS_HASH

    def to_cbor(self) -> bytes:
        return _dumps([self.next_seq, self.last_hash])

    @classmethod
    def from_cbor(cls, data: bytes) -> ChainHead:
        try:
            seq, digest = cbor2.loads(data)
            return cls(int(seq), bytes(digest))
        except Exception as exc:
            raise _malformed("chain head") from exc


class AuditChain:
    """Appends records to one chain; every ``checkpoint_every`` records adds a signed
    checkpoint. ``head`` is the state to persist (in the same transaction as the records)."""

    def __init__(
        self,
        chain: str,
        *,
        head: ChainHead | None = None,
        signer: Signer | None = None,
        signer_principal: str = "",
        checkpoint_every: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if checkpoint_every < 1:
            raise FleetbusError("checkpoint_every must be >= 1", reason=ReasonCode.CONFIG)
        self.chain = chain
        self.head = head or ChainHead()
        self._signer = signer
        self._signer_principal = signer_principal
        self._every = checkpoint_every
        self._clock = clock

    def append(self, event: AuditEvent) -> list[bytes]:
        """The audit-topic values for ``event``: its record, then a checkpoint when one is due."""
        at = round(self._clock() * 1000)
        record = AuditRecord(
            chain=self.chain,
            seq=self.head.next_seq,
            prev_hash=self.head.last_hash,
            at=at,
            actor=event.actor,
            event=event.event,
            command_id=event.command_id,
            reason=event.reason,
            detail=dict(event.detail),
        )
        value, digest = encode_record_entry(record)
        self.head = ChainHead(record.seq + 1, digest)
        on_commit(AUDIT_RECORDS.labels(event=event.event).inc)
        out = [value]
        if self._signer is not None and self.head.next_seq % self._every == 0:
            out.append(self.checkpoint(at))
        return out

    def checkpoint(self, at: int | None = None) -> bytes:
        """A signed checkpoint over the current head."""
        if self._signer is None:
            raise FleetbusError("this chain has no checkpoint signer", reason=ReasonCode.CONFIG)
        if self.head.next_seq == 0:
            raise FleetbusError("an empty chain has no head to sign", reason=ReasonCode.CONFIG)
        at = round(self._clock() * 1000) if at is None else at
        seq = self.head.next_seq - 1
        tbs = checkpoint_signing_input(
            self.chain,
            seq,
            self.head.last_hash,
            at,
            self._signer_principal,
            self._signer.key_id,
            self._signer.suite,
        )
        cp = Checkpoint(
            chain=self.chain,
            seq=seq,
            head=self.head.last_hash,
            at=at,
            signer=self._signer_principal,
            key_id=self._signer.key_id,
            suite=self._signer.suite,
            signature=self._signer.sign(tbs),
        )
        on_commit(AUDIT_RECORDS.labels(event="checkpoint").inc)
        return encode_checkpoint_entry(cp)


# --- verifying -----------------------------------------------------------------------------


class CheckpointVerifiers(Protocol):
    """What the verifier needs from the key directory (``KeyDirectory`` satisfies it)."""

    def verifier_for(self, principal_id: str, key_id: str, *, at: float) -> Verifier: ...


@dataclass(frozen=True)
class AuditBreak:
    """Where a chain stops verifying. ``kind``: malformed, tampered, missing, reordered,
    bad_checkpoint."""

    chain: str
    seq: int | None
    offset: int
    kind: str
    detail: str

    def __str__(self) -> str:
        seq = "?" if self.seq is None else str(self.seq)
        return f"chain {self.chain}: {self.kind} at seq {seq} (offset {self.offset}): {self.detail}"


@dataclass
class VerifyReport:
    records: dict[str, int] = field(default_factory=dict)
    checkpoints: dict[str, int] = field(default_factory=dict)
    breaks: list[AuditBreak] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks


@dataclass
class _ChainCursor:
    expected_seq: int = 0
    last_hash: bytes = GENESIS_HASH
    broken: bool = False


def verify_entries(
    entries: Iterable[tuple[int, bytes | None, bytes | None]],
    directory: CheckpointVerifiers | None,
    *,
    require_checkpoint_signer: str | None = None,
) -> VerifyReport:
    """Verify ``(offset, key, value)`` entries of the audit topic in offset order.

    Each chain is checked from its genesis: sequence numbers without gaps (``missing``) or
    steps back (``reordered``), each stored hash equal to ``SHA-256(prev_hash || record)`` and
    each ``prev_hash`` equal to the previous record's hash (``tampered``), each checkpoint
    naming the current head and carrying a valid signature of a directory key valid at the
    checkpoint's time (``bad_checkpoint``). The first break of a chain ends that chain's check.
    With ``directory`` None, checkpoint signatures are not checked (heads still are).
    """
    report = VerifyReport()
    cursors: dict[str, _ChainCursor] = {}

    def fail(chain: str, seq: int | None, offset: int, kind: str, detail: str) -> None:
        cursors.setdefault(chain, _ChainCursor()).broken = True
        report.breaks.append(AuditBreak(chain, seq, offset, kind, detail))

    for offset, key, value in entries:
        chain_hint = key.decode(errors="replace") if key else "?"
        if value is None:
            fail(chain_hint, None, offset, "malformed", "tombstone on the audit topic")
            continue
        try:
            entry = decode_entry(value)
        except FleetbusError as exc:
            if not cursors.get(chain_hint, _ChainCursor()).broken:
                fail(chain_hint, None, offset, "malformed", str(exc))
            continue
        chain = entry.record.chain if isinstance(entry, RecordEntry) else entry.chain
        cursor = cursors.setdefault(chain, _ChainCursor())
        if cursor.broken:
            continue
        if isinstance(entry, RecordEntry):
            rec = entry.record
            if rec.seq > cursor.expected_seq:
                fail(
                    chain,
                    cursor.expected_seq,
                    offset,
                    "missing",
                    f"records {cursor.expected_seq}..{rec.seq - 1} are missing",
                )
                continue
            if rec.seq < cursor.expected_seq:
                fail(chain, rec.seq, offset, "reordered", f"expected seq {cursor.expected_seq}")
                continue
            if record_hash(rec.prev_hash, entry.body) != entry.stored_hash:
                fail(chain, rec.seq, offset, "tampered", "record does not match its hash")
                continue
            if rec.prev_hash != cursor.last_hash:
                fail(
                    chain,
                    rec.seq,
                    offset,
                    "tampered",
                    "prev_hash is not the previous record's hash",
                )
                continue
            cursor.expected_seq += 1
            cursor.last_hash = entry.stored_hash
            report.records[chain] = report.records.get(chain, 0) + 1
        else:
            problem = _check_checkpoint(entry, cursor, directory, require_checkpoint_signer)
            if problem is not None:
                fail(chain, entry.seq, offset, "bad_checkpoint", problem)
                continue
            report.checkpoints[chain] = report.checkpoints.get(chain, 0) + 1
    return report


def _check_checkpoint(
    cp: Checkpoint,
    cursor: _ChainCursor,
    directory: CheckpointVerifiers | None,
    signer: str | None,
) -> str | None:
    if cp.seq != cursor.expected_seq - 1 or cp.head != cursor.last_hash:
        return "checkpoint does not name the chain's head"
    if signer is not None and cp.signer != signer:
        return f"checkpoint signed by {cp.signer!r}, expected {signer!r}"
    if directory is None:
        return None
    try:
        verifier = directory.verifier_for(cp.signer, cp.key_id, at=cp.at / 1000)
    except FleetbusError as exc:
        return f"checkpoint signer key not usable: {exc.reason.value}"
    if verifier.suite != cp.suite:
        return "checkpoint suite does not match the signer's key"
    try:
        ok = verifier.verify(cp.signing_input(), cp.signature) is True
    except Exception:
        ok = False
    return None if ok else "checkpoint signature does not verify"


def head_from_entries(entries: Iterable[bytes], chain: str) -> ChainHead:
    """The head of ``chain`` after the given audit values (for tools; stages keep heads in
    their state changelog)."""
    head = ChainHead()
    for value in entries:
        entry = decode_entry(value)
        if isinstance(entry, RecordEntry) and entry.record.chain == chain:
            head = ChainHead(entry.record.seq + 1, entry.stored_hash)
    return head
