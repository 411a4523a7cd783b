"""Seal and open wire format v2: signed epoch establishments, small AEAD messages, statuses.

``EpochSealer`` is the sending side (one establishment per recipient and epoch, then messages),
``EpochOpener`` the receiving side (it also reads v1 through a v1 ``EnvelopeOpener``), and
``EpochStore`` keeps a recipient's epochs (``MemoryEpochStore``; ``SqliteEpochStore`` is the
durable one of a vehicle). The bytes and the check order are in ``docs/wire-format.md``.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetbus.bus.envelope import (
    DEFAULT_MAX_SIZE,
    BatchSignature,
    EnvelopeError,
    KeyRef,
    MessageKind,
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
    Message,
    MessageHeader,
    MessagePlaintext,
    ParsedEstablishment,
    ParsedStatus,
    SignedRecord,
    Status,
    StatusCode,
    decode_plaintext,
    decode_record,
    encode_establishment,
    encode_message,
    encode_message_header,
    encode_plaintext,
    encode_status,
    epoch_context_v2,
    establishment_bytes,
    message_aad,
    record_version,
    signed_to_be_signed,
    status_bytes,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import KeyPath, PrivateKeySet, Signer, Verifier
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer, is_at_least
from fleetbus.providers.merkle import (
    MerkleError,
    inclusion_proofs,
    leaf_hash,
    root_from_inclusion_proof,
)
from fleetbus.providers.sealing import (
    EnvelopeOpener,
    EpochPolicy,
    OpenedEnvelope,
    SealRequest,
    SignerDirectory,
    VerifiedRoots,
    _recipient_fingerprint,
    check_key_ids,
    directory_verifier,
    recover_epoch_key,
)

__all__ = [
    "REPLAY_WINDOW",
    "AcceptedEpoch",
    "AuthenticatedRejectError",
    "EpochOpener",
    "EpochSealer",
    "EpochStore",
    "EpochUnknownError",
    "MemoryEpochStore",
    "PreparedMessage",
    "SqliteEpochStore",
    "StoredEpoch",
    "derive_epoch_secret",
    "derive_message_key_nonce",
    "directory_verifier",
    "make_status",
    "open_status",
    "sign_status",
    "verify_signed_record",
]

Clock = Callable[[], float]
#: Sequence numbers remembered behind the highest one accepted (docs/wire-format.md V2.5).
REPLAY_WINDOW = 64


def derive_epoch_secret(epoch_key: bytes, est: bytes) -> bytes:
    """``HKDF(epoch_key, info = "fleetbus/v2/epoch-secret" || SHA-256(est), L = 32)``."""
    info = EPOCH_SECRET_INFO + hashlib.sha256(est).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(epoch_key)


def derive_message_key_nonce(epoch_secret: bytes, sequence: int) -> tuple[bytes, bytes]:
    """``HKDF(epoch_secret, info = "fleetbus/v2/message" || u64(seq), L = 44)`` -> key, nonce."""
    info = MESSAGE_INFO_V2 + sequence.to_bytes(8, "big")
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=None, info=info).derive(epoch_secret)
    return okm[:32], okm[32:]


def _sign_records(signer: Signer, bodies: Sequence[bytes], batch: bool) -> list[SignatureBlock]:
    if not batch:
        return [SingleSignature(signer.sign(signed_to_be_signed(b))) for b in bodies]
    leaves = [leaf_hash(signed_to_be_signed(b)) for b in bodies]
    root, paths = inclusion_proofs(leaves)
    root_signature = signer.sign(batch_root_to_be_signed(root, len(leaves)))
    return [BatchSignature(root_signature, len(leaves), i, p) for i, p in enumerate(paths)]


def sign_status(signer: Signer, sender: str, status: Status) -> bytes:
    """A signed status record (the vehicle's ``epoch_unknown`` answer)."""
    body = status_bytes(
        replace(status, sender=sender, sender_key_id=signer.key_id, signature_suite=signer.suite)
    )
    return encode_status(body, _sign_records(signer, [body], batch=False)[0])


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
        if request.profile.signature_suite != self._signer.suite:
            raise EnvelopeError(
                f"profile {request.profile.name!r} wants signature suite "
                f"{request.profile.signature_suite!r}; this sealer signs with "
                f"{self._signer.suite!r}",
                reason=ReasonCode.CONFIG,
            )
        try:
            kind = MessageKind(request.kind)
        except ValueError as exc:
            raise EnvelopeError(
                f"unknown message kind {request.kind!r}", reason=ReasonCode.CONFIG
            ) from exc
        issued_ms, expires_ms = header_times(request.issued_at, request.expires_at)
        try:
            plaintext = encode_plaintext(
                MessagePlaintext(request.message_id, request.action, issued_ms, request.payload)
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
            blocks = _sign_records(self._signer, [e.body for e in unsigned], self._batch)
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

    def forget(self, recipient: str) -> int:
        """End every epoch to ``recipient`` (it reported losing one); returns how many."""
        with self._lock:
            slots = [s for s, e in self._epochs.items() if e.est.recipient == recipient]
            for slot in slots:
                self._by_id.pop(self._epochs.pop(slot).est.epoch_id, None)
            return len(slots)

    def _next(self, request: SealRequest) -> tuple[_SenderEpoch, int]:
        slot = (
            _recipient_fingerprint(request.recipient),
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


# -- receiving ---------------------------------------------------------------------------


@dataclass
class StoredEpoch:
    """What a recipient keeps of an accepted epoch (never the epoch key or the key refs)."""

    recipient: str
    epoch_id: bytes
    sender: str
    sender_key_id: str
    signature_suite: str
    topic: str
    direction: int
    key_path: str
    key_ids: tuple[tuple[str, str], ...]
    not_after_ms: int
    max_messages: int
    est_digest: bytes
    secret: bytes = field(repr=False)
    highest: int = -1
    window: int = 0  # bit i set: sequence highest - i was accepted
    # The establishment record, for a store that keeps no secret and re-derives it
    # (``EpochOpener.rederive``); stores that keep the secret need not keep it.
    record: bytes = field(default=b"", repr=False)


def window_admits(epoch: StoredEpoch, sequence: int) -> bool:
    """Whether ``sequence`` is new for the epoch's replay window (docs V2.5)."""
    if sequence > epoch.highest:
        return True
    offset = epoch.highest - sequence
    return offset < REPLAY_WINDOW and not (epoch.window >> offset) & 1


def window_record(epoch: StoredEpoch, sequence: int) -> None:
    if sequence > epoch.highest:
        shift = sequence - epoch.highest
        epoch.window = ((epoch.window << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
        epoch.highest = sequence
    else:
        epoch.window |= 1 << (epoch.highest - sequence)


class EpochStore(Protocol):
    """A recipient's epochs, by (recipient, epoch id)."""

    def get(self, recipient: str, epoch_id: bytes) -> StoredEpoch | None: ...

    def put(self, epoch: StoredEpoch) -> None: ...

    def record(self, recipient: str, epoch_id: bytes, sequence: int) -> bool:
        """Atomically admit and record ``sequence``; False when it is a replay."""
        ...

    def erase(self, recipient: str, epoch_id: bytes) -> None: ...


class MemoryEpochStore:
    """Epochs in memory (a process that re-establishes after a restart)."""

    def __init__(self) -> None:
        self._epochs: dict[tuple[str, bytes], StoredEpoch] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._epochs)

    def get(self, recipient: str, epoch_id: bytes) -> StoredEpoch | None:
        with self._lock:
            epoch = self._epochs.get((recipient, epoch_id))
            return None if epoch is None else replace(epoch)

    def put(self, epoch: StoredEpoch) -> None:
        with self._lock:
            self._epochs[(epoch.recipient, epoch.epoch_id)] = replace(epoch)

    def record(self, recipient: str, epoch_id: bytes, sequence: int) -> bool:
        with self._lock:
            epoch = self._epochs.get((recipient, epoch_id))
            if epoch is None or not window_admits(epoch, sequence):
                return False
            window_record(epoch, sequence)
            return True

    def erase(self, recipient: str, epoch_id: bytes) -> None:
        with self._lock:
            self._epochs.pop((recipient, epoch_id), None)


class SqliteEpochStore:
    """Epochs on disk (a vehicle's durable store): SQLite, ``synchronous=FULL``.

    The file holds epoch secrets: it needs the protection of the vehicle's private key files.
    An epoch's row, secret included, is deleted once the epoch ends (``prune``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":  # SQLite's in-memory database: no file
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created owner-only before SQLite opens it (its WAL and shm files take the same
            # mode): the rows hold epoch secrets.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS epochs (recipient TEXT, epoch_id BLOB, sender TEXT, "
            "sender_key_id TEXT, suite TEXT, topic TEXT, direction INTEGER, key_path TEXT, "
            "key_ids TEXT, not_after_ms INTEGER, max_messages INTEGER, est_digest BLOB, "
            "secret BLOB, highest INTEGER, window BLOB, PRIMARY KEY (recipient, epoch_id))"
        )
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, recipient: str, epoch_id: bytes) -> StoredEpoch | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM epochs WHERE recipient = ? AND epoch_id = ?", (recipient, epoch_id)
            ).fetchone()
        if row is None:
            return None
        key_ids = tuple(
            (p, k) for p, k in (item.split("\x00", 1) for item in row[8].split("\x01") if item)
        )
        return StoredEpoch(
            row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], key_ids,
            row[9], row[10], row[11], row[12], row[13], int.from_bytes(row[14], "big"),
        )  # fmt: skip

    def put(self, epoch: StoredEpoch) -> None:
        key_ids = "\x01".join(f"{p}\x00{k}" for p, k in epoch.key_ids)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO epochs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    epoch.recipient, epoch.epoch_id, epoch.sender, epoch.sender_key_id,
                    epoch.signature_suite, epoch.topic, epoch.direction, epoch.key_path, key_ids,
                    epoch.not_after_ms, epoch.max_messages, epoch.est_digest, epoch.secret,
                    epoch.highest, epoch.window.to_bytes(8, "big"),
                ),
            )  # fmt: skip

    def record(self, recipient: str, epoch_id: bytes, sequence: int) -> bool:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT highest, window FROM epochs WHERE recipient = ? AND epoch_id = ?",
                    (recipient, epoch_id),
                ).fetchone()
                if row is None:
                    self._db.execute("ROLLBACK")
                    return False
                probe = StoredEpoch(
                    recipient, epoch_id, "", "", "", "", 0, "", (), 0, 0, b"", b"",
                    row[0], int.from_bytes(row[1], "big"),
                )  # fmt: skip
                if not window_admits(probe, sequence):
                    self._db.execute("ROLLBACK")
                    return False
                window_record(probe, sequence)
                self._db.execute(
                    "UPDATE epochs SET highest = ?, window = ? WHERE recipient = ? AND "
                    "epoch_id = ?",
                    (probe.highest, probe.window.to_bytes(8, "big"), recipient, epoch_id),
                )
                self._db.execute("COMMIT")
                return True
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def erase(self, recipient: str, epoch_id: bytes) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM epochs WHERE recipient = ? AND epoch_id = ?", (recipient, epoch_id)
            )

    def prune(self, now: float, skew_s: float = 30.0) -> int:
        """Erase every epoch past its not-after (forward secrecy between epochs)."""
        limit = round((now - skew_s) * 1000)
        with self._lock:
            cursor = self._db.execute("DELETE FROM epochs WHERE not_after_ms < ?", (limit,))
            return cursor.rowcount


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
            raise EnvelopeError(
                "a status record is not addressed to this reader", reason=ReasonCode.MALFORMED
            )
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
    tbs = signed_to_be_signed(parsed.body)
    block = parsed.signature
    if isinstance(block, SingleSignature):
        ok = _verify(verifier, tbs, block.signature)
    else:
        try:
            root = root_from_inclusion_proof(
                block.leaf_index, block.tree_size, leaf_hash(tbs), block.path
            )
        except MerkleError as exc:
            raise EnvelopeError(
                f"inclusion proof does not fit the tree: {exc}", reason=ReasonCode.BAD_SIGNATURE
            ) from exc
        cache_key = ("v2", sender, key_id, verifier.suite, root, block.tree_size)
        if roots.get(cache_key, now) is not None:
            ok = True
        else:
            ok = _verify(
                verifier, batch_root_to_be_signed(root, block.tree_size), block.root_signature
            )
            if ok:
                roots.put(cache_key, True, now + 3600.0)
    if not ok:
        raise EnvelopeError(
            f"signature of {sender!r} does not verify", reason=ReasonCode.BAD_SIGNATURE
        )


def _verify(verifier: Verifier, message: bytes, signature: bytes) -> bool:
    try:
        return verifier.verify(message, signature) is True
    except Exception:  # a verifier that raises on garbage has still said "no"
        return False


def open_status(
    data: bytes,
    *,
    topic: str,
    own_id: str,
    directory: SignerDirectory,
    clock: Clock = time.time,
    skew_s: float = 30.0,
    max_size: int = DEFAULT_MAX_SIZE,
    roots: VerifiedRoots | None = None,
) -> Status:
    """Verify a status record addressed to ``own_id`` (the bus sealer principal)."""
    try:
        parsed = decode_record(data, max_size=max_size)
        if not isinstance(parsed, ParsedStatus):
            raise EnvelopeError("not a status record", reason=ReasonCode.MALFORMED)
        status = parsed.status
        if status.recipient != own_id or status.topic != topic:
            raise EnvelopeError(
                "status is addressed to another principal or topic",
                reason=ReasonCode.WRONG_RECIPIENT,
            )
        now = clock()
        now_ms = round(now * 1000)
        window_ms = round((skew_s + 60) * 1000)
        if status.at_ms > now_ms + window_ms:
            raise EnvelopeError("status is dated in the future", reason=ReasonCode.NOT_YET_VALID)
        if status.at_ms < now_ms - window_ms:
            raise EnvelopeError("status is stale", reason=ReasonCode.EXPIRED)
        opener_roots = roots if roots is not None else VerifiedRoots(16)
        verifier = directory_verifier(
            directory, status.sender, status.sender_key_id, status.signature_suite, now
        )
        verify_signed_record(
            parsed, verifier, status.sender, status.sender_key_id, opener_roots, now
        )
        return status
    except EnvelopeError:
        raise
    except Exception as exc:
        raise EnvelopeError(
            f"unexpected {type(exc).__name__} while opening a status",
            reason=ReasonCode.MALFORMED,
        ) from exc


def make_status(*, topic: str, recipient: str, epoch_id: bytes, sequence: int, at: float) -> Status:
    """An unsigned ``epoch_unknown`` status (``sign_status`` fills in the sender)."""
    return Status(
        topic=topic,
        sender="-",
        sender_key_id="-",
        signature_suite="-",
        recipient=recipient,
        epoch_id=epoch_id,
        code=StatusCode.EPOCH_UNKNOWN,
        sequence=sequence,
        at_ms=round(at * 1000),
    )
