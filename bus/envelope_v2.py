"""The fleetbus wire format version 2: establishment, message and status records (pure format).

One signed establishment per (sender, recipient, direction, epoch), then small AEAD messages
whose protected header holds only what routing and the recipient's pre-decryption checks need.
No keys and no crypto calls here: ``fleetbus.providers.sealing_v2`` seals and opens. Every byte
is specified in ``docs/wire-format.md``, "version 2". (Past 500 lines on purpose: the three
record types share their readers, and each encoder re-runs its own reader.)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import cbor2

from fleetbus.bus.commands import SignedCommand
from fleetbus.bus.envelope_base import (
    ALG_A256GCM,
    COSE_ENCRYPT0_TAG,
    DEFAULT_MAX_SIZE,
    ENVELOPE_TAG,
    MAX_TEXT,
    MAX_TOPIC,
    EnvelopeError,
    KeyRef,
    MessageKind,
    SignatureBlock,
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
from fleetbus.bus.errors import FleetbusError, ReasonCode

__all__ = [
    "EPOCH_ID_LENGTH_V2",
    "EPOCH_SECRET_INFO",
    "MESSAGE_INFO_V2",
    "V2",
    "Direction",
    "Establishment",
    "Message",
    "MessageHeader",
    "MessagePlaintext",
    "RecordType",
    "Status",
    "StatusCode",
    "decode_plaintext",
    "decode_record",
    "encode_establishment",
    "encode_message",
    "encode_message_header",
    "encode_plaintext",
    "encode_status",
    "epoch_context_v2",
    "establishment_bytes",
    "message_aad",
    "record_version",
    "signed_to_be_signed",
    "status_bytes",
]

V2: Final = 2
EPOCH_ID_LENGTH_V2: Final = 8
#: HKDF ``info`` prefixes (docs/wire-format.md V2.2, V2.3).
EPOCH_SECRET_INFO: Final = b"fleetbus/v2/epoch-secret"
MESSAGE_INFO_V2: Final = b"fleetbus/v2/message"
EPOCH_CONTEXT_V2: Final = "fleetbus/v2/epoch"
#: Sequence numbers are 0 .. max_messages - 1 and fit the 5-byte Partial IV with room to spare.
MAX_EPOCH_MESSAGES: Final = 1 << 32
MAX_PARTIAL_IV: Final = 5

# COSE header labels of the message header (RFC 9052 section 3.1) ...
_ALG: Final = 1
_KID: Final = 4
_PARTIAL_IV: Final = 6
# ... and the v1 private-use labels it reuses.
_KIND: Final = -65538
_RECIPIENT: Final = -65540
_EXPIRES_AT: Final = -65544
_MESSAGE_LABELS: Final = frozenset({_ALG, _KID, _PARTIAL_IV, _KIND, _RECIPIENT, _EXPIRES_AT})

# Establishment and status maps: fleetbus structures with small unsigned labels.
_E_VERSION, _E_TOPIC, _E_SENDER, _E_SENDER_KID, _E_SUITE, _E_RECIPIENT = 1, 2, 3, 4, 5, 6
_E_DIRECTION, _E_EPOCH, _E_PATH, _E_REFS, _E_NOT_BEFORE, _E_NOT_AFTER = 7, 8, 9, 10, 11, 12
_E_MAX_MESSAGES, _E_AEAD = 13, 14
_S_CODE, _S_SEQUENCE, _S_AT = 15, 16, 17
_EST_LABELS: Final = frozenset(range(1, 15))
_STS_LABELS: Final = frozenset({1, 2, 3, 4, 5, 6, _E_EPOCH, _S_CODE, _S_SEQUENCE, _S_AT})


class RecordType(IntEnum):
    """Second element of a v2 record."""

    ESTABLISHMENT = 0
    MESSAGE = 1
    STATUS = 2


class Direction(IntEnum):
    """Which way an epoch's messages flow."""

    DOWNLINK = 0  # bus -> vehicle (commands)
    UPLINK = 1  # vehicle -> bus (responses, telemetry)


class StatusCode(IntEnum):
    """What a status record reports; the code also fixes who may sign it and who reads it, so a
    status of one direction is never taken for one of the other (docs/wire-format.md V2.4)."""

    EPOCH_UNKNOWN = 0  # a vehicle lacks a downlink epoch of the bus (signed by the vehicle)
    UPLINK_EPOCH_UNKNOWN = 1  # the bus lacks an uplink epoch of a vehicle (signed by the bus)


@dataclass(frozen=True)
class Establishment:
    """An epoch: who, to whom, which key path (with its encapsulations), how long, how many."""

    topic: str
    sender: str
    sender_key_id: str
    signature_suite: str
    recipient: str
    direction: Direction
    epoch_id: bytes
    key_path: str
    key_refs: tuple[KeyRef, ...]
    not_before_ms: int
    not_after_ms: int
    max_messages: int

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(ref.provider for ref in self.key_refs)


