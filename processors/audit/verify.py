"""The audit trail's verifier: reads the entries of the audit topic and finds where a chain
breaks (malformed, tampered, missing, reordered, bad or missing checkpoints)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from fleetbus.bus.directory import KeyRecord
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import Verifier
from fleetbus.processors.audit.chain import (
    CHECKPOINT_SIGNER_KIND,
    GENESIS_HASH,
    Checkpoint,
    RecordEntry,
    decode_entry,
    record_hash,
)


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
