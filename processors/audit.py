"""The hash-chained audit trail: records, signed checkpoints, and a verifier that finds breaks.

One chain per writer: every (stage, input partition) pair owns a chain named
``"{stage}-{partition}"``, written only by that partition's transactional producer, so the
chain's order is the order of committed transactions. All chains share the single-partition
audit topic, keyed by chain id. The format, the signing cadence and what a verifier can and
cannot detect are in ``docs/audit.md``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import cbor2

from fleetbus.bus.directory import KeyRecord
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import Signer, Verifier
from fleetbus.observability.metrics import AUDIT_RECORDS, on_commit

__all__ = [
    "AUDIT_FORMAT",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_SIGNER_KIND",
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
#: Checkpoint entries are format 2: they sign the writer's cadence (format 1 did not, so a
#: verifier could not tell how many checkpoints a chain should have).
CHECKPOINT_FORMAT: Final = 2
GENESIS_HASH: Final = b"\x00" * 32
CHECKPOINT_CONTEXT: Final = "fleetbus-audit-checkpoint-v2"
#: The key-directory kind whose keys may sign checkpoints: the bus sealer's role.
CHECKPOINT_SIGNER_KIND: Final = "sealer"

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
    """A signature by the bus sealer over a chain's head after record ``seq``. ``every`` is
    the writer's promise: its next checkpoint comes at most ``every`` records later."""

    chain: str
    seq: int
    head: bytes
    at: int
    signer: str
    key_id: str
    suite: str
    every: int
    signature: bytes = field(repr=False)

    def signing_input(self) -> bytes:
        return checkpoint_signing_input(
            self.chain,
            self.seq,
            self.head,
            self.at,
            self.signer,
            self.key_id,
            self.suite,
            self.every,
        )


def checkpoint_signing_input(
    chain: str, seq: int, head: bytes, at: int, signer: str, key_id: str, suite: str, every: int
) -> bytes:
    """``canonical CBOR([context, chain, seq, head, at, signer, key id, suite, every])``."""
    return _dumps([CHECKPOINT_CONTEXT, chain, seq, head, at, signer, key_id, suite, every])


def encode_record_entry(record: AuditRecord) -> tuple[bytes, bytes]:
    """The Kafka value of a record and the record's hash."""
    body = record.to_cbor()
    digest = record_hash(record.prev_hash, body)
    return _dumps({"v": AUDIT_FORMAT, "type": "record", "record": body, "hash": digest}), digest


