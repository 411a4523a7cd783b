"""``EpochSealer``: the sending side of wire format v2 (one signed establishment per epoch,
then small messages)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetbus.bus.envelope import (
    DEFAULT_MAX_SIZE,
    BatchSignature,
    EnvelopeError,
    KeyRef,
    SignatureBlock,
    SingleSignature,
    batch_root_to_be_signed,
    header_times,
)
from fleetbus.bus.envelope_v2 import (
    EPOCH_ID_LENGTH_V2,
    EPOCH_SECRET_INFO,
    MESSAGE_INFO_V2,
    Direction,
    Establishment,
    MessageHeader,
    MessagePlaintext,
    encode_establishment,
    encode_message,
    encode_message_header,
    encode_plaintext,
    epoch_context_v2,
    establishment_bytes,
    message_aad,
    signed_to_be_signed,
)
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import Signer
from fleetbus.providers.keypath import ProfileSealer
from fleetbus.providers.merkle import (
    inclusion_proofs,
    leaf_hash,
)
from fleetbus.providers.sealing import (
    EpochPolicy,
    SealRequest,
    recipient_fingerprint,
)
from fleetbus.providers.sealing.common import Clock, request_kind


def derive_epoch_secret(epoch_key: bytes, est: bytes) -> bytes:
    """``HKDF(epoch_key, info = "fleetbus/v2/epoch-secret" || SHA-256(est), L = 32)``."""
    info = EPOCH_SECRET_INFO + hashlib.sha256(est).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(epoch_key)


def derive_message_key_nonce(epoch_secret: bytes, sequence: int) -> tuple[bytes, bytes]:
    """``HKDF(epoch_secret, info = "fleetbus/v2/message" || u64(seq), L = 44)`` -> key, nonce."""
    info = MESSAGE_INFO_V2 + sequence.to_bytes(8, "big")
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=None, info=info).derive(epoch_secret)
    return okm[:32], okm[32:]


def sign_records(signer: Signer, bodies: Sequence[bytes], batch: bool) -> list[SignatureBlock]:
    if not batch:
        return [SingleSignature(signer.sign(signed_to_be_signed(b))) for b in bodies]
    leaves = [leaf_hash(signed_to_be_signed(b)) for b in bodies]
    root, paths = inclusion_proofs(leaves)
    root_signature = signer.sign(batch_root_to_be_signed(root, len(leaves)))
    return [BatchSignature(root_signature, len(leaves), i, p) for i, p in enumerate(paths)]


# -- sending -----------------------------------------------------------------------------


@dataclass
class _SenderEpoch:
    est: Establishment
    body: bytes  # the signed est bytes
    secret: bytes = field(repr=False)
    record: bytes | None = None  # the signed establishment record, once signed
    announced: bool = False  # delivered (the caller said so): messages go without it
    next_seq: int = 0


@dataclass(frozen=True)
class PreparedMessage:
    """An encrypted v2 message and the epoch it belongs to (``EpochSealer.prepare``)."""

    message: bytes = field(repr=False)
    epoch_id: bytes
    sequence: int
    key_path: str
    recipient: str


class EpochSealer:
    """Seals v2 messages; opens an epoch (one signed establishment) per recipient and profile.

    ``prepare`` encrypts; ``records_for`` signs the establishments a batch still needs (one
    Merkle root for all of them with ``batch_signing``) and returns each message's records in
    delivery order: the establishment first while its epoch is not ``announced``. A caller that
    delivers in a transaction calls ``announced`` once it committed; one that delivers directly
    uses ``seal``.
    """

    def __init__(
        self,
        sender_id: str,
        signer: Signer,
        sealer: ProfileSealer,
        *,
        direction: Direction = Direction.DOWNLINK,
        epochs: EpochPolicy | None = None,
        batch_signing: bool = False,
        clock: Clock = time.time,
        max_size: int = DEFAULT_MAX_SIZE,
        max_open_epochs: int = 4096,
    ) -> None:
        self._sender = sender_id
        self._signer = signer
        self._sealer = sealer
        self._direction = direction
        self._policy = epochs or EpochPolicy()
        self._batch = batch_signing
        self._clock = clock
        self._max_size = max_size
        self._max_open = max_open_epochs
        self._epochs: OrderedDict[Hashable, _SenderEpoch] = OrderedDict()
        self._by_id: dict[bytes, _SenderEpoch] = {}
        self._lock = threading.Lock()
        self.establishes = 0
        self.signatures = 0

    def __repr__(self) -> str:
        return f"EpochSealer(sender={self._sender!r}, suite={self._signer.suite!r})"

    def seal(self, request: SealRequest) -> list[bytes]:
        """Records to deliver, in order, for one message (its establishment first if new)."""
        prepared = self.prepare(request)
        records = self.records_for([prepared])[0]
        self.announced([prepared.epoch_id])
        return records

    def prepare(self, request: SealRequest) -> PreparedMessage:
        kind = request_kind(request, self._signer.suite)
        issued_ms, expires_ms = header_times(request.issued_at, request.expires_at)
        try:
            plaintext = encode_plaintext(
                MessagePlaintext(request.message_id, request.action, issued_ms, request.payload),
                kind,
                expires_ms,
            )
        except EnvelopeError as exc:
            raise EnvelopeError(f"cannot seal: {exc}", reason=ReasonCode.CONFIG) from exc
        epoch, seq = self._next(request)
        header = MessageHeader(
            epoch.est.epoch_id, seq, kind, request.recipient.principal_id, expires_ms
        )
        try:
            protected = encode_message_header(header)
        except EnvelopeError as exc:
            raise EnvelopeError(f"cannot seal: {exc}", reason=ReasonCode.CONFIG) from exc
        key, nonce = derive_message_key_nonce(epoch.secret, seq)
        ciphertext = AESGCM(key).encrypt(nonce, plaintext, message_aad(protected))
        message = encode_message(protected, ciphertext)
        if len(message) > self._max_size:
            raise EnvelopeError(
                f"sealed message is {len(message)} bytes; recipients accept at most "
                f"{self._max_size}",
                reason=ReasonCode.OVERSIZE,
            )
        return PreparedMessage(
            message, epoch.est.epoch_id, seq, epoch.est.key_path, header.recipient
        )

    def records_for(self, prepared: Sequence[PreparedMessage]) -> list[list[bytes]]:
        """Each prepared message's records in delivery order; signs missing establishments."""
        with self._lock:
            epochs = [self._by_id.get(p.epoch_id) for p in prepared]
        unsigned: list[_SenderEpoch] = []
        for epoch in epochs:
            if epoch is not None and epoch.record is None and epoch not in unsigned:
                unsigned.append(epoch)
        if unsigned:
            blocks = sign_records(self._signer, [e.body for e in unsigned], self._batch)
            self.signatures += 1 if self._batch else len(unsigned)
            for epoch, block in zip(unsigned, blocks, strict=True):
                epoch.record = encode_establishment(epoch.body, block)
        out: list[list[bytes]] = []
        sent: set[bytes] = set()
        for item, epoch in zip(prepared, epochs, strict=True):
            if epoch is None:
                raise EnvelopeError(
                    "the epoch of a prepared message was dropped before it was signed "
                    "(more open epochs than max_open_epochs)",
                    reason=ReasonCode.CONFIG,
                )
            records = []
            if not epoch.announced and item.epoch_id not in sent and epoch.record is not None:
                records.append(epoch.record)
                sent.add(item.epoch_id)
            records.append(item.message)
            out.append(records)
        return out

    def announced(self, epoch_ids: Sequence[bytes]) -> None:
        """The establishments of these epochs reached their recipients' partitions."""
        with self._lock:
            for epoch_id in epoch_ids:
                epoch = self._by_id.get(epoch_id)
                if epoch is not None:
                    epoch.announced = True

    def establishment(self, epoch_id: bytes) -> bytes | None:
        """The signed establishment record of an open epoch (for re-delivery), if any."""
        with self._lock:
            epoch = self._by_id.get(epoch_id)
            return None if epoch is None else epoch.record

    def end(self, epoch_id: bytes) -> Establishment | None:
        """End the open epoch ``epoch_id`` (its recipient reported losing it): the next message
        to that recipient opens a new epoch. Its establishment, or None if it is not open."""
        with self._lock:
            epoch = self._by_id.pop(epoch_id, None)
            if epoch is None:
                return None
            for slot in [s for s, e in self._epochs.items() if e is epoch]:
                del self._epochs[slot]
            return epoch.est

    def forget(self, recipient: str) -> int:
        """End every epoch to ``recipient`` (it reported losing one); returns how many."""
        with self._lock:
            slots = [s for s, e in self._epochs.items() if e.est.recipient == recipient]
            for slot in slots:
                self._by_id.pop(self._epochs.pop(slot).est.epoch_id, None)
            return len(slots)

    def _next(self, request: SealRequest) -> tuple[_SenderEpoch, int]:
        slot = (
            recipient_fingerprint(request.recipient),
            tuple(sorted(request.recipient.capabilities)),
            request.topic,
            request.profile.name,
            tuple(path.name for path in request.profile.key_paths),
            self._signer.key_id,
        )
        now = self._clock()
        now_ms = round(now * 1000)
        with self._lock:
            epoch = self._epochs.get(slot)
            if (
                epoch is not None
                and epoch.next_seq < epoch.est.max_messages
                and epoch.est.not_before_ms <= now_ms < epoch.est.not_after_ms
            ):
                seq = epoch.next_seq
                epoch.next_seq += 1
                return epoch, seq
        # Establish outside the lock: a QKD fetch must not stall sealing for other recipients.
        epoch = self._establish(request, now)
        with self._lock:
            old = self._epochs.pop(slot, None)
            if old is not None:
                self._by_id.pop(old.est.epoch_id, None)
            self._epochs[slot] = epoch
            self._by_id[epoch.est.epoch_id] = epoch
            # Ended epochs go with their secrets (forward secrecy between epochs); swept when
            # an epoch is established, which bounds the cost by the establishments.
            for ended in [s for s, e in self._epochs.items() if e.est.not_after_ms <= now_ms]:
                self._by_id.pop(self._epochs.pop(ended).est.epoch_id, None)
            while len(self._epochs) > self._max_open:
                _, dropped = self._epochs.popitem(last=False)
                self._by_id.pop(dropped.est.epoch_id, None)
            seq = epoch.next_seq
            epoch.next_seq += 1
            return epoch, seq

    def _establish(self, request: SealRequest, now: float) -> _SenderEpoch:
        epoch_id = os.urandom(EPOCH_ID_LENGTH_V2)
        recipient = request.recipient.principal_id
        context = epoch_context_v2(self._sender, recipient, self._direction, epoch_id)
        result = self._sealer.establish(request.profile, request.recipient, context)
        max_age = self._policy.max_age_s
        if max_age == float("inf"):
            max_age = 3600.0
        not_before = round(now * 1000)
        est = Establishment(
            topic=request.topic,
            sender=self._sender,
            sender_key_id=self._signer.key_id,
            signature_suite=self._signer.suite,
            recipient=recipient,
            direction=self._direction,
            epoch_id=epoch_id,
            key_path=result.path.name,
            key_refs=tuple(KeyRef(e.provider, e.key_id, e.key_ref) for e in result.encapsulations),
            not_before_ms=not_before,
            not_after_ms=not_before + max(1, round(max_age * 1000)),
            max_messages=self._policy.max_messages,
        )
        try:
            body = establishment_bytes(est)
        except EnvelopeError as exc:
            raise EnvelopeError(f"cannot seal: {exc}", reason=ReasonCode.CONFIG) from exc
        with self._lock:
            self.establishes += 1
        return _SenderEpoch(est, body, derive_epoch_secret(result.key, body))
