"""``EpochOpener``: the receiving side of wire format v2, in the check order of
docs/wire-format.md."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetbus.bus.envelope import (
    DEFAULT_MAX_SIZE,
    EnvelopeError,
)
from fleetbus.bus.envelope_v2 import (
    Direction,
    Establishment,
    Message,
    ParsedEstablishment,
    SignedRecord,
    decode_plaintext,
    decode_record,
    epoch_context_v2,
    message_aad,
    record_version,
    signed_to_be_signed,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import KeyPath, PrivateKeySet, Verifier
from fleetbus.providers.keypath import KeyPathRunner, is_at_least
from fleetbus.providers.sealing import (
    EnvelopeOpener,
    OpenedEnvelope,
    SignerDirectory,
    VerifiedRoots,
    check_key_ids,
    directory_verifier,
    recover_epoch_key,
)
from fleetbus.providers.sealing.common import Clock
from fleetbus.providers.sealing.signatures import signature_block_verifies
from fleetbus.providers.sealing_v2.epochs import (
    EpochStore,
    MemoryEpochStore,
    StoredEpoch,
    window_admits,
)
from fleetbus.providers.sealing_v2.sealer import derive_epoch_secret, derive_message_key_nonce


@dataclass(frozen=True)
class AcceptedEpoch:
    """What ``EpochOpener.open`` returns for an establishment it accepted."""

    epoch_id: bytes
    sender: str
    recipient: str
    key_path: str
    not_after: float
    new: bool  # False: the same establishment was already stored (re-delivery)


class EpochUnknownError(EnvelopeError):
    """A message of an epoch this recipient does not hold: answer with a status (V2.7)."""

    def __init__(
        self, message: str, *, epoch_id: bytes, sequence: int, expires_at: float, recipient: str
    ) -> None:
        super().__init__(message, reason=ReasonCode.EPOCH_UNKNOWN)
        self.epoch_id = epoch_id
        self.sequence = sequence
        self.expires_at = expires_at
        self.recipient = recipient


class StatusRecordError(EnvelopeError):
    """A status record given to ``open`` (``malformed`` for a reader that takes none): a
    vehicle agent reads the bus's ``uplink_epoch_unknown`` with ``open_status`` instead."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=ReasonCode.MALFORMED)


class AuthenticatedRejectError(EnvelopeError):
    """A v2 message that authenticated (AEAD) and is refused all the same: ``message_id`` is
    the sender's, so the recipient may answer it (a redelivery is answered again)."""

    def __init__(self, message: str, *, reason: ReasonCode, message_id: str) -> None:
        super().__init__(message, reason=reason)
        self.message_id = message_id


