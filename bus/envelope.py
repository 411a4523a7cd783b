"""The fleetbus secure envelope wire format: header model, strict CBOR codec and constants.

This module is pure format (no keys, no crypto calls): ``fleetbus.providers.sealing`` builds and
opens envelopes with it. Every byte is specified in ``docs/wire-format.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import cbor2

from fleetbus.bus import cbor
from fleetbus.bus.errors import FleetbusError, ReasonCode

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
#: CBOR tag of the outer envelope: ASCII "fbus" (0x66627573); first-come-first-served range,
#: not IANA-registered.
ENVELOPE_TAG: Final = 0x66627573
#: CBOR tag of COSE_Encrypt0 (RFC 9052).
COSE_ENCRYPT0_TAG: Final = 16
#: COSE algorithm id of AES-256-GCM with a 128-bit tag (RFC 9053).
ALG_A256GCM: Final = 3
IV_LENGTH: Final = 12
#: Default upper bound of an encoded envelope; larger input is rejected before parsing.
DEFAULT_MAX_SIZE: Final = 64 * 1024

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

SIG_MODE_SINGLE: Final = 0
SIG_MODE_BATCH: Final = 1

# Bounds that keep a hostile envelope cheap to reject (all documented in docs/wire-format.md).
MAX_TEXT: Final = 256  # characters of any id, action or name
MAX_TOPIC: Final = 249  # Kafka's own limit on topic names
MAX_KEY_REFS: Final = 8
MAX_KEY_REF: Final = 8192
MAX_SIGNATURE: Final = 16384
MAX_TREE_SIZE: Final = 1 << 20
MAX_PATH: Final = 64
EPOCH_ID_LENGTH: Final = 16
HASH_LENGTH: Final = 32
_UINT64_MAX: Final = (1 << 64) - 1
_MAX_DEPTH: Final = 8


class EnvelopeError(FleetbusError):
    """An envelope could not be sealed or opened; ``reason`` says why (never secret)."""


class MessageKind(StrEnum):
    """What an envelope carries."""

    COMMAND = "cmd"
    RESPONSE = "rsp"
    TELEMETRY = "tel"


@dataclass(frozen=True)
class KeyRef:
    """One key-path provider's entry: provider name, key id, and what the recipient needs."""

    provider: str
    key_id: str
    key_ref: bytes


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
class SingleSignature:
    """One signature over this envelope's ToBeSigned."""

    signature: bytes


@dataclass(frozen=True)
class BatchSignature:
    """One signature over a Merkle root, plus this envelope's inclusion proof."""

    root_signature: bytes
    tree_size: int
    leaf_index: int
    path: tuple[bytes, ...]


SignatureBlock = SingleSignature | BatchSignature


@dataclass(frozen=True)
class ParsedEnvelope:
    """A structurally valid envelope: nothing about it has been verified yet."""

    protected: bytes  # the exact protected-header bytes (AEAD AD and signature input)
    header: ProtectedHeader
    ciphertext: bytes  # AES-256-GCM ciphertext || 16-byte tag
    signature: SignatureBlock


def canonical_dumps(value: object) -> bytes:
    """Deterministic CBOR (definite lengths, shortest ints, sorted map keys)."""
    return cbor.dumps(value)


def _malformed(what: str) -> EnvelopeError:
    return EnvelopeError(f"malformed envelope: {what}", reason=ReasonCode.MALFORMED)


def _strict_loads(data: bytes, what: str) -> Any:
    """Decode one CBOR item and insist that ``data`` is exactly its deterministic encoding."""
    return _require_deterministic(_loads(data, what, _MAX_DEPTH), data, what)


def _loads(data: bytes, what: str | None, max_depth: int) -> Any:
    """One well-formed CBOR item (``what`` None: the outer record, named by no prefix)."""
    try:
        return cbor.decode(data, max_depth=max_depth)
    except cbor.NotWellFormedCBOR as exc:
        prefix = "" if what is None else f"{what} is "
        raise _malformed(f"{prefix}not well-formed CBOR") from exc.__cause__


def _require_deterministic(value: Any, data: bytes, what: str) -> Any:
    try:
        cbor.require_deterministic(value, data)
    except cbor.UnsupportedCBORItem as exc:
        raise _malformed(f"{what} contains unsupported CBOR items") from exc.__cause__
    except cbor.NonDeterministicCBOR:
        raise _malformed(f"{what} is not deterministically encoded CBOR") from None
    return value


