"""Typed errors with machine-readable reason codes, reused by the DLQ, metrics and audit."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ConfigError",
    "FleetbusError",
    "KafkaUnavailableError",
    "ReasonCode",
]


class ReasonCode(StrEnum):
    """Why a record was rejected. Values are stable: they appear in DLQ records and metrics."""

    # Parsing
    MALFORMED = "malformed"  # not CBOR, wrong types, duplicate map keys, missing fields
    OVERSIZE = "oversize"
    UNSUPPORTED_VERSION = "unsupported_version"
    # Authenticity
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_SIGNER = "unknown_signer"
    SIGNER_EXPIRED = "signer_expired"
    SIGNER_REVOKED = "signer_revoked"
    # Signed material older than what the loader has accepted (a directory head below the
    # highest seen, records that do not match the current head): rollback of signed material.
    DIRECTORY_ROLLBACK = "directory_rollback"
    # Binding and freshness
    WRONG_RECIPIENT = "wrong_recipient"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REPLAYED = "replayed"
    # The sender's share of a replay or hold state is full: its records are refused (fail
    # closed, for that sender only) until some of its entries expire.
    SENDER_STATE_FULL = "sender_state_full"
    DOWNGRADE = "downgrade"
    TAMPERED = "tampered"  # AEAD open failed: ciphertext, associated data or header changed
    UNKNOWN_KEY_ID = "unknown_key_id"
    # Wire format v2: a message of an epoch the recipient does not hold (it answers with a
    # status so that the sender delivers the establishment again), and a sequence number
    # beyond the epoch's announced limit.
    EPOCH_UNKNOWN = "epoch_unknown"
    EPOCH_EXHAUSTED = "epoch_exhausted"
    # Key paths
    KEY_PROVIDER_FAILED = "key_provider_failed"
    KEY_PATH_EXHAUSTED = "key_path_exhausted"
    QKD_UNAVAILABLE = "qkd_unavailable"
    # Policy
    POLICY_DENIED = "policy_denied"
    TOO_MANY_APPROVALS = "too_many_approvals"  # a command id's early-approval slots are full
    # A valid approval signed for another command under the same id (its command digest
    # differs): a replayed or misdirected approval; it counts for nothing.
    APPROVAL_MISMATCH = "approval_mismatch"
    # Operations
    CONFIG = "config"
    KAFKA_UNAVAILABLE = "kafka_unavailable"
    # A fault of fleetbus itself (a bug, an unexpected exception in stage logic), never of the
    # input: alerted on (fleetbus_internal_errors_total), unlike the reasons above.
    INTERNAL = "internal"


class FleetbusError(Exception):
    """Base error. `reason` is a bounded, secret-free code safe for metrics labels.

    A raise site that gives no reason (and whose class sets none) gets ``INTERNAL``: a
    forgotten reason is our fault, and must be alerted on, not filed as bad input.
    """

    reason: ReasonCode = ReasonCode.INTERNAL

    def __init__(self, message: str, *, reason: ReasonCode | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(FleetbusError):
    """Settings or environment are unusable; the message says which and how to fix it."""

    reason = ReasonCode.CONFIG


class KafkaUnavailableError(FleetbusError):
    """No Kafka broker answered in time."""

    reason = ReasonCode.KAFKA_UNAVAILABLE
