"""What wire formats 1 (``fleetbus.bus.envelope``) and 2 (``fleetbus.bus.envelope_v2``) share:
the outer tags and bounds, ``EnvelopeError``, key refs and signature blocks, and the strict field
readers (exact Python types: bool is not an int here, bytearray is not bytes) over
``fleetbus.bus.cbor``. Pure format: no keys, no crypto calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import cbor2

from fleetbus.bus import cbor
from fleetbus.bus.errors import FleetbusError, ReasonCode

__all__ = [
    "ALG_A256GCM",
    "COSE_ENCRYPT0_TAG",
    "DEFAULT_MAX_SIZE",
    "ENVELOPE_TAG",
    "HASH_LENGTH",
    "IV_LENGTH",
    "MAX_DEPTH",
    "MAX_KEY_REF",
    "MAX_KEY_REFS",
    "MAX_PATH",
    "MAX_SIGNATURE",
    "MAX_TEXT",
    "MAX_TOPIC",
    "MAX_TREE_SIZE",
    "SIG_MODE_BATCH",
    "SIG_MODE_SINGLE",
    "BatchSignature",
    "EnvelopeError",
    "KeyRef",
    "MessageKind",
    "SignatureBlock",
    "SingleSignature",
    "canonical_dumps",
    "check_key_path",
    "decode_signature_block",
    "enc_structure",
    "encode_signature_block",
    "is_map",
    "loads",
    "malformed",
    "read_array",
    "read_bytes",
    "read_encrypt0",
    "read_key_refs",
    "read_outer",
    "read_text",
    "read_uint",
    "require_deterministic",
    "strict_loads",
]

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
HASH_LENGTH: Final = 32
_UINT64_MAX: Final = (1 << 64) - 1
MAX_DEPTH: Final = 8


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


def canonical_dumps(value: object) -> bytes:
    """Deterministic CBOR (definite lengths, shortest ints, sorted map keys)."""
    return cbor.dumps(value)


def malformed(what: str) -> EnvelopeError:
    return EnvelopeError(f"malformed envelope: {what}", reason=ReasonCode.MALFORMED)


def strict_loads(data: bytes, what: str) -> Any:
    """Decode one CBOR item and insist that ``data`` is exactly its deterministic encoding."""
    return require_deterministic(loads(data, what, MAX_DEPTH), data, what)


def loads(data: bytes, what: str | None, max_depth: int) -> Any:
    """One well-formed CBOR item (``what`` None: the outer record, named by no prefix)."""
    try:
        return cbor.decode(data, max_depth=max_depth)
    except cbor.NotWellFormedCBOR as exc:
        prefix = "" if what is None else f"{what} is "
        raise malformed(f"{prefix}not well-formed CBOR") from exc.__cause__


def require_deterministic(value: Any, data: bytes, what: str) -> Any:
    try:
        cbor.require_deterministic(value, data)
    except cbor.UnsupportedCBORItem as exc:
        raise malformed(f"{what} contains unsupported CBOR items") from exc.__cause__
    except cbor.NonDeterministicCBOR:
        raise malformed(f"{what} is not deterministically encoded CBOR") from None
    return value


# Field readers: exact Python types (bool is not an int here, bytearray is not bytes).
def read_text(value: object, what: str, limit: int = MAX_TEXT) -> str:
    if type(value) is not str or not value or len(value) > limit:
        raise malformed(f"{what} must be a non-empty text string of at most {limit} characters")
    return value


def read_bytes(value: object, what: str, *, size: int | None = None, limit: int = 0) -> bytes:
    if type(value) is not bytes:
        raise malformed(f"{what} must be a byte string")
    if size is not None and len(value) != size:
        raise malformed(f"{what} must be {size} bytes")
    if limit and (not value or len(value) > limit):
        raise malformed(f"{what} must be 1..{limit} bytes")
    return value


def read_uint(value: object, what: str, limit: int = _UINT64_MAX) -> int:
    if type(value) is not int or value < 0 or value > limit:
        raise malformed(f"{what} must be an unsigned integer of at most {limit}")
    return value


def read_array(value: object, what: str, length: int | None = None) -> list[Any]:
    # cbor2 decodes arrays inside tags as tuples and maps as frozendicts; both are fine here.
    if not cbor.is_array(value) or not isinstance(value, list | tuple):
        raise malformed(f"{what} must be an array")
    items: list[Any] = list(value)
    if length is not None and len(items) != length:
        raise malformed(f"{what} must have {length} elements")
    return items


is_map = cbor.is_map


def read_outer(data: object, max_size: int, what: str) -> tuple[cbor2.CBORTag, list[Any], int]:
    """Size, CBOR, outer tag, array and format version (read first): the start of every reader
    of both versions (``what``: "envelope" or "record"). Determinism is checked by the caller,
    once it knows the version is its own."""
    if type(data) is not bytes:
        raise malformed(f"{what} must be bytes")
    if len(data) > max_size:
        raise EnvelopeError(
            f"{what} is {len(data)} bytes; the limit is {max_size}", reason=ReasonCode.OVERSIZE
        )
    outer = loads(data, None, MAX_DEPTH)
    if type(outer) is not cbor2.CBORTag or outer.tag != ENVELOPE_TAG:
        raise malformed(f"not a fleetbus {what} (outer tag)")
    body = read_array(outer.value, what)
    if not body:
        raise malformed(f"{what} array is empty")
    return outer, body, read_uint(body[0], "format version")


def read_encrypt0(value: object, position: str) -> tuple[bytes, bytes]:
    """The protected bytes and ciphertext of a tagged COSE_Encrypt0 with an empty unprotected
    header (``position``: which element of the outer array it is, for the message)."""
    if type(value) is not cbor2.CBORTag or value.tag != COSE_ENCRYPT0_TAG:
        raise malformed(f"{position} element must be a tagged COSE_Encrypt0")
    cose = read_array(value.value, "COSE_Encrypt0", 3)
    protected = read_bytes(cose[0], "protected header")
    if not is_map(cose[1]) or cose[1]:
        raise malformed("unprotected header must be an empty map")
    ciphertext = read_bytes(cose[2], "ciphertext")
    if len(ciphertext) < 16:
        raise malformed("ciphertext is shorter than the AES-GCM tag")
    return protected, ciphertext


def enc_structure(protected: bytes) -> bytes:
    """AEAD associated data: COSE ``Enc_structure`` ``["Encrypt0", protected, h'']``."""
    return canonical_dumps(["Encrypt0", protected, b""])


def read_key_refs(value: object) -> tuple[KeyRef, ...]:
    raw_refs = read_array(value, "key refs")
    if not 1 <= len(raw_refs) <= MAX_KEY_REFS:
        raise malformed(f"key refs must have 1..{MAX_KEY_REFS} entries")
    refs = []
    for raw in raw_refs:
        entry = read_array(raw, "key ref", 3)
        refs.append(
            KeyRef(
                provider=read_text(entry[0], "key ref provider"),
                key_id=read_text(entry[1], "key ref key id"),
                key_ref=read_bytes(entry[2], "key ref", limit=MAX_KEY_REF),
            )
        )
    return tuple(refs)


def check_key_path(key_path: str, providers: tuple[str, ...]) -> None:
    """A key path must name its key refs' providers, in order, each once."""
    if key_path != "+".join(providers):
        raise malformed("key path does not name the key refs' providers in order")
    if len(set(providers)) != len(providers):
        raise malformed("a provider appears twice in the key path")