# Field readers: exact Python types (bool is not an int here, bytearray is not bytes).
def _text(value: object, what: str, limit: int = MAX_TEXT) -> str:
    if type(value) is not str or not value or len(value) > limit:
        raise _malformed(f"{what} must be a non-empty text string of at most {limit} characters")
    return value


def _bytes(value: object, what: str, *, size: int | None = None, limit: int = 0) -> bytes:
    if type(value) is not bytes:
        raise _malformed(f"{what} must be a byte string")
    if size is not None and len(value) != size:
        raise _malformed(f"{what} must be {size} bytes")
    if limit and (not value or len(value) > limit):
        raise _malformed(f"{what} must be 1..{limit} bytes")
    return value


def _uint(value: object, what: str, limit: int = _UINT64_MAX) -> int:
    if type(value) is not int or value < 0 or value > limit:
        raise _malformed(f"{what} must be an unsigned integer of at most {limit}")
    return value


def _array(value: object, what: str, length: int | None = None) -> list[Any]:
    # cbor2 decodes arrays inside tags as tuples and maps as frozendicts; both are fine here.
    if not cbor.is_array(value) or not isinstance(value, list | tuple):
        raise _malformed(f"{what} must be an array")
    items: list[Any] = list(value)
    if length is not None and len(items) != length:
        raise _malformed(f"{what} must have {length} elements")
    return items


_is_map = cbor.is_map


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
    return _read_header(_strict_loads(protected, "protected header"))


def _read_key_refs(value: object) -> tuple[KeyRef, ...]:
    raw_refs = _array(value, "key refs")
    if not 1 <= len(raw_refs) <= MAX_KEY_REFS:
        raise _malformed(f"key refs must have 1..{MAX_KEY_REFS} entries")
    refs = []
    for raw in raw_refs:
        entry = _array(raw, "key ref", 3)
        refs.append(
            KeyRef(
                provider=_text(entry[0], "key ref provider"),
                key_id=_text(entry[1], "key ref key id"),
                key_ref=_bytes(entry[2], "key ref", limit=MAX_KEY_REF),
            )
        )
    return tuple(refs)


def _read_header(fields: Any) -> ProtectedHeader:
    if not _is_map(fields):
        raise _malformed("protected header must be a map")
    version = fields.get(LABEL_VERSION)
    if type(version) is int and version != FORMAT_VERSION:
        raise EnvelopeError(
            f"protected header has format version {version}; this build reads {FORMAT_VERSION}",
            reason=ReasonCode.UNSUPPORTED_VERSION,
        )
    if set(fields) != _HEADER_LABELS:
        raise _malformed("protected header must have exactly the fleetbus v1 labels")
    if _uint(version, "version") != FORMAT_VERSION:  # pragma: no cover - handled above
        raise _malformed("version")
    if type(fields[LABEL_ALG]) is not int or fields[LABEL_ALG] != ALG_A256GCM:
        raise _malformed("alg must be 3 (A256GCM)")
    kind_text = _text(fields[LABEL_KIND], "kind")
    try:
        kind = MessageKind(kind_text)
    except ValueError as exc:
        raise _malformed("kind must be cmd, rsp or tel") from exc
    refs = _read_key_refs(fields[LABEL_KEY_REFS])
    header = ProtectedHeader(
        kind=kind,
        topic=_text(fields[LABEL_TOPIC], "topic", MAX_TOPIC),
        recipient=_text(fields[LABEL_RECIPIENT], "recipient"),
        message_id=_text(fields[LABEL_MESSAGE_ID], "message id"),
        action=_text(fields[LABEL_ACTION], "action"),
        issued_at_ms=_uint(fields[LABEL_ISSUED_AT], "issued-at"),
        expires_at_ms=_uint(fields[LABEL_EXPIRES_AT], "expires-at"),
        key_path=_text(fields[LABEL_KEY_PATH], "key path"),
        key_refs=refs,
        sender=_text(fields[LABEL_SENDER], "sender"),
        sender_key_id=_text(fields[LABEL_SENDER_KEY_ID], "sender key id"),
        signature_suite=_text(fields[LABEL_SIGNATURE_SUITE], "signature suite"),
        epoch_id=_bytes(fields[LABEL_EPOCH_ID], "epoch id", size=EPOCH_ID_LENGTH),
        epoch_seq=_uint(fields[LABEL_EPOCH_SEQ], "epoch sequence"),
        iv=_bytes(fields[LABEL_IV], "iv", size=IV_LENGTH),
    )
    if header.expires_at_ms < header.issued_at_ms:
        raise _malformed("expires-at is before issued-at")
    if header.key_path != "+".join(header.providers):
        raise _malformed("key path does not name the key refs' providers in order")
    if len(set(header.providers)) != len(header.providers):
        raise _malformed("a provider appears twice in the key path")
    return header


