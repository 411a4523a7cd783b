"""``EnvelopeSealer``: the sending side of wire format v1 (key epochs, per-message keys,
AES-256-GCM, signatures)."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetbus.bus.envelope import (
    DEFAULT_MAX_SIZE,
    IV_LENGTH,
    BatchSignature,
    EnvelopeError,
    KeyRef,
    MessageKind,
    ProtectedHeader,
    SignatureBlock,
    SingleSignature,
    batch_root_to_be_signed,
    enc_structure,
    encode_envelope,
    epoch_context,
    header_times,
    seal_protected,
    to_be_signed,
)
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import (
    KeyPath,
    RecipientKeys,
    SecurityProfile,
    Signer,
)
from fleetbus.providers.keypath import ProfileSealer
from fleetbus.providers.merkle import (
    inclusion_proofs,
    leaf_hash,
)
from fleetbus.providers.sealing.common import (
    _SINGLE_MESSAGE_EPOCHS,
    Clock,
    EpochPolicy,
    SealRequest,
    derive_message_key,
    recipient_fingerprint,
    request_kind,
)


@dataclass(frozen=True)
class PreparedEnvelope:
    """An encrypted, not yet signed envelope (``EnvelopeSealer.prepare``)."""

    protected: bytes
    ciphertext: bytes = field(repr=False)
    key_path: str = ""  # the key path the envelope was sealed on (as in its header)


@dataclass
class SealerStats:
    """Counters for benchmarks and tests: KEM establishes, signatures, envelopes."""

    establishes: int = 0
    signatures: int = 0
    envelopes: int = 0


@dataclass
class _Epoch:
    epoch_id: bytes
    key: bytes = field(repr=False)
    path: KeyPath
    refs: tuple[KeyRef, ...]
    created: float
    next_seq: int = 0


class EnvelopeSealer:
    """Seals payloads for one recipient each, signed by ``signer`` as ``sender_id``.

    ``epochs`` None: one key-path establish per message. ``batch_signing``: ``seal_batch`` signs
    one Merkle root per call (``seal`` then produces a batch of one).
    """

    def __init__(
        self,
        sender_id: str,
        signer: Signer,
        sealer: ProfileSealer,
        *,
        epochs: EpochPolicy | None = None,
        batch_signing: bool = False,
        clock: Clock = time.time,
        max_size: int = DEFAULT_MAX_SIZE,
        max_open_epochs: int = 4096,
    ) -> None:
        self._sender = sender_id
        self._signer = signer
        self._sealer = sealer
        self._policy = epochs or _SINGLE_MESSAGE_EPOCHS
        self._batch = batch_signing
        self._clock = clock
        self._max_size = max_size
        self._max_open_epochs = max_open_epochs
        self._epochs: OrderedDict[Hashable, _Epoch] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = SealerStats()

    def __repr__(self) -> str:
        return f"EnvelopeSealer(sender={self._sender!r}, suite={self._signer.suite!r})"

    def seal(
        self,
        kind: MessageKind | str,
        topic: str,
        recipient: RecipientKeys,
        message_id: str,
        action: str,
        payload: bytes,
        issued_at: float,
        expires_at: float,
        profile: SecurityProfile,
    ) -> bytes:
        """Seal one payload; returns the envelope bytes."""
        request = SealRequest(
            kind, topic, recipient, message_id, action, payload, issued_at, expires_at, profile
        )
        return self.seal_batch([request])[0]

    def seal_batch(self, requests: Sequence[SealRequest]) -> list[bytes]:
        """Seal several payloads; with batch signing on, sign them with one signature."""
        return self.sign_prepared([self.prepare(request) for request in requests])

    def prepare(self, request: SealRequest) -> PreparedEnvelope:
        """The first half of sealing: key path (epoch), protected header, AEAD ciphertext.

        ``sign_prepared`` signs a list of prepared envelopes (one Merkle-root signature with
        batch signing on) and returns the envelope bytes. A caller that seals records one by
        one but commits them together (a stage's transaction) prepares each record — errors and
        failover events stay attributable to it — and signs the whole batch once.
        """
        return self._encrypt(request)

    def sign_prepared(self, prepared: Sequence[PreparedEnvelope]) -> list[bytes]:
        """Sign and encode prepared envelopes (see ``prepare``), in order."""
        if not prepared:
            return []
        sealed = [(p.protected, p.ciphertext) for p in prepared]
        blocks: list[SignatureBlock]
        if self._batch:
            leaves = [leaf_hash(to_be_signed(p, c)) for p, c in sealed]
            root, paths = inclusion_proofs(leaves)
            root_signature = self._sign(batch_root_to_be_signed(root, len(leaves)))
            blocks = [
                BatchSignature(root_signature, len(leaves), index, path)
                for index, path in enumerate(paths)
            ]
        else:
            blocks = [SingleSignature(self._sign(to_be_signed(p, c))) for p, c in sealed]
        out = []
        for (protected, ciphertext), block in zip(sealed, blocks, strict=True):
            envelope = encode_envelope(protected, ciphertext, block)
            if len(envelope) > self._max_size:
                raise EnvelopeError(
                    f"sealed envelope is {len(envelope)} bytes; recipients accept at most "
                    f"{self._max_size}",
                    reason=ReasonCode.OVERSIZE,
                )
            out.append(envelope)
        self.stats.envelopes += len(out)
        return out

    def _sign(self, message: bytes) -> bytes:
        self.stats.signatures += 1
        return self._signer.sign(message)

    def _encrypt(self, request: SealRequest) -> PreparedEnvelope:
        kind = request_kind(request, self._signer.suite)
        if type(request.payload) is not bytes:
            raise EnvelopeError("payload must be bytes", reason=ReasonCode.CONFIG)
        issued_ms, expires_ms = header_times(request.issued_at, request.expires_at)
        epoch, seq = self._next_in_epoch(request.recipient, request.profile)
        header = ProtectedHeader(
            kind=kind,
            topic=request.topic,
            recipient=request.recipient.principal_id,
            message_id=request.message_id,
            action=request.action,
            issued_at_ms=issued_ms,
            expires_at_ms=expires_ms,
            key_path=epoch.path.name,
            key_refs=epoch.refs,
            sender=self._sender,
            sender_key_id=self._signer.key_id,
            signature_suite=self._signer.suite,
            epoch_id=epoch.epoch_id,
            epoch_seq=seq,
            iv=os.urandom(IV_LENGTH),
        )
        try:  # never emit what a recipient would reject as malformed
            protected = seal_protected(header)
        except EnvelopeError as exc:
            raise EnvelopeError(f"cannot seal: {exc}", reason=ReasonCode.CONFIG) from exc
        key = derive_message_key(epoch.key, protected)
        ciphertext = AESGCM(key).encrypt(header.iv, request.payload, enc_structure(protected))
        return PreparedEnvelope(protected, ciphertext, epoch.path.name)

    def _next_in_epoch(
        self, recipient: RecipientKeys, profile: SecurityProfile
    ) -> tuple[_Epoch, int]:
        slot = (
            recipient_fingerprint(recipient),
            profile.name,
            tuple(path.name for path in profile.key_paths),
        )
        now = self._clock()
        with self._lock:
            epoch = self._epochs.get(slot)
            if epoch is not None and self._usable(epoch, now):
                seq = epoch.next_seq
                epoch.next_seq += 1
                return epoch, seq
        # Establish outside the lock: a QKD fetch must not stall sealing for other recipients.
        epoch = self._establish(recipient, profile, now)
        with self._lock:
            self._epochs[slot] = epoch
            self._epochs.move_to_end(slot)
            while len(self._epochs) > self._max_open_epochs:
                self._epochs.popitem(last=False)
            seq = epoch.next_seq
            epoch.next_seq += 1
            return epoch, seq

    def _usable(self, epoch: _Epoch, now: float) -> bool:
        return (
            epoch.next_seq < self._policy.max_messages
            and 0 <= now - epoch.created < self._policy.max_age_s
        )

    def _establish(self, recipient: RecipientKeys, profile: SecurityProfile, now: float) -> _Epoch:
        epoch_id = os.urandom(16)
        context = epoch_context(self._sender, recipient.principal_id, epoch_id)
        result = self._sealer.establish(profile, recipient, context)
        with self._lock:
            self.stats.establishes += 1
        refs = tuple(KeyRef(e.provider, e.key_id, e.key_ref) for e in result.encapsulations)
        return _Epoch(epoch_id=epoch_id, key=result.key, path=result.path, refs=refs, created=now)
