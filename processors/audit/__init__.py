"""The hash-chained audit trail: records, signed checkpoints, and a verifier that finds breaks.

One chain per writer: every (stage, input partition) pair owns a chain named
``"{stage}-{partition}"``, written only by that partition's transactional producer, so the
chain's order is the order of committed transactions. All chains share the single-partition
audit topic, keyed by chain id. The format, the signing cadence and what a verifier can and
cannot detect are in ``docs/audit.md``.
"""

from fleetbus.processors.audit.chain import (
    AUDIT_FORMAT,
    CHECKPOINT_FORMAT,
    CHECKPOINT_SIGNER_KIND,
    GENESIS_HASH,
    AuditChain,
    AuditEvent,
    AuditRecord,
    ChainHead,
    Checkpoint,
    checkpoint_signing_input,
    decode_entry,
    record_hash,
)
from fleetbus.processors.audit.verify import AuditBreak, VerifyReport, verify_entries

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
