"""Seal and open fleetbus envelopes: key epochs, per-message keys, AES-256-GCM, signatures.

``EnvelopeSealer`` is the sending side (dispatch bus, vehicle responses, telemetry);
``EnvelopeOpener`` the receiving side. The byte format lives in ``fleetbus.bus.envelope`` and is
specified, with the check order of ``open``, in ``docs/wire-format.md``.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetbus.bus.envelope import (
    DEFAULT_MAX_SIZE,
    IV_LENGTH,
    MESSAGE_KEY_INFO,
    BatchSignature,
    EnvelopeError,
    KeyRef,
    MessageKind,
    ParsedEnvelope,
    ProtectedHeader,
    SignatureBlock,
    SingleSignature,
    batch_root_to_be_signed,
    canonical_dumps,
    decode_envelope,
    enc_structure,
    encode_envelope,
    epoch_context,
    header_times,
    key_refs_digest_input,
    seal_protected,
    to_be_signed,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import (
    KeyPath,
    PrivateKeySet,
    RecipientKeys,
    SecurityProfile,
    Signer,
    Verifier,
)
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer, is_at_least
from fleetbus.providers.merkle import (
    MerkleError,
    inclusion_proofs,
    leaf_hash,
    root_from_inclusion_proof,
)

__all__ = [
    "EnvelopeOpener",
    "EnvelopeSealer",
    "EpochPolicy",
    "OpenedEnvelope",
    "OpenerStats",
    "PreparedEnvelope",
    "ReplayCache",
    "SealRequest",
    "SealerStats",
    "SignerDirectory",
    "VerifiedRoots",
    "derive_message_key",
]

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


def _recipient_fingerprint(recipient: RecipientKeys) -> bytes:
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
        if request.profile.signature_suite != self._signer.suite:
            raise EnvelopeError(
                f"profile {request.profile.name!r} wants signature suite "
                f"{request.profile.signature_suite!r}; this sealer signs with "
                f"{self._signer.suite!r}",
                reason=ReasonCode.CONFIG,
            )
        if type(request.payload) is not bytes:
            raise EnvelopeError("payload must be bytes", reason=ReasonCode.CONFIG)
        try:
            kind = MessageKind(request.kind)
        except ValueError as exc:
            raise EnvelopeError(
                f"unknown message kind {request.kind!r}", reason=ReasonCode.CONFIG
            ) from exc
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
            _recipient_fingerprint(recipient),
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


class SignerDirectory(Protocol):
    """What the opener needs from the key directory (``KeyDirectory`` satisfies it)."""

    def verifier_for(self, principal_id: str, key_id: str, *, at: float) -> Verifier: ...


class ReplayCache:
    """Message ids already opened, per sender, each kept until its message would be expired.

    In memory, for one process (a vehicle's opener). Bounded per sender: a sender whose live ids
    fill its share (``max_per_sender``) is refused with ``sender_state_full`` until some of them
    expire — fail closed for that sender only; no sender can make another's ids go (there is
    no eviction). Expiry runs off a heap ordered by deadline, so ``add`` costs O(log n) and
    never scans. The opener bounds how far ahead a deadline can lie (``max_lifetime_s``), so a
    full share always drains.
    """

    def __init__(self, max_per_sender: int = 10_000, *, clock: Clock = time.time) -> None:
        if max_per_sender < 1:
            raise EnvelopeError(
                "a replay cache needs max_per_sender >= 1", reason=ReasonCode.CONFIG
            )
        self._max = max_per_sender
        self._clock = clock
        self._ids: dict[str, dict[str, float]] = {}
        self._deadlines: list[tuple[float, str, str]] = []
        self._size = 0
        self._lock = threading.Lock()
        self.refusals = 0

    def __len__(self) -> int:
        return self._size

    def seen(self, sender: str, message_id: str) -> bool:
        with self._lock:
            until = self._ids.get(sender, {}).get(message_id)
            return until is not None and until >= self._clock()

    def add(self, sender: str, message_id: str, *, until: float) -> bool:
        """Record an opened id; False when it was already there (a concurrent replay).

        Raises ``EnvelopeError`` (``sender_state_full``) when ``sender`` has no room left.
        """
        now = self._clock()
        with self._lock:
            self._expire(now)
            ids = self._ids.get(sender)
            if ids is not None and message_id in ids:
                return False  # still live: _expire dropped every expired id
            if ids is not None and len(ids) >= self._max:
                self.refusals += 1
                raise EnvelopeError(
                    f"replay state of {sender!r} is full ({self._max} live message ids)",
                    reason=ReasonCode.SENDER_STATE_FULL,
                )
            self._ids.setdefault(sender, {})[message_id] = until
            heapq.heappush(self._deadlines, (until, sender, message_id))
            self._size += 1
            return True

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] < now:
            until, sender, message_id = heapq.heappop(self._deadlines)
            ids = self._ids.get(sender)
            if ids is None or ids.get(message_id) != until:
                continue
            del ids[message_id]
            self._size -= 1
            if not ids:
                del self._ids[sender]


class _LRU:
    """A small bounded LRU map with per-entry expiry."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._data: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, now: float) -> object | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[0] < now:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return item[1]

    def put(self, key: Hashable, value: object, until: float) -> None:
        with self._lock:
            self._data[key] = (until, value)
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)