def _encode_signature_block(block: SignatureBlock) -> list[Any]:
    if isinstance(block, SingleSignature):
        return [SIG_MODE_SINGLE, block.signature]
    return [
        SIG_MODE_BATCH,
        block.root_signature,
        block.tree_size,
        block.leaf_index,
        list(block.path),
    ]


def _decode_signature_block(value: object) -> SignatureBlock:
    block = _array(value, "signature block")
    if not block or type(block[0]) is not int:
        raise _malformed("signature block must start with its mode")
    if block[0] == SIG_MODE_SINGLE:
        _array(block, "single signature block", 2)
        return SingleSignature(_bytes(block[1], "signature", limit=MAX_SIGNATURE))
    if block[0] == SIG_MODE_BATCH:
        _array(block, "batch signature block", 5)
        tree_size = _uint(block[2], "tree size", MAX_TREE_SIZE)
        leaf_index = _uint(block[3], "leaf index", MAX_TREE_SIZE)
        if tree_size == 0 or leaf_index >= tree_size:
            raise _malformed("leaf index must be below a non-zero tree size")
        path = _array(block[4], "inclusion path")
        if len(path) > MAX_PATH:
            raise _malformed(f"inclusion path is longer than {MAX_PATH}")
        return BatchSignature(
            root_signature=_bytes(block[1], "root signature", limit=MAX_SIGNATURE),
            tree_size=tree_size,
            leaf_index=leaf_index,
            path=tuple(_bytes(node, "path node", size=HASH_LENGTH) for node in path),
        )
    raise _malformed("unknown signature mode")


def encode_envelope(protected: bytes, ciphertext: bytes, signature: SignatureBlock) -> bytes:
    """The envelope bytes: ``#6.ENVELOPE_TAG([1, COSE_Encrypt0, signature block])``."""
    encrypt0 = cbor2.CBORTag(COSE_ENCRYPT0_TAG, [protected, {}, ciphertext])
    return canonical_dumps(
        cbor2.CBORTag(ENVELOPE_TAG, [FORMAT_VERSION, encrypt0, _encode_signature_block(signature)])
    )


def decode_envelope(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> ParsedEnvelope:
    """Size check, then strict parse. Raises ``EnvelopeError`` with OVERSIZE, MALFORMED or
    UNSUPPORTED_VERSION; verifies nothing cryptographic."""
    if type(data) is not bytes:
        raise _malformed("envelope must be bytes")
    if len(data) > max_size:
        raise EnvelopeError(
            f"envelope is {len(data)} bytes; the limit is {max_size}", reason=ReasonCode.OVERSIZE
        )
    outer = _loads(data, None, _MAX_DEPTH)
    if type(outer) is not cbor2.CBORTag or outer.tag != ENVELOPE_TAG:
        raise _malformed("not a fleetbus envelope (outer tag)")
    body = _array(outer.value, "envelope")
    if not body:
        raise _malformed("envelope array is empty")
    version = _uint(body[0], "format version")
    if version != FORMAT_VERSION:
        raise EnvelopeError(
            f"envelope format version {version}; this build reads {FORMAT_VERSION}",
            reason=ReasonCode.UNSUPPORTED_VERSION,
        )
    _require_deterministic(outer, data, "envelope")
    _array(body, "envelope", 3)
    encrypt0 = body[1]
    if type(encrypt0) is not cbor2.CBORTag or encrypt0.tag != COSE_ENCRYPT0_TAG:
        raise _malformed("second element must be a tagged COSE_Encrypt0")
    cose = _array(encrypt0.value, "COSE_Encrypt0", 3)
    protected = _bytes(cose[0], "protected header")
    if not _is_map(cose[1]) or cose[1]:
        raise _malformed("unprotected header must be an empty map")
    ciphertext = _bytes(cose[2], "ciphertext")
    if len(ciphertext) < 16:
        raise _malformed("ciphertext is shorter than the AES-GCM tag")
    header = decode_protected(protected)
    return ParsedEnvelope(
        protected=protected,
        header=header,
        ciphertext=ciphertext,
        signature=_decode_signature_block(body[2]),
    )


def enc_structure(protected: bytes) -> bytes:
    """AEAD associated data: COSE ``Enc_structure`` ``["Encrypt0", protected, h'']``."""
    return canonical_dumps(["Encrypt0", protected, b""])


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