class EpochOpener:
    """Opens v2 establishments and messages addressed to ``own.principal_id`` (and v1 envelopes
    through ``v1``, when given). ``open`` raises only ``EnvelopeError``."""

    def __init__(
        self,
        own: PrivateKeySet,
        directory: SignerDirectory,
        runner: KeyPathRunner,
        minimum_path: KeyPath,
        *,
        store: EpochStore | None = None,
        direction: Direction = Direction.DOWNLINK,
        v1: EnvelopeOpener | None = None,
        max_size: int = DEFAULT_MAX_SIZE,
        clock: Clock = time.time,
        skew_s: float = 30.0,
        max_lifetime_s: float | None = None,
        max_epoch_s: float = 3600.0,
        root_cache: VerifiedRoots | None = None,
    ) -> None:
        self._own = own
        self._directory = directory
        self._runner = runner
        self._minimum = minimum_path
        self.store: EpochStore = store if store is not None else MemoryEpochStore()
        self._direction = direction
        self.v1 = v1
        self._max_size = max_size
        self._clock = clock
        self._skew_ms = round(skew_s * 1000)
        self._max_lifetime_ms = None if max_lifetime_s is None else round(max_lifetime_s * 1000)
        self._max_epoch_ms = round(max_epoch_s * 1000)
        self._roots = root_cache if root_cache is not None else VerifiedRoots(4096)
        self.key_recoveries = 0

    def __repr__(self) -> str:
        return f"EpochOpener(principal={self._own.principal_id!r})"

    @property
    def checks_replay(self) -> bool:
        return self.v1 is not None and self.v1.checks_replay

    def open(
        self, data: bytes, *, topic: str, store: EpochStore | None = None
    ) -> OpenedEnvelope | AcceptedEpoch:
        """An establishment (stored: ``AcceptedEpoch``) or a message / v1 envelope (opened).

        ``store``: the epochs to use for this call instead of the opener's own (a stage passes
        the one of the record's partition)."""
        epochs = store if store is not None else self.store
        try:
            if record_version(data, max_size=self._max_size) == 1:
                if self.v1 is None:
                    raise EnvelopeError(
                        "wire format version 1 is not read here",
                        reason=ReasonCode.UNSUPPORTED_VERSION,
                    )
                return self.v1.open(data, topic=topic)
            parsed = decode_record(data, max_size=self._max_size)
            if isinstance(parsed, ParsedEstablishment):
                return self._accept(parsed, topic, epochs, data)
            if isinstance(parsed, Message):
                return self._open_message(parsed, topic, epochs)
            raise StatusRecordError("a status record is not opened as a message")
        except EnvelopeError:
            raise
        except Exception as exc:
            raise EnvelopeError(
                f"unexpected {type(exc).__name__} while opening a record",
                reason=ReasonCode.MALFORMED,
            ) from exc

    # -- establishment ------------------------------------------------------------------

    def rederive(self, record: bytes) -> bytes:
        """The epoch secret of a stored establishment record (already accepted once), for a
        store that keeps no secrets: the key path is recovered again."""
        parsed = decode_record(record, max_size=self._max_size)
        if not isinstance(parsed, ParsedEstablishment):
            raise EnvelopeError("not an establishment", reason=ReasonCode.MALFORMED)
        return derive_epoch_secret(self._recover(parsed.establishment), parsed.body)

    def _accept(
        self, parsed: ParsedEstablishment, topic: str, epochs: EpochStore, data: bytes
    ) -> AcceptedEpoch:
        est = parsed.establishment
        if est.recipient != self._own.principal_id:
            raise EnvelopeError(
                f"establishment is for {est.recipient!r}, not {self._own.principal_id!r}",
                reason=ReasonCode.WRONG_RECIPIENT,
            )
        if est.topic != topic or est.direction != self._direction:
            raise EnvelopeError(
                f"establishment was made for {est.topic!r} ({est.direction.name.lower()}), "
                f"read from {topic!r}",
                reason=ReasonCode.WRONG_RECIPIENT,
            )
        now = self._clock()
        now_ms = round(now * 1000)
        if est.not_before_ms > now_ms + self._skew_ms:
            raise EnvelopeError(
                "establishment begins in the future", reason=ReasonCode.NOT_YET_VALID
            )
        if now_ms > est.not_after_ms + self._skew_ms:
            raise EnvelopeError("establishment has ended", reason=ReasonCode.EXPIRED)
        if est.not_after_ms - est.not_before_ms > self._max_epoch_ms:
            raise EnvelopeError(
                f"epoch lasts longer than {self._max_epoch_ms / 1000:.0f} s",
                reason=ReasonCode.POLICY_DENIED,
            )
        path = KeyPath(est.providers)
        try:
            ok = is_at_least(path, self._minimum)
        except FleetbusError:
            ok = False
        if not ok:
            raise EnvelopeError(
                f"key path {path.name!r} is below the minimum {self._minimum.name!r}",
                reason=ReasonCode.DOWNGRADE,
            )
        verifier = self._verifier(est.sender, est.sender_key_id, est.signature_suite, now)
        self._verify_signed(parsed, verifier, est.sender, est.sender_key_id, now)
        digest = hashlib.sha256(parsed.body).digest()
        stored = epochs.get(est.recipient, est.epoch_id)
        if stored is not None:
            if stored.sender == est.sender and stored.est_digest == digest:
                return AcceptedEpoch(
                    est.epoch_id, est.sender, est.recipient, est.key_path,
                    est.not_after_ms / 1000, new=False,
                )  # fmt: skip
            raise EnvelopeError(
                "an epoch with this id is already established", reason=ReasonCode.REPLAYED
            )
        check_key_ids(self._own, self._runner, est.key_refs)
        secret = derive_epoch_secret(self._recover(est), parsed.body)
        epochs.put(
            StoredEpoch(
                recipient=est.recipient,
                epoch_id=est.epoch_id,
                sender=est.sender,
                sender_key_id=est.sender_key_id,
                signature_suite=est.signature_suite,
                topic=est.topic,
                direction=int(est.direction),
                key_path=est.key_path,
                key_ids=tuple((r.provider, r.key_id) for r in est.key_refs),
                not_after_ms=est.not_after_ms,
                max_messages=est.max_messages,
                est_digest=digest,
                secret=secret,
                record=data,
            )
        )
        return AcceptedEpoch(
            est.epoch_id, est.sender, est.recipient, est.key_path, est.not_after_ms / 1000, True
        )

    def _verifier(self, sender: str, key_id: str, suite: str, now: float) -> Verifier:
        return directory_verifier(self._directory, sender, key_id, suite, now)

    def _verify_signed(
        self, parsed: SignedRecord, verifier: Verifier, sender: str, key_id: str, now: float
    ) -> None:
        verify_signed_record(parsed, verifier, sender, key_id, self._roots, now)

    def _recover(self, est: Establishment) -> bytes:
        context = epoch_context_v2(est.sender, est.recipient, est.direction, est.epoch_id)
        self.key_recoveries += 1
        return recover_epoch_key(self._runner, self._own, est.key_path, est.key_refs, context)

    # -- message ------------------------------------------------------------------------

    def _open_message(self, parsed: Message, topic: str, epochs: EpochStore) -> OpenedEnvelope:
        header = parsed.header
        own = self._own.principal_id
        if header.recipient != own:
            raise EnvelopeError(
                f"message is for {header.recipient!r}, not {own!r}",
                reason=ReasonCode.WRONG_RECIPIENT,
            )
        now = self._clock()
        now_ms = round(now * 1000)
        if now_ms > header.expires_at_ms + self._skew_ms:
            raise EnvelopeError("message has expired", reason=ReasonCode.EXPIRED)
        limit = self._max_lifetime_ms
        if limit is not None and header.expires_at_ms > now_ms + limit + self._skew_ms:
            raise EnvelopeError(
                f"message expires more than {limit / 1000:.0f} s ahead",
                reason=ReasonCode.POLICY_DENIED,
            )
        epoch = epochs.get(own, header.epoch_id)
        if epoch is None:
            raise EpochUnknownError(
                f"no epoch {header.epoch_id.hex()} for {own!r}",
                epoch_id=header.epoch_id,
                sequence=header.sequence,
                expires_at=header.expires_at_ms / 1000,
                recipient=own,
            )
        if epoch.topic != topic:
            raise EnvelopeError(
                f"epoch was established for {epoch.topic!r}, message read from {topic!r}",
                reason=ReasonCode.WRONG_RECIPIENT,
            )
        if now_ms > epoch.not_after_ms + self._skew_ms:
            epochs.erase(own, header.epoch_id)
            raise EnvelopeError("the message's epoch has ended", reason=ReasonCode.EXPIRED)
        if header.sequence >= epoch.max_messages:
            raise EnvelopeError(
                f"sequence {header.sequence} is beyond the epoch's {epoch.max_messages} messages",
                reason=ReasonCode.EPOCH_EXHAUSTED,
            )
        self._verifier(epoch.sender, epoch.sender_key_id, epoch.signature_suite, now)
        # The window is consulted before decryption but enforced after it: a redelivered
        # message is authentic, and its recipient answers it again (by message id) from its
        # store of executed commands instead of dropping it silently.
        fresh = window_admits(epoch, header.sequence)
        key, nonce = derive_message_key_nonce(epoch.secret, header.sequence)
        try:
            plaintext = AESGCM(key).decrypt(nonce, parsed.ciphertext, message_aad(parsed.protected))
        except InvalidTag as exc:
            raise EnvelopeError(
                "AEAD authentication failed: ciphertext or protected header changed",
                reason=ReasonCode.TAMPERED,
            ) from exc
        plain = decode_plaintext(plaintext, header)
        replayed = (
            f"sequence {header.sequence} of epoch {header.epoch_id.hex()} was already opened "
            "or is older than the replay window"
        )
        if not fresh:
            raise AuthenticatedRejectError(
                replayed, reason=ReasonCode.REPLAYED, message_id=plain.message_id
            )
        if plain.issued_at_ms > now_ms + self._skew_ms:
            raise AuthenticatedRejectError(
                "message is issued in the future (beyond the clock-skew allowance)",
                reason=ReasonCode.NOT_YET_VALID,
                message_id=plain.message_id,
            )
        if not epochs.record(own, header.epoch_id, header.sequence):
            raise AuthenticatedRejectError(
                replayed, reason=ReasonCode.REPLAYED, message_id=plain.message_id
            )
        return OpenedEnvelope(
            kind=header.kind,
            topic=epoch.topic,
            recipient=own,
            message_id=plain.message_id,
            action=plain.action,
            issued_at=plain.issued_at_ms / 1000,
            expires_at=header.expires_at_ms / 1000,
            key_path=KeyPath.parse(epoch.key_path),
            key_ids=epoch.key_ids,
            sender=epoch.sender,
            sender_key_id=epoch.sender_key_id,
            signature_suite=epoch.signature_suite,
            epoch_id=header.epoch_id,
            epoch_seq=header.sequence,
            batch_signed=False,
            payload=plain.payload,
        )


def verify_signed_record(
    parsed: SignedRecord,
    verifier: Verifier,
    sender: str,
    key_id: str,
    roots: VerifiedRoots,
    now: float,
) -> None:
    """Signature (or inclusion proof + root signature) of an establishment or status."""
    ok = signature_block_verifies(
        signed_to_be_signed(parsed.body),
        parsed.signature,
        verifier,
        roots=roots,
        root_key=("v2", sender, key_id, verifier.suite),
        now=now,
        root_ttl_s=3600.0,
    )
    if not ok:
        raise EnvelopeError(
            f"signature of {sender!r} does not verify", reason=ReasonCode.BAD_SIGNATURE
        )