@dataclass(frozen=True)
class MessageHeader:
    """The clear, authenticated part of a v2 message."""

    epoch_id: bytes
    sequence: int
    kind: MessageKind
    recipient: str
    expires_at_ms: int


@dataclass(frozen=True)
class MessagePlaintext:
    """What the AEAD hides: message id, action, issue time, payload."""

    message_id: str
    action: str
    issued_at_ms: int
    payload: bytes


@dataclass(frozen=True)
class Status:
    """A recipient's signed report that it cannot open a message of ``epoch_id``."""

    topic: str
    sender: str
    sender_key_id: str
    signature_suite: str
    recipient: str
    epoch_id: bytes
    code: StatusCode
    sequence: int
    at_ms: int


@dataclass(frozen=True)
class SignedRecord:
    """A parsed establishment or status: the exact signed bytes and the signature block."""

    body: bytes
    signature: SignatureBlock


@dataclass(frozen=True)
class ParsedEstablishment(SignedRecord):
    establishment: Establishment


@dataclass(frozen=True)
class ParsedStatus(SignedRecord):
    status: Status


@dataclass(frozen=True)
class Message:
    """A parsed message: exact protected bytes (AEAD input), header, ciphertext."""

    protected: bytes
    header: MessageHeader
    ciphertext: bytes


ParsedRecord = ParsedEstablishment | Message | ParsedStatus


def _version_error(version: int) -> EnvelopeError:
    return EnvelopeError(
        f"record format version {version}; this reader reads 1 and 2",
        reason=ReasonCode.UNSUPPORTED_VERSION,
    )