class VerifiedRoots(_LRU):
    """Batch-signature roots whose signature has verified: (sender, sender key id, suite, root,
    tree size) -> True until the entry expires. One per opener by default; openers in one
    process that use the same key directory (a ``VehicleAgent`` serving many vehicles) may
    share one, so that a batch root is verified once per process, not once per recipient.
    Signer validity (revocation, expiry) and each envelope's inclusion proof are still checked
    on every open."""


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


@dataclass
class OpenerStats:
    """Counters: signatures verified, batch roots served from cache, key-path recoveries."""

    signature_verifications: int = 0
    root_cache_hits: int = 0
    key_recoveries: int = 0
    epoch_cache_hits: int = 0


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


class EnvelopeOpener:
    """Opens envelopes addressed to ``own.principal_id``; checks in the documented order.

    ``open`` raises only ``EnvelopeError``; its ``reason`` is the DLQ / metrics reason code.

    ``max_lifetime_s``: an envelope whose expiry lies further ahead than this (plus the skew)
    is refused (``policy_denied``), which bounds how long anyone must remember its message id.
    ``check_replay`` False: no replay check here; the caller owns it. The bus's stages do that
    in their transactional partition state (docs/pipeline.md, "Uplink replay protection"): an
    in-memory set would outlive an aborted transaction and reject its records when they are
    read again.
    """

    def __init__(
        self,
        own: PrivateKeySet,
        directory: SignerDirectory,
        runner: KeyPathRunner,
        minimum_path: KeyPath,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        clock: Clock = time.time,
        skew_s: float = 30.0,
        replay_cache: ReplayCache | None = None,
        check_replay: bool = True,
        max_lifetime_s: float | None = None,
        epoch_key_ttl_s: float = 3600.0,
        cache_entries: int = 4096,
        root_cache: VerifiedRoots | None = None,
    ) -> None:
        if not check_replay and replay_cache is not None:
            raise EnvelopeError(
                "a replay cache was given to an opener that does not check replays",
                reason=ReasonCode.CONFIG,
            )
        self._own = own
        self._directory = directory
        self._runner = runner
        self._minimum = minimum_path
        self._max_size = max_size
        self._clock = clock
        self._skew_ms = round(skew_s * 1000)
        self._replay: ReplayCache | None = None
        if check_replay:
            self._replay = replay_cache if replay_cache is not None else ReplayCache(clock=clock)
        self._max_lifetime_ms = None if max_lifetime_s is None else round(max_lifetime_s * 1000)
        self._epoch_ttl = epoch_key_ttl_s
        self._epoch_keys = _LRU(cache_entries)
        self._roots = root_cache if root_cache is not None else VerifiedRoots(cache_entries)
        self.stats = OpenerStats()

    def __repr__(self) -> str:
        return f"EnvelopeOpener(principal={self._own.principal_id!r})"

    @property
    def checks_replay(self) -> bool:
        """Whether ``open`` refuses message ids it has opened before (see the class doc)."""
        return self._replay is not None

    def open(self, data: bytes, *, topic: str) -> OpenedEnvelope:
        """Verify and decrypt ``data`` read from ``topic``; raise ``EnvelopeError`` otherwise."""
        try:
            return self._open(data, topic)
        except EnvelopeError:
            raise
        except Exception as exc:
            # A security boundary must not crash its consumer on a poison record; the type name
            # is enough to find the bug and carries no secret.
            raise EnvelopeError(
                f"unexpected {type(exc).__name__} while opening an envelope",
                reason=ReasonCode.MALFORMED,
            ) from exc

    def _open(self, data: bytes, topic: str) -> OpenedEnvelope:
        parsed = decode_envelope(data, max_size=self._max_size)  # OVERSIZE, MALFORMED, VERSION
        header = parsed.header
        now = self._clock()
        self._check_binding(header, topic)
        self._check_time(header, now)
        path = self._check_path(header)
        verifier = self._verifier(header, now)
        self._verify_signature(parsed, verifier, now)
        replay = self._replay
        if replay is not None and replay.seen(header.sender, header.message_id):
            raise EnvelopeError(
                f"message id {header.message_id!r} from {header.sender!r} was already opened",
                reason=ReasonCode.REPLAYED,
            )
        payload = self._decrypt(parsed)
        until = (header.expires_at_ms + self._skew_ms) / 1000
        if replay is not None and not replay.add(header.sender, header.message_id, until=until):
            raise EnvelopeError(
                f"message id {header.message_id!r} from {header.sender!r} was already opened",
                reason=ReasonCode.REPLAYED,
            )
        return OpenedEnvelope(
            kind=header.kind,
            topic=header.topic,
            recipient=header.recipient,
            message_id=header.message_id,
            action=header.action,
            issued_at=header.issued_at_ms / 1000,
            expires_at=header.expires_at_ms / 1000,
            key_path=path,
            key_ids=tuple((r.provider, r.key_id) for r in header.key_refs),
            sender=header.sender,
            sender_key_id=header.sender_key_id,
            signature_suite=header.signature_suite,
            epoch_id=header.epoch_id,
            epoch_seq=header.epoch_seq,
            batch_signed=isinstance(parsed.signature, BatchSignature),
            payload=payload,
        )

    def _check_binding(self, header: ProtectedHeader, topic: str) -> None:
        if header.recipient != self._own.principal_id:
            raise EnvelopeError(
                f"envelope is for {header.recipient!r}, not {self._own.principal_id!r}",
                reason=ReasonCode.WRONG_RECIPIENT,
            )
        if header.topic != topic:
            raise EnvelopeError(
                f"envelope was sealed for topic {header.topic!r} but read from {topic!r}",
                reason=ReasonCode.WRONG_RECIPIENT,
            )

    def _check_time(self, header: ProtectedHeader, now: float) -> None:
        now_ms = round(now * 1000)
        if header.issued_at_ms > now_ms + self._skew_ms:
            raise EnvelopeError(
                "envelope is issued in the future (beyond the clock-skew allowance)",
                reason=ReasonCode.NOT_YET_VALID,
            )
        if now_ms > header.expires_at_ms + self._skew_ms:
            raise EnvelopeError("envelope has expired", reason=ReasonCode.EXPIRED)
        limit = self._max_lifetime_ms
        if limit is not None and header.expires_at_ms > now_ms + limit + self._skew_ms:
            raise EnvelopeError(
                f"envelope expires more than {limit / 1000:.0f} s ahead (the longest lifetime "
                "accepted here)",
                reason=ReasonCode.POLICY_DENIED,
            )

    def _check_path(self, header: ProtectedHeader) -> KeyPath:
        path = KeyPath(header.providers)
        try:
            ok = is_at_least(path, self._minimum)
        except FleetbusError:
            ok = False  # a path we cannot rank is not known to meet the minimum
        if not ok:
            raise EnvelopeError(
                f"key path {path.name!r} is below the minimum {self._minimum.name!r}",
                reason=ReasonCode.DOWNGRADE,
            )
        return path

    def _verifier(self, header: ProtectedHeader, now: float) -> Verifier:
        return directory_verifier(
            self._directory,
            header.sender,
            header.sender_key_id,
            header.signature_suite,
            now,
            named_by="header",
        )

    def _verify_signature(self, parsed: ParsedEnvelope, verifier: Verifier, now: float) -> None:
        header = parsed.header
        tbs = to_be_signed(parsed.protected, parsed.ciphertext)
        block = parsed.signature
        if isinstance(block, SingleSignature):
            ok = self._verify(verifier, tbs, block.signature)
        else:
            try:
                root = root_from_inclusion_proof(
                    block.leaf_index, block.tree_size, leaf_hash(tbs), block.path
                )
            except MerkleError as exc:
                raise EnvelopeError(
                    f"inclusion proof does not fit the tree: {exc}",
                    reason=ReasonCode.BAD_SIGNATURE,
                ) from exc
            cache_key = (
                header.sender,
                header.sender_key_id,
                header.signature_suite,
                root,
                block.tree_size,
            )
            if self._roots.get(cache_key, now) is not None:
                self.stats.root_cache_hits += 1
                ok = True
            else:
                ok = self._verify(
                    verifier, batch_root_to_be_signed(root, block.tree_size), block.root_signature
                )
                if ok:
                    self._roots.put(cache_key, True, now + self._epoch_ttl)
        if not ok:
            raise EnvelopeError(
                f"signature of {header.sender!r} does not verify", reason=ReasonCode.BAD_SIGNATURE
            )

    def _verify(self, verifier: Verifier, message: bytes, signature: bytes) -> bool:
        self.stats.signature_verifications += 1
        try:
            return verifier.verify(message, signature) is True
        except Exception:  # a verifier that raises on garbage has still said "no"
            return False

    def _decrypt(self, parsed: ParsedEnvelope) -> bytes:
        """Key ids, epoch key, per-message key, AEAD. No signature check: callers do that."""
        header = parsed.header
        check_key_ids(self._own, self._runner, header.key_refs)
        now = self._clock()
        slot = (
            header.sender,
            header.epoch_id,
            header.key_path,
            hashlib.sha256(key_refs_digest_input(header.key_refs)).digest(),
        )
        cached = self._epoch_keys.get(slot, now)
        if isinstance(cached, bytes):
            self.stats.epoch_cache_hits += 1
            epoch_key = cached
        else:
            epoch_key = self._recover(header)
        key = derive_message_key(epoch_key, parsed.protected)
        try:
            payload = AESGCM(key).decrypt(
                header.iv, parsed.ciphertext, enc_structure(parsed.protected)
            )
        except InvalidTag as exc:
            raise EnvelopeError(
                "AEAD authentication failed: ciphertext or protected header changed",
                reason=ReasonCode.TAMPERED,
            ) from exc
        if cached is None:
            # Cached only once it has opened a message: a wrong key never poisons the epoch.
            self._epoch_keys.put(slot, epoch_key, now + self._epoch_ttl)
        return payload

    def _recover(self, header: ProtectedHeader) -> bytes:
        context = epoch_context(header.sender, header.recipient, header.epoch_id)
        self.stats.key_recoveries += 1
        return recover_epoch_key(self._runner, self._own, header.key_path, header.key_refs, context)