def encode_checkpoint_entry(cp: Checkpoint) -> bytes:
    return _dumps(
        {
            "v": CHECKPOINT_FORMAT,
            "type": "checkpoint",
            "chain": cp.chain,
            "seq": cp.seq,
            "head": cp.head,
            "at": cp.at,
            "signer": cp.signer,
            "key_id": cp.key_id,
            "suite": cp.suite,
            "every": cp.every,
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
        if not isinstance(m, dict):
            raise _malformed("unknown format")
        if m.get("type") == "record" and m.get("v") == AUDIT_FORMAT:
            body = bytes(m["record"])
            return RecordEntry(AuditRecord.from_cbor(body), body, bytes(m["hash"]))
        if m.get("type") == "checkpoint" and m.get("v") == CHECKPOINT_FORMAT:
            return Checkpoint(
                chain=str(m["chain"]),
                seq=int(m["seq"]),
                head=bytes(m["head"]),
                at=int(m["at"]),
                signer=str(m["signer"]),
                key_id=str(m["key_id"]),
                suite=str(m["suite"]),
                every=int(m["every"]),
                signature=bytes(m["signature"]),
            )
        if m.get("type") in ("record", "checkpoint"):
            raise _malformed(f"unknown {m['type']} format {m.get('v')!r}")
    except FleetbusError:
        raise
    except Exception as exc:
        raise _malformed("not an audit entry") from exc
    raise _malformed(f"unknown entry type {m.get('type')!r}")


# --- writing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainHead:
    """Where a chain stands: the next sequence number, the hash of the last record, and how
    many records (from genesis) a signed checkpoint covers."""

    next_seq: int = 0
    last_hash: bytes = GENESIS_HASH
    signed_through: int = 0

    @property
    def unsigned(self) -> int:
        """Records after the last checkpoint."""
        return self.next_seq - self.signed_through

    def to_cbor(self) -> bytes:
        return _dumps([self.next_seq, self.last_hash, self.signed_through])

    @classmethod
    def from_cbor(cls, data: bytes) -> ChainHead:
        try:
            fields = cbor2.loads(data)
            # A head saved before checkpoints were tracked has two fields: treat everything as
            # unsigned, so the resumed writer signs it first (one extra checkpoint, no gap).
            seq, digest, signed = (*fields, 0) if len(fields) == 2 else fields
            head = cls(int(seq), bytes(digest), int(signed))
        except Exception as exc:
            raise _malformed("chain head") from exc
        if not 0 <= head.signed_through <= head.next_seq:
            raise _malformed("chain head")
        return head


class AuditChain:
    """Appends records to one chain and signs its head: after at most ``checkpoint_every``
    unsigned records, first thing in a run that resumes an unsigned head (the previous run
    ended before it could sign), and on ``seal`` (the stage calls it every tick and at the end
    of a run). ``head`` is the state to persist (in the same transaction as the values)."""

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
        # Records before this seq were written by an earlier run; derived from the head (not
        # a flag) so that rolling the head back after an aborted transaction redoes the seal.
        self._run_start = self.head.next_seq
        self._signer = signer
        self._signer_principal = signer_principal
        self._every = checkpoint_every
        self._clock = clock

    def append(self, event: AuditEvent) -> list[bytes]:
        """The audit-topic values for ``event``: a checkpoint over an earlier run's unsigned
        tail if there is one, its record, then a checkpoint when one is due."""
        at = round(self._clock() * 1000)
        out: list[bytes] = []
        if self._signer is not None and self.head.signed_through < self._run_start:
            out.append(self.checkpoint(at))
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
        self.head = ChainHead(record.seq + 1, digest, self.head.signed_through)
        on_commit(AUDIT_RECORDS.labels(event=event.event).inc)
        out.append(value)
        if self._signer is not None and self.head.unsigned >= self._every:
            out.append(self.checkpoint(at))
        return out

    def seal(self) -> list[bytes]:
        """A checkpoint over the head if records after the last one are unsigned, else none."""
        if self._signer is None or self.head.unsigned == 0:
            return []
        return [self.checkpoint()]

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
            self._every,
        )
        cp = Checkpoint(
            chain=self.chain,
            seq=seq,
            head=self.head.last_hash,
            at=at,
            signer=self._signer_principal,
            key_id=self._signer.key_id,
            suite=self._signer.suite,
            every=self._every,
            signature=self._signer.sign(tbs),
        )
        self.head = ChainHead(self.head.next_seq, self.head.last_hash, self.head.next_seq)
        on_commit(AUDIT_RECORDS.labels(event="checkpoint").inc)
        return encode_checkpoint_entry(cp)


# --- verifying -----------------------------------------------------------------------------


class CheckpointVerifiers(Protocol):
    """What the verifier needs from the key directory (``KeyDirectory`` satisfies it)."""

    def verifier_for(self, principal_id: str, key_id: str, *, at: float) -> Verifier: ...

    def record(self, key_id: str) -> KeyRecord | None: ...


@dataclass(frozen=True)
class AuditBreak:
    """Where a chain stops verifying. ``kind``: malformed, tampered, missing, reordered,
    bad_checkpoint, unsigned."""

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
    """Per chain: verified records, valid checkpoints, and ``unsigned_tail``, the records after
    the last valid checkpoint (no signature covers them: they could be rewritten or cut off
    without a trace). Broken chains have no tail entry."""

    records: dict[str, int] = field(default_factory=dict)
    checkpoints: dict[str, int] = field(default_factory=dict)
    unsigned_tail: dict[str, int] = field(default_factory=dict)
    breaks: list[AuditBreak] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks


@dataclass
class _ChainCursor:
    expected_seq: int = 0
    last_hash: bytes = GENESIS_HASH
    broken: bool = False
    signed_through: int = 0
    # Unsigned records allowed after the last signed point: the verifier's maximum from
    # genesis, then the cadence signed into the last checkpoint.
    allowance: int = 0
    first_unsigned_offset: int = 0


def verify_entries(
    entries: Iterable[tuple[int, bytes | None, bytes | None]],
    directory: CheckpointVerifiers,
    *,
    checkpoint_signer: str,
    max_checkpoint_every: int,
    max_unsigned_tail: int | None = None,
) -> VerifyReport:
    """Verify ``(offset, key, value)`` entries of the audit topic in offset order.

    Each chain is checked from its genesis: sequence numbers without gaps (``missing``) or
    steps back (``reordered``), each stored hash equal to ``SHA-256(prev_hash || record)`` and
    each ``prev_hash`` equal to the previous record's hash (``tampered``), each checkpoint
    naming the current head, signed by ``checkpoint_signer`` with a directory key of the
    sealer role valid at the checkpoint's time, promising a cadence of at most
    ``max_checkpoint_every`` (``bad_checkpoint``), and no more unsigned records after a
    checkpoint than it promised — after genesis, than ``max_checkpoint_every`` (``unsigned``:
    checkpoints were stripped). With ``max_unsigned_tail`` set, a longer unsigned tail is an
    ``unsigned`` break too. The first break of a chain ends that chain's check.
    """
    if max_checkpoint_every < 1:
        raise FleetbusError("max_checkpoint_every must be >= 1", reason=ReasonCode.CONFIG)
    if not checkpoint_signer:
        raise FleetbusError("name the checkpoint signer to trust", reason=ReasonCode.CONFIG)
    report = VerifyReport()
    cursors: dict[str, _ChainCursor] = {}

    def cursor_of(chain: str) -> _ChainCursor:
        return cursors.setdefault(chain, _ChainCursor(allowance=max_checkpoint_every))

    def fail(chain: str, seq: int | None, offset: int, kind: str, detail: str) -> None:
        cursor_of(chain).broken = True
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
        cursor = cursor_of(chain)
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
            if rec.seq - cursor.signed_through >= cursor.allowance:
                since = (
                    "genesis"
                    if cursor.signed_through == 0
                    else f"the checkpoint at seq {cursor.signed_through - 1}"
                )
                fail(
                    chain,
                    rec.seq,
                    offset,
                    "unsigned",
                    f"more than {cursor.allowance} records since {since} without a signed "
                    "checkpoint (checkpoints removed, or the writer does not sign)",
                )
                continue
            if rec.seq == cursor.signed_through:
                cursor.first_unsigned_offset = offset
            cursor.expected_seq += 1
            cursor.last_hash = entry.stored_hash
            report.records[chain] = report.records.get(chain, 0) + 1
        else:
            problem = _check_checkpoint(
                entry, cursor, directory, checkpoint_signer, max_checkpoint_every
            )
            if problem is not None:
                fail(chain, entry.seq, offset, "bad_checkpoint", problem)
                continue
            cursor.signed_through = cursor.expected_seq
            cursor.allowance = entry.every
            report.checkpoints[chain] = report.checkpoints.get(chain, 0) + 1
    for chain, cursor in sorted(cursors.items()):
        if cursor.broken or cursor.expected_seq == 0:
            continue
        tail = cursor.expected_seq - cursor.signed_through
        report.unsigned_tail[chain] = tail
        if max_unsigned_tail is not None and tail > max_unsigned_tail:
            fail(
                chain,
                cursor.signed_through,
                cursor.first_unsigned_offset,
                "unsigned",
                f"the last {tail} records are not covered by a signed checkpoint "
                f"(at most {max_unsigned_tail} allowed)",
            )
    return report


def _check_checkpoint(
    cp: Checkpoint,
    cursor: _ChainCursor,
    directory: CheckpointVerifiers,
    signer: str,
    max_every: int,
) -> str | None:
    if cp.seq != cursor.expected_seq - 1 or cp.head != cursor.last_hash:
        return "checkpoint does not name the chain's head"
    if cp.signer != signer:
        return f"checkpoint signed by {cp.signer!r}, expected {signer!r}"
    if not 1 <= cp.every <= max_every:
        return f"checkpoint promises one every {cp.every} records, at most {max_every} accepted"
    try:
        verifier = directory.verifier_for(cp.signer, cp.key_id, at=cp.at / 1000)
    except FleetbusError as exc:
        return f"checkpoint signer key not usable: {exc.reason.value}"
    record = directory.record(cp.key_id)
    if record is None or record.kind != CHECKPOINT_SIGNER_KIND:
        kind = "unknown" if record is None else record.kind
        return f"checkpoint signer {cp.signer!r} is a {kind}, not the bus sealer"
    if verifier.suite != cp.suite:
        return "checkpoint suite does not match the signer's key"
    try:
        ok = verifier.verify(cp.signing_input(), cp.signature) is True
    except Exception:
        ok = False
    return None if ok else "checkpoint signature does not verify"
