"""``EnvelopeOpener``: the receiving side of wire format v1, in the check order of
docs/wire-format.md."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetbus.bus.envelope import (
    DEFAULT_MAX_SIZE,
    BatchSignature,
    EnvelopeError,
    ParsedEnvelope,
    ProtectedHeader,
    decode_envelope,
    enc_structure,
    epoch_context,
    key_refs_digest_input,
    to_be_signed,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import (
    KeyPath,
    PrivateKeySet,
    Verifier,
)
from fleetbus.providers.keypath import KeyPathRunner, is_at_least
from fleetbus.providers.sealing.common import (
    Clock,
    OpenedEnvelope,
    SignerDirectory,
    check_key_ids,
    derive_message_key,
    directory_verifier,
    recover_epoch_key,
)
from fleetbus.providers.sealing.replay import _LRU, ReplayCache, VerifiedRoots
from fleetbus.providers.sealing.signatures import signature_block_verifies


@dataclass
class OpenerStats:
    """Counters: signatures verified, batch roots served from cache, key-path recoveries."""

    signature_verifications: int = 0
    root_cache_hits: int = 0
    key_recoveries: int = 0
    epoch_cache_hits: int = 0


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
        ok = signature_block_verifies(
            to_be_signed(parsed.protected, parsed.ciphertext),
            parsed.signature,
            verifier,
            roots=self._roots,
            root_key=(header.sender, header.sender_key_id, header.signature_suite),
            now=now,
            root_ttl_s=self._epoch_ttl,
            on_verify=self._count_verification,
            on_root_hit=self._count_root_hit,
        )
        if not ok:
            raise EnvelopeError(
                f"signature of {header.sender!r} does not verify", reason=ReasonCode.BAD_SIGNATURE
            )

    def _count_verification(self) -> None:
        self.stats.signature_verifications += 1

    def _count_root_hit(self) -> None:
        self.stats.root_cache_hits += 1

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
