"""The hash-chained audit trail's writer side: records, signed checkpoints and their encoding,
and ``AuditChain``, the writer of one chain. The format, the signing cadence and what a verifier
can and cannot detect are in ``docs/audit.md``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import cbor2

from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import Signer
from fleetbus.observability.metrics import AUDIT_RECORDS, on_commit

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