def encode_signature_block(block: SignatureBlock) -> list[Any]:
    if isinstance(block, SingleSignature):
        return [SIG_MODE_SINGLE, block.signature]
    return [
        SIG_MODE_BATCH,
        block.root_signature,
        block.tree_size,
        block.leaf_index,
        list(block.path),
    ]


def decode_signature_block(value: object) -> SignatureBlock:
    block = read_array(value, "signature block")
    if not block or type(block[0]) is not int:
        raise malformed("signature block must start with its mode")
    if block[0] == SIG_MODE_SINGLE:
        read_array(block, "single signature block", 2)
        return SingleSignature(read_bytes(block[1], "signature", limit=MAX_SIGNATURE))
    if block[0] == SIG_MODE_BATCH:
        read_array(block, "batch signature block", 5)
        tree_size = read_uint(block[2], "tree size", MAX_TREE_SIZE)
        leaf_index = read_uint(block[3], "leaf index", MAX_TREE_SIZE)
        if tree_size == 0 or leaf_index >= tree_size:
            raise malformed("leaf index must be below a non-zero tree size")
        path = read_array(block[4], "inclusion path")
        if len(path) > MAX_PATH:
            raise malformed(f"inclusion path is longer than {MAX_PATH}")
        return BatchSignature(
            root_signature=read_bytes(block[1], "root signature", limit=MAX_SIGNATURE),
            tree_size=tree_size,
            leaf_index=leaf_index,
            path=tuple(read_bytes(node, "path node", size=HASH_LENGTH) for node in path),
        )
    raise malformed("unknown signature mode")
