"""What sealing and opening share, in both wire formats: epoch policy, message keys, key
recovery, signer lookup."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetbus.bus.envelope import (
    MESSAGE_KEY_INFO,
    EnvelopeError,
    KeyRef,
    MessageKind,
    canonical_dumps,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import (
    KeyPath,
    PrivateKeySet,
    RecipientKeys,
    SecurityProfile,
    Verifier,
)
from fleetbus.providers.keypath import KeyPathRunner

Clock = Callable[[], float]

_SIGNER_REASONS = frozenset(
    {
        ReasonCode.UNKNOWN_SIGNER,
        ReasonCode.SIGNER_EXPIRED,
        ReasonCode.SIGNER_REVOKED,
        ReasonCode.NOT_YET_VALID,
    }
)
_DIRECTORY_PASSTHROUGH = frozenset(
    {ReasonCode.KAFKA_UNAVAILABLE, ReasonCode.CONFIG, ReasonCode.INTERNAL}
)
# Recovery failures that are not evidence of tampering: the caller may retry or must fix config.
_RECOVERY_PASSTHROUGH = frozenset(
    {ReasonCode.UNKNOWN_KEY_ID, ReasonCode.QKD_UNAVAILABLE, ReasonCode.CONFIG}
)


def derive_message_key(epoch_key: bytes, protected: bytes) -> bytes:
    """``HKDF-SHA256(salt=none, ikm=epoch_key, info=MESSAGE_KEY_INFO || SHA-256(protected))``.

    The protected header holds a fresh IV, the message id and the epoch sequence number, so
    every message of an epoch gets its own AES-256 key.
    """
    info = MESSAGE_KEY_INFO + hashlib.sha256(protected).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(epoch_key)


@dataclass(frozen=True)
class EpochPolicy:
    """How long one established key path is reused for a (recipient, profile)."""

    max_age_s: float = 300.0
    max_messages: int = 10_000

    def __post_init__(self) -> None:
        if not self.max_age_s > 0 or self.max_messages < 1:
            raise EnvelopeError(
                "an epoch needs max_age_s > 0 and max_messages >= 1", reason=ReasonCode.CONFIG
            )


#: Epochs switched off: every message is an epoch of one (the same code path).
_SINGLE_MESSAGE_EPOCHS = EpochPolicy(max_age_s=float("inf"), max_messages=1)


@dataclass(frozen=True)
class SealRequest:
    """One message to seal (the arguments of ``EnvelopeSealer.seal``)."""

    kind: MessageKind | str
    topic: str
    recipient: RecipientKeys
    message_id: str
    action: str
    payload: bytes = field(repr=False)
    issued_at: float
    expires_at: float
    profile: SecurityProfile


def request_kind(request: SealRequest, signer_suite: str) -> MessageKind:
    """The message kind of ``request``, once its profile's signature suite is the sealer's
    (``signer_suite``); ``EnvelopeError`` (``config``) otherwise. Both wire formats' sealers
    check a request this way before anything else."""
    if request.profile.signature_suite != signer_suite:
        raise EnvelopeError(
            f"profile {request.profile.name!r} wants signature suite "
            f"{request.profile.signature_suite!r}; this sealer signs with {signer_suite!r}",
            reason=ReasonCode.CONFIG,
        )
    try:
        return MessageKind(request.kind)
    except ValueError as exc:
        raise EnvelopeError(
            f"unknown message kind {request.kind!r}", reason=ReasonCode.CONFIG
        ) from exc


def recipient_fingerprint(recipient: RecipientKeys) -> bytes:
    # A rotated recipient key must start a new epoch, so the epoch slot names the keys too.
    return hashlib.sha256(
        canonical_dumps(
            [
                recipient.principal_id,
                dict(recipient.public_keys),
                dict(recipient.key_ids),
                recipient.qkd_sae_id or "",
            ]
        )
    ).digest()


class SignerDirectory(Protocol):
    """What the opener needs from the key directory (``KeyDirectory`` satisfies it)."""

    def verifier_for(self, principal_id: str, key_id: str, *, at: float) -> Verifier: ...


@dataclass(frozen=True)
class OpenedEnvelope:
    """A verified, decrypted envelope. Times are seconds since the UNIX epoch (UTC)."""

    kind: MessageKind
    topic: str
    recipient: str
    message_id: str
    action: str
    issued_at: float
    expires_at: float
    key_path: KeyPath
    key_ids: tuple[tuple[str, str], ...]
    sender: str
    sender_key_id: str
    signature_suite: str
    epoch_id: bytes
    epoch_seq: int
    batch_signed: bool
    payload: bytes = field(repr=False)


def recover_epoch_key(
    runner: KeyPathRunner,
    own: PrivateKeySet,
    key_path: str,
    key_refs: Sequence[KeyRef],
    context: bytes,
) -> bytes:
    """Recover a 32-byte epoch key through the key path; every failure is an EnvelopeError."""
    refs = [(r.provider, r.key_id, r.key_ref) for r in key_refs]
    try:
        key = runner.recover(KeyPath(tuple(r.provider for r in key_refs)), refs, own, context)
    except FleetbusError as exc:
        reason = exc.reason if exc.reason in _RECOVERY_PASSTHROUGH else ReasonCode.TAMPERED
        raise EnvelopeError(
            f"key path {key_path!r} could not recover the key: {reason.value}",
            reason=reason,
        ) from exc
    except Exception as exc:
        raise EnvelopeError(
            f"key path {key_path!r} could not recover the key",
            reason=ReasonCode.TAMPERED,
        ) from exc
    if type(key) is not bytes or len(key) != 32:
        raise EnvelopeError("key path returned an unusable key", reason=ReasonCode.TAMPERED)
    return key


def directory_verifier(
    directory: SignerDirectory,
    sender: str,
    key_id: str,
    suite: str,
    now: float,
    *,
    named_by: str = "record",
) -> Verifier:
    """The directory's verifier for ``(sender, key_id)`` at ``now``, reasons as v1 step 9-10.

    ``named_by``: what named the suite ("header" in v1, "record" in v2), for the message."""
    try:
        verifier = directory.verifier_for(sender, key_id, at=now)
    except FleetbusError as exc:
        # An unreachable or misconfigured directory is an operational fault to retry, not
        # evidence against this record or envelope; anything else means "not a signer we know".
        reason = (
            exc.reason
            if exc.reason in _SIGNER_REASONS or exc.reason in _DIRECTORY_PASSTHROUGH
            else ReasonCode.UNKNOWN_SIGNER
        )
        raise EnvelopeError(
            f"signer {sender!r} key {key_id!r}: {reason.value}", reason=reason
        ) from exc
    except Exception as exc:
        raise EnvelopeError(
            f"signer {sender!r} key {key_id!r}: unknown_signer", reason=ReasonCode.UNKNOWN_SIGNER
        ) from exc
    if verifier.suite != suite:
        raise EnvelopeError(
            f"{named_by} names suite {suite!r} but the directory key of {sender!r} is "
            f"{verifier.suite!r}",
            reason=ReasonCode.BAD_SIGNATURE,
        )
    return verifier


def check_key_ids(own: PrivateKeySet, runner: KeyPathRunner, key_refs: Sequence[KeyRef]) -> None:
    """Each key ref (v1 header or v2 establishment) must name a configured provider and, for a
    provider with a recipient key pair, ``own``'s key of that algorithm (``unknown_key_id``)."""
    own_ids = own.key_ids
    for ref in key_refs:
        try:
            algorithm = runner.provider(ref.provider).algorithm
        except FleetbusError as exc:
            raise EnvelopeError(
                f"key path provider {ref.provider!r} is not configured here",
                reason=ReasonCode.UNKNOWN_KEY_ID,
            ) from exc
        # A provider with a recipient key pair must name our key of that algorithm; the
        # others (QKD) carry key ids of their own, which their provider checks.
        if algorithm is not None and own_ids.get(algorithm) != ref.key_id:
            raise EnvelopeError(
                f"{ref.provider} key id {ref.key_id!r} is not one of {own.principal_id!r}'s keys",
                reason=ReasonCode.UNKNOWN_KEY_ID,
            )
