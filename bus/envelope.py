"""The fleetbus secure envelope wire format: header model, strict CBOR codec and constants.

This module is pure format (no keys, no crypto calls): ``fleetbus.providers.sealing`` builds and
opens envelopes with it. Every byte is specified in ``docs/wire-format.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from fleetbus.bus.envelope_base import (
    ALG_A256GCM,
    COSE_ENCRYPT0_TAG,
    DEFAULT_MAX_SIZE,
    ENVELOPE_TAG,
    IV_LENGTH,
    MAX_TOPIC,
    BatchSignature,
    EnvelopeError,
    KeyRef,
    MessageKind,
    SignatureBlock,
    SingleSignature,
    canonical_dumps,
    check_key_path,
    decode_signature_block,
    enc_structure,
    encode_signature_block,
    is_map,
    malformed,
    read_array,
    read_bytes,
    read_encrypt0,
    read_key_refs,
    read_outer,
    read_text,
    read_uint,
    require_deterministic,
    strict_loads,
)
from fleetbus.bus.errors import ReasonCode

__all__ = [
    "ALG_A256GCM",
    "BATCH_ROOT_CONTEXT",
    "DEFAULT_MAX_SIZE",
    "ENVELOPE_TAG",
    "EPOCH_CONTEXT",
    "FORMAT_VERSION",
    "IV_LENGTH",
    "MESSAGE_KEY_INFO",
    "BatchSignature",
    "EnvelopeError",
    "KeyRef",
    "MessageKind",
    "ParsedEnvelope",
    "ProtectedHeader",
    "SignatureBlock",
    "SingleSignature",
    "batch_root_to_be_signed",
    "canonical_dumps",
    "decode_envelope",
    "decode_protected",
    "enc_structure",
    "encode_envelope",
    "encode_protected",
    "epoch_context",
    "seal_protected",
    "to_be_signed",
]

#: Wire format version carried in the outer array and in the protected header.
FORMAT_VERSION: Final = 1

#: HKDF ``info`` prefix of the per-message key: ``MESSAGE_KEY_INFO || SHA-256(protected)``.
MESSAGE_KEY_INFO: Final = b"fleetbus/v1/message"
#: First element of the epoch transcript passed to the key path as ``context``.
EPOCH_CONTEXT: Final = "fleetbus/v1/epoch"
#: First element of the batch-root ToBeSigned.
BATCH_ROOT_CONTEXT: Final = "fleetbus-batch-v1"

# COSE header labels (RFC 9052 section 3.1) ...
LABEL_ALG: Final = 1
LABEL_IV: Final = 5
# ... and fleetbus labels from the COSE private-use range (integers below -65536). All of them
# encode in five bytes, so RFC 8949 section 4.2.1 (bytewise) and RFC 7049 (length-first) map key
# orders coincide for the header map.
LABEL_VERSION: Final = -65537
LABEL_KIND: Final = -65538
LABEL_TOPIC: Final = -65539
LABEL_RECIPIENT: Final = -65540
LABEL_MESSAGE_ID: Final = -65541
LABEL_ACTION: Final = -65542
LABEL_ISSUED_AT: Final = -65543
LABEL_EXPIRES_AT: Final = -65544
LABEL_KEY_PATH: Final = -65545
LABEL_KEY_REFS: Final = -65546
LABEL_SENDER: Final = -65547
LABEL_SENDER_KEY_ID: Final = -65548
LABEL_SIGNATURE_SUITE: Final = -65549
LABEL_EPOCH_ID: Final = -65550
LABEL_EPOCH_SEQ: Final = -65551

_HEADER_LABELS: Final = frozenset(
    {
        LABEL_ALG,
        LABEL_IV,
        LABEL_VERSION,
        LABEL_KIND,
        LABEL_TOPIC,
        LABEL_RECIPIENT,
        LABEL_MESSAGE_ID,
        LABEL_ACTION,
        LABEL_ISSUED_AT,
        LABEL_EXPIRES_AT,
        LABEL_KEY_PATH,
        LABEL_KEY_REFS,
        LABEL_SENDER,
        LABEL_SENDER_KEY_ID,
        LABEL_SIGNATURE_SUITE,
        LABEL_EPOCH_ID,
        LABEL_EPOCH_SEQ,
    }
)


EPOCH_ID_LENGTH: Final = 16


@dataclass(frozen=True)
class ProtectedHeader:
    """Everything bound by the AEAD and the signature. Times are integer milliseconds (UTC)."""

    kind: MessageKind
    topic: str
    recipient: str
    message_id: str
    action: str
    issued_at_ms: int
    expires_at_ms: int
    key_path: str
    key_refs: tuple[KeyRef, ...]
    sender: str
    sender_key_id: str
    signature_suite: str
    epoch_id: bytes
    epoch_seq: int
    iv: bytes
    version: int = FORMAT_VERSION

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(ref.provider for ref in self.key_refs)


@dataclass(frozen=True)
class ParsedEnvelope:
    """A structurally valid envelope: nothing about it has been verified yet."""

    protected: bytes  # the exact protected-header bytes (AEAD AD and signature input)
    header: ProtectedHeader
    ciphertext: bytes  # AES-256-GCM ciphertext || 16-byte tag
    signature: SignatureBlock


def _seconds_to_ms(value: float, what: str) -> int:
    if not math.isfinite(value) or value < 0:
        raise EnvelopeError(f"{what} must be a finite, non-negative time", reason=ReasonCode.CONFIG)
    return round(value * 1000)


def _header_map(header: ProtectedHeader) -> dict[int, Any]:
    return {
        LABEL_ALG: ALG_A256GCM,
        LABEL_IV: header.iv,
        LABEL_VERSION: header.version,
        LABEL_KIND: str(header.kind),
        LABEL_TOPIC: header.topic,
        LABEL_RECIPIENT: header.recipient,
        LABEL_MESSAGE_ID: header.message_id,
        LABEL_ACTION: header.action,
        LABEL_ISSUED_AT: header.issued_at_ms,
        LABEL_EXPIRES_AT: header.expires_at_ms,
        LABEL_KEY_PATH: header.key_path,
        LABEL_KEY_REFS: [[r.provider, r.key_id, r.key_ref] for r in header.key_refs],
        LABEL_SENDER: header.sender,
        LABEL_SENDER_KEY_ID: header.sender_key_id,
        LABEL_SIGNATURE_SUITE: header.signature_suite,
        LABEL_EPOCH_ID: header.epoch_id,
        LABEL_EPOCH_SEQ: header.epoch_seq,
    }


def encode_protected(header: ProtectedHeader) -> bytes:
    """The protected-header bytes (``bstr .cbor header-map`` content) for ``header``."""
    return canonical_dumps(_header_map(header))


def seal_protected(header: ProtectedHeader) -> bytes:
    """``encode_protected`` for a sender: refuses (MALFORMED) a header that a recipient's
    ``decode_protected`` would reject, by the same field checks, without decoding the bytes
    again — they are deterministic CBOR by construction."""
    fields = _header_map(header)
    _read_header(fields)
    return canonical_dumps(fields)


def decode_protected(protected: bytes) -> ProtectedHeader:
    """Strictly parse protected-header bytes; raises ``EnvelopeError`` (MALFORMED / version)."""
    return _read_header(strict_loads(protected, "protected header"))


def _read_header(fields: Any) -> ProtectedHeader:
    if not is_map(fields):
        raise malformed("protected header must be a map")
    version = fields.get(LABEL_VERSION)
    if type(version) is int and version != FORMAT_VERSION:
        raise EnvelopeError(
            f"protected header has format version {version}; this build reads {FORMAT_VERSION}",
            reason=ReasonCode.UNSUPPORTED_VERSION,
        )
    if set(fields) != _HEADER_LABELS:
        raise malformed("protected header must have exactly the fleetbus v1 labels")
    if read_uint(version, "version") != FORMAT_VERSION:  # pragma: no cover - handled above
        raise malformed("version")
    if type(fields[LABEL_ALG]) is not int or fields[LABEL_ALG] != ALG_A256GCM:
        raise malformed("alg must be 3 (A256GCM)")
    kind_text = read_text(fields[LABEL_KIND], "kind")
    try:
        kind = MessageKind(kind_text)
    except ValueError as exc:
        raise malformed("kind must be cmd, rsp or tel") from exc
    refs = read_key_refs(fields[LABEL_KEY_REFS])
    header = ProtectedHeader(
        kind=kind,
        topic=read_text(fields[LABEL_TOPIC], "topic", MAX_TOPIC),
        recipient=read_text(fields[LABEL_RECIPIENT], "recipient"),
        message_id=read_text(fields[LABEL_MESSAGE_ID], "message id"),
        action=read_text(fields[LABEL_ACTION], "action"),
        issued_at_ms=read_uint(fields[LABEL_ISSUED_AT], "issued-at"),
        expires_at_ms=read_uint(fields[LABEL_EXPIRES_AT], "expires-at"),
        key_path=read_text(fields[LABEL_KEY_PATH], "key path"),
        key_refs=refs,
        sender=read_text(fields[LABEL_SENDER], "sender"),
        sender_key_id=read_text(fields[LABEL_SENDER_KEY_ID], "sender key id"),
        signature_suite=read_text(fields[LABEL_SIGNATURE_SUITE], "signature suite"),
        epoch_id=read_bytes(fields[LABEL_EPOCH_ID], "epoch id", size=EPOCH_ID_LENGTH),
        epoch_seq=read_uint(fields[LABEL_EPOCH_SEQ], "epoch sequence"),
        iv=read_bytes(fields[LABEL_IV], "iv", size=IV_LENGTH),
    )
    if header.expires_at_ms < header.issued_at_ms:
        raise malformed("expires-at is before issued-at")
    check_key_path(header.key_path, header.providers)
    return header


def encode_envelope(protected: bytes, ciphertext: bytes, signature: SignatureBlock) -> bytes:
    """The envelope bytes: ``#6.ENVELOPE_TAG([1, COSE_Encrypt0, signature block])``."""
    encrypt0 = cbor2.CBORTag(COSE_ENCRYPT0_TAG, [protected, {}, ciphertext])
    return canonical_dumps(
        cbor2.CBORTag(ENVELOPE_TAG, [FORMAT_VERSION, encrypt0, encode_signature_block(signature)])
    )