def record_version(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> int:
    """The format version of a record (1 or 2), read before anything else; raises
    ``EnvelopeError`` (OVERSIZE, MALFORMED, UNSUPPORTED_VERSION) otherwise."""
    _, _, version = read_outer(data, max_size, "record")
    if version not in (1, V2):
        raise _version_error(version)
    return version


def decode_record(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> ParsedRecord:
    """Strictly parse a v2 record; a v1 envelope is UNSUPPORTED_VERSION here (callers dispatch
    on ``record_version`` first). Verifies nothing cryptographic."""
    outer, body, version = read_outer(data, max_size, "record")
    if version != V2:
        raise EnvelopeError(
            f"record format version {version}; this parser reads {V2}",
            reason=ReasonCode.UNSUPPORTED_VERSION,
        )
    if len(body) < 2 or type(body[1]) is not int or body[1] not in set(RecordType):
        raise malformed("second element must be the record type 0, 1 or 2")
    require_deterministic(outer, data, "record")
    kind = RecordType(body[1])
    if kind is RecordType.MESSAGE:
        read_array(body, "message", 3)
        return _read_message(body[2])
    read_array(body, "signed record", 4)
    signed = read_bytes(body[2], "signed body")
    block = decode_signature_block(body[3])
    if kind is RecordType.ESTABLISHMENT:
        return ParsedEstablishment(signed, block, _read_establishment(_map(signed, "est")))
    return ParsedStatus(signed, block, _read_status(_map(signed, "status")))


def _map(data: bytes, what: str) -> Any:
    fields = strict_loads(data, what)
    if not is_map(fields):
        raise malformed(f"{what} must be a map")
    version = fields.get(_E_VERSION)
    if type(version) is int and version != V2:
        raise _version_error(version)
    return fields


def _read_direction(value: object) -> Direction:
    if type(value) is not int or value not in set(Direction):
        raise malformed("direction must be 0 or 1")
    return Direction(value)


def _read_establishment(fields: Any) -> Establishment:
    if set(fields) != _EST_LABELS:
        raise malformed("establishment must have exactly the v2 labels 1..14")
    if read_uint(fields[_E_VERSION], "version") != V2:  # pragma: no cover - _map raised already
        raise _version_error(fields[_E_VERSION])
    if type(fields[_E_AEAD]) is not int or fields[_E_AEAD] != ALG_A256GCM:
        raise malformed("aead must be 3 (A256GCM)")
    est = Establishment(
        topic=read_text(fields[_E_TOPIC], "topic", MAX_TOPIC),
        sender=read_text(fields[_E_SENDER], "sender"),
        sender_key_id=read_text(fields[_E_SENDER_KID], "sender key id"),
        signature_suite=read_text(fields[_E_SUITE], "signature suite"),
        recipient=read_text(fields[_E_RECIPIENT], "recipient"),
        direction=_read_direction(fields[_E_DIRECTION]),
        epoch_id=read_bytes(fields[_E_EPOCH], "epoch id", size=EPOCH_ID_LENGTH_V2),
        key_path=read_text(fields[_E_PATH], "key path"),
        key_refs=read_key_refs(fields[_E_REFS]),
        not_before_ms=read_uint(fields[_E_NOT_BEFORE], "not-before"),
        not_after_ms=read_uint(fields[_E_NOT_AFTER], "not-after"),
        max_messages=read_uint(fields[_E_MAX_MESSAGES], "max messages", MAX_EPOCH_MESSAGES),
    )
    if est.not_after_ms <= est.not_before_ms:
        raise malformed("not-after must be after not-before")
    if est.max_messages < 1:
        raise malformed("max messages must be at least 1")
    check_key_path(est.key_path, est.providers)
    return est


def _read_status(fields: Any) -> Status:
    if set(fields) != _STS_LABELS:
        raise malformed("status must have exactly the v2 status labels")
    if read_uint(fields[_E_VERSION], "version") != V2:  # pragma: no cover - _map raised already
        raise _version_error(fields[_E_VERSION])
    code = fields[_S_CODE]
    if type(code) is not int or code not in set(StatusCode):
        raise malformed("unknown status code")
    return Status(
        topic=read_text(fields[_E_TOPIC], "topic", MAX_TOPIC),
        sender=read_text(fields[_E_SENDER], "sender"),
        sender_key_id=read_text(fields[_E_SENDER_KID], "sender key id"),
        signature_suite=read_text(fields[_E_SUITE], "signature suite"),
        recipient=read_text(fields[_E_RECIPIENT], "recipient"),
        epoch_id=read_bytes(fields[_E_EPOCH], "epoch id", size=EPOCH_ID_LENGTH_V2),
        code=StatusCode(code),
        sequence=read_uint(fields[_S_SEQUENCE], "sequence", MAX_EPOCH_MESSAGES - 1),
        at_ms=read_uint(fields[_S_AT], "at"),
    )


def _partial_iv(sequence: int) -> bytes:
    return sequence.to_bytes(max(1, (sequence.bit_length() + 7) // 8), "big")


def _read_message(value: object) -> Message:
    protected, ciphertext = read_encrypt0(value, "third")
    fields = strict_loads(protected, "protected header")
    if not is_map(fields) or set(fields) != _MESSAGE_LABELS:
        raise malformed("protected header must have exactly the v2 message labels")
    return Message(protected, _read_header(fields), ciphertext)


def _read_header(fields: Any) -> MessageHeader:
    if type(fields[_ALG]) is not int or fields[_ALG] != ALG_A256GCM:
        raise malformed("alg must be 3 (A256GCM)")
    piv = read_bytes(fields[_PARTIAL_IV], "partial IV")
    if not 1 <= len(piv) <= MAX_PARTIAL_IV or (len(piv) > 1 and piv[0] == 0):
        raise malformed("partial IV must be the shortest big-endian form, 1..5 bytes")
    try:
        kind = MessageKind(read_text(fields[_KIND], "kind"))
    except ValueError as exc:
        raise malformed("kind must be cmd, rsp or tel") from exc
    return MessageHeader(
        epoch_id=read_bytes(fields[_KID], "kid (epoch id)", size=EPOCH_ID_LENGTH_V2),
        sequence=int.from_bytes(piv, "big"),
        kind=kind,
        recipient=read_text(fields[_RECIPIENT], "recipient"),
        expires_at_ms=read_uint(fields[_EXPIRES_AT], "expires-at"),
    )


def _establishment_map(est: Establishment) -> dict[int, Any]:
    return {
        _E_VERSION: V2,
        _E_TOPIC: est.topic,
        _E_SENDER: est.sender,
        _E_SENDER_KID: est.sender_key_id,
        _E_SUITE: est.signature_suite,
        _E_RECIPIENT: est.recipient,
        _E_DIRECTION: int(est.direction),
        _E_EPOCH: est.epoch_id,
        _E_PATH: est.key_path,
        _E_REFS: [[r.provider, r.key_id, r.key_ref] for r in est.key_refs],
        _E_NOT_BEFORE: est.not_before_ms,
        _E_NOT_AFTER: est.not_after_ms,
        _E_MAX_MESSAGES: est.max_messages,
        _E_AEAD: ALG_A256GCM,
    }


def establishment_bytes(est: Establishment) -> bytes:
    """The signed ``est`` bytes; refuses (MALFORMED) what a recipient would reject."""
    fields = _establishment_map(est)
    _read_establishment(fields)
    return canonical_dumps(fields)


def status_bytes(status: Status) -> bytes:
    """The signed ``sts`` bytes; refuses (MALFORMED) what the bus would reject."""
    fields = {
        _E_VERSION: V2,
        _E_TOPIC: status.topic,
        _E_SENDER: status.sender,
        _E_SENDER_KID: status.sender_key_id,
        _E_SUITE: status.signature_suite,
        _E_RECIPIENT: status.recipient,
        _E_EPOCH: status.epoch_id,
        _S_CODE: int(status.code),
        _S_SEQUENCE: status.sequence,
        _S_AT: status.at_ms,
    }
    _read_status(fields)
    return canonical_dumps(fields)


def signed_to_be_signed(body: bytes) -> bytes:
    """Signature input of an establishment or status: ``["Signature1", body, h'', h'']``."""
    return canonical_dumps(["Signature1", body, b"", b""])


def _record(record_type: RecordType, *items: Any) -> bytes:
    return canonical_dumps(cbor2.CBORTag(ENVELOPE_TAG, [V2, int(record_type), *items]))


def encode_establishment(body: bytes, signature: SignatureBlock) -> bytes:
    return _record(RecordType.ESTABLISHMENT, body, encode_signature_block(signature))


def encode_status(body: bytes, signature: SignatureBlock) -> bytes:
    return _record(RecordType.STATUS, body, encode_signature_block(signature))


def encode_message_header(header: MessageHeader) -> bytes:
    """The protected-header bytes of a message; refuses (MALFORMED) an unreadable header."""
    if not 0 <= header.sequence < MAX_EPOCH_MESSAGES:
        raise malformed("sequence out of range")
    fields = {
        _ALG: ALG_A256GCM,
        _KID: header.epoch_id,
        _PARTIAL_IV: _partial_iv(header.sequence),
        _KIND: str(header.kind),
        _RECIPIENT: header.recipient,
        _EXPIRES_AT: header.expires_at_ms,
    }
    _read_header(fields)
    return canonical_dumps(fields)


def encode_message(protected: bytes, ciphertext: bytes) -> bytes:
    encrypt0 = cbor2.CBORTag(COSE_ENCRYPT0_TAG, [protected, {}, ciphertext])
    return _record(RecordType.MESSAGE, encrypt0)


#: COSE ``Enc_structure`` ``["Encrypt0", protected, h'']``, as in version 1.
message_aad = enc_structure


def encode_plaintext(plain: MessagePlaintext, kind: MessageKind, expires_at_ms: int) -> bytes:
    """The AEAD plaintext: the signed command itself for ``cmd``, else the 4-array (V2.3)."""
    if type(plain.payload) is not bytes:
        raise EnvelopeError("payload must be bytes", reason=ReasonCode.CONFIG)
    if kind is MessageKind.COMMAND:
        # The dispatcher-signed command already carries id, action and times; repeating them
        # cost 62 bytes a command. The sealer must not name a different command than it carries.
        if _command_plaintext(plain.payload, expires_at_ms) != plain:
            raise malformed("message id, action, issue or expiry time differ from the command's")
        return plain.payload
    value = [plain.message_id, plain.action, plain.issued_at_ms, plain.payload]
    _read_plaintext(value)
    return canonical_dumps(value)


def decode_plaintext(data: bytes, header: MessageHeader) -> MessagePlaintext:
    if header.kind is MessageKind.COMMAND:
        return _command_plaintext(data, header.expires_at_ms)
    plain = _read_plaintext(strict_loads(data, "message plaintext"))
    if plain.issued_at_ms > header.expires_at_ms:
        raise malformed("issued-at is after expires-at")
    return plain


def _command_plaintext(data: bytes, expires_at_ms: int) -> MessagePlaintext:
    """Message id, action and issue time of a ``cmd`` message, read from its signed command
    (parsed strictly, its signature left to the recipient, which checks the issuer)."""
    try:
        command = SignedCommand.decode(data, max_size=len(data)).command
    except FleetbusError as exc:
        raise EnvelopeError(f"cmd plaintext: {exc}", reason=exc.reason) from None
    # Binds the clear expiry (used before decryption) to the one the dispatcher signed.
    if round(command.expires_at * 1000) != expires_at_ms:
        raise malformed("expires-at differs from the signed command's expires_at")
    return MessagePlaintext(command.id, command.action, round(command.issued_at * 1000), data)


def _read_plaintext(value: object) -> MessagePlaintext:
    items = read_array(value, "message plaintext", 4)
    action = items[1]
    if type(action) is not str or len(action) > MAX_TEXT:
        raise malformed(f"action must be a text string of at most {MAX_TEXT} characters")
    return MessagePlaintext(
        message_id=read_text(items[0], "message id"),
        action=action,
        issued_at_ms=read_uint(items[2], "issued-at"),
        payload=read_bytes(items[3], "payload"),
    )


def epoch_context_v2(sender: str, recipient: str, direction: Direction, epoch_id: bytes) -> bytes:
    """The key-path ``context`` of a v2 epoch."""
    return canonical_dumps([EPOCH_CONTEXT_V2, sender, recipient, int(direction), epoch_id])