def decode_envelope(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> ParsedEnvelope:
    """Size check, then strict parse. Raises ``EnvelopeError`` with OVERSIZE, MALFORMED or
    UNSUPPORTED_VERSION; verifies nothing cryptographic."""
    outer, body, version = read_outer(data, max_size, "envelope")
    if version != FORMAT_VERSION:
        raise EnvelopeError(
            f"envelope format version {version}; this build reads {FORMAT_VERSION}",
            reason=ReasonCode.UNSUPPORTED_VERSION,
        )
    require_deterministic(outer, data, "envelope")
    read_array(body, "envelope", 3)
    protected, ciphertext = read_encrypt0(body[1], "second")
    header = decode_protected(protected)
    return ParsedEnvelope(
        protected=protected,
        header=header,
        ciphertext=ciphertext,
        signature=decode_signature_block(body[2]),
    )


def to_be_signed(protected: bytes, ciphertext: bytes) -> bytes:
    """Signature input of one envelope, COSE ``Sig_structure`` style:
    ``["Signature1", protected, h'', ciphertext]``."""
    return canonical_dumps(["Signature1", protected, b"", ciphertext])


def batch_root_to_be_signed(root: bytes, tree_size: int) -> bytes:
    """Signature input of a batch: ``["fleetbus-batch-v1", root, tree_size]``."""
    return canonical_dumps([BATCH_ROOT_CONTEXT, root, tree_size])


def epoch_context(sender: str, recipient: str, epoch_id: bytes) -> bytes:
    """The key-path ``context`` of one epoch: ``["fleetbus/v1/epoch", sender, recipient, id]``.

    Only per-epoch fields: the same context is reused by every message of the epoch.
    """
    return canonical_dumps([EPOCH_CONTEXT, sender, recipient, epoch_id])


def header_times(issued_at: float, expires_at: float) -> tuple[int, int]:
    """Seconds (float, UTC epoch) to the header's integer milliseconds, validated."""
    issued = _seconds_to_ms(issued_at, "issued_at")
    expires = _seconds_to_ms(expires_at, "expires_at")
    if expires < issued:
        raise EnvelopeError("expires_at is before issued_at", reason=ReasonCode.CONFIG)
    return issued, expires


def key_refs_digest_input(refs: Sequence[KeyRef]) -> bytes:
    """Canonical bytes of the key refs (the opener hashes these to name an epoch key)."""
    return canonical_dumps([[r.provider, r.key_id, r.key_ref] for r in refs])
