"""Command-bus message models: signed commands and approvals, responses, status and telemetry.

Every model has a strict canonical-CBOR codec: ``decode`` accepts exactly the bytes ``encode``
would produce (deterministic encoding, exact field set, exact types, bounded sizes) and raises
``FleetbusError`` with reason MALFORMED or OVERSIZE for anything else. Times are float epoch
seconds in Python and integer milliseconds on the wire. The formats are described in
``docs/sdk.md`` ("Message formats").
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

from fleetbus.bus import cbor
from fleetbus.bus.errors import FleetbusError, ReasonCode

if TYPE_CHECKING:
    from fleetbus.bus.directory import KeyDirectory
    from fleetbus.bus.keys import Signer

__all__ = [
    "APPROVAL_CONTEXT",
    "COMMAND_CONTEXT",
    "FINAL_STATES",
    "MAX_MESSAGE_SIZE",
    "Approval",
    "Command",
    "CommandState",
    "Decision",
    "ParamValue",
    "Response",
    "SignedApproval",
    "SignedCommand",
    "StatusEvent",
    "Target",
    "Telemetry",
    "TelemetryBatch",
    "UUIDv7Generator",
    "new_command_id",
    "uuid7_timestamp_ms",
]

#: Domain separator of a command's ToBeSigned.
COMMAND_CONTEXT: Final = "fleetbus-command-v1"
#: Domain separator of an approval's ToBeSigned.
APPROVAL_CONTEXT: Final = "fleetbus-approval-v1"
#: Wire format version, first element of every signed structure.
FORMAT_VERSION: Final = 1
#: Default upper bound of one encoded message (a composite signature alone is 3,373 bytes).
MAX_MESSAGE_SIZE: Final = 32 * 1024

MAX_TEXT: Final = 256  # ids, names, principal ids
MAX_DETAIL: Final = 1024
MAX_PARAMS: Final = 64
MAX_PARAM_NAME: Final = 64
MAX_PARAM_TEXT: Final = 4096
MAX_SIGNATURE: Final = 16384
_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
_MAX_MS: Final = (1 << 48) - 1  # the UUIDv7 range: beyond the year 10889
_MAX_DEPTH: Final = 6
_ACTION_RE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_UUID_RE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")

#: A command parameter value: CBOR text, integer (int64), float (finite) or boolean.
ParamValue = str | int | float | bool


# --- UUIDv7 (RFC 9562 section 5.7) ---------------------------------------------------------


class UUIDv7Generator:
    """Monotonic UUIDv7 ids: 48-bit Unix milliseconds, version 7, variant 10, 74 random bits.

    Within one millisecond (or when the clock steps back) the 74-bit random field is
    incremented by a random amount instead of redrawn (RFC 9562 section 6.2, method 2), so ids
    from one generator sort in creation order. Thread-safe.
    """

    _RANDOM_BITS: Final = 74

    def __init__(
        self,
        *,
        clock_ms: Callable[[], int] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._random_bytes = random_bytes
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def _random(self, bits: int) -> int:
        return int.from_bytes(self._random_bytes((bits + 7) // 8), "big") & ((1 << bits) - 1)

    def new(self) -> str:
        with self._lock:
            now = self._clock_ms()
            if now > self._last_ms:
                ms, rand = now, self._random(self._RANDOM_BITS)
            else:
                # Same or earlier millisecond: stay on the last timestamp and step forward.
                ms, rand = self._last_ms, self._last_random + 1 + self._random(32)
                if rand >> self._RANDOM_BITS:
                    ms, rand = ms + 1, self._random(self._RANDOM_BITS)
            if ms >> 48:
                raise FleetbusError("clock beyond the UUIDv7 range", reason=ReasonCode.CONFIG)
            self._last_ms, self._last_random = ms, rand
        rand_a = rand >> 62
        rand_b = rand & ((1 << 62) - 1)
        value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
        text = f"{value:032x}"
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_DEFAULT_GENERATOR = UUIDv7Generator()


def new_command_id() -> str:
    """A fresh UUIDv7 in canonical lowercase text form."""
    return _DEFAULT_GENERATOR.new()


def uuid7_timestamp_ms(value: str) -> int:
    """The Unix millisecond timestamp embedded in a UUIDv7 text id."""
    if not _UUID_RE.fullmatch(value):
        raise FleetbusError("not a canonical UUIDv7", reason=ReasonCode.MALFORMED)
    return int(value.replace("-", "")[:12], 16)


# --- strict field readers ------------------------------------------------------------------


def _malformed(what: str) -> FleetbusError:
    return FleetbusError(f"malformed message: {what}", reason=ReasonCode.MALFORMED)


def _dumps(value: object) -> bytes:
    return cbor.dumps(value)


def _strict_loads(data: object, what: str, max_size: int) -> Any:
    if type(data) is not bytes:
        raise _malformed(f"{what} must be bytes")
    if len(data) > max_size:
        raise FleetbusError(
            f"{what} is {len(data)} bytes; the limit is {max_size}", reason=ReasonCode.OVERSIZE
        )
    try:
        return cbor.decode_deterministic(data, max_depth=_MAX_DEPTH)
    except cbor.NotWellFormedCBOR as exc:
        raise _malformed(f"{what} is not well-formed CBOR") from exc.__cause__
    except cbor.UnsupportedCBORItem as exc:
        raise _malformed(f"{what} contains unsupported CBOR items") from exc.__cause__
    except cbor.NonDeterministicCBOR:
        raise _malformed(f"{what} is not deterministically encoded CBOR") from None


def _map(value: object, what: str, keys: frozenset[str]) -> Mapping[str, Any]:
    if not cbor.is_map(value):
        raise _malformed(f"{what} must be a map")
    assert isinstance(value, Mapping)
    if set(value) != keys:
        raise _malformed(f"{what} must have exactly the fields {', '.join(sorted(keys))}")
    return value


def _array(value: object, what: str, length: int) -> list[Any]:
    if not cbor.is_array(value):
        raise _malformed(f"{what} must be an array")
    assert isinstance(value, list | tuple)
    if len(value) != length:
        raise _malformed(f"{what} must have {length} elements")
    return list(value)


def _text(value: object, what: str, limit: int = MAX_TEXT, *, empty: bool = False) -> str:
    if type(value) is not str or len(value) > limit or (not value and not empty):
        raise _malformed(f"{what} must be a text string of at most {limit} characters")
    return value


def _opt_text(value: object, what: str) -> str | None:
    return None if value is None else _text(value, what)


def _int(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _malformed(f"{what} must be an integer in {low}..{high}")
    return value


def _bytes(value: object, what: str, limit: int) -> bytes:
    if type(value) is not bytes or not value or len(value) > limit:
        raise _malformed(f"{what} must be a byte string of 1..{limit} bytes")
    return value


def _ms(value: object, what: str) -> float:
    return _int(value, what, 0, _MAX_MS) / 1000


def _to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def _check_time(value: object, what: str) -> float:
    """Validate a model time and round it to the millisecond it travels as."""
    if type(value) not in (int, float):
        raise FleetbusError(f"{what} must be an epoch time in seconds", reason=ReasonCode.MALFORMED)
    assert isinstance(value, int | float)
    if not math.isfinite(value) or not 0 <= round(value * 1000) <= _MAX_MS:
        raise FleetbusError(
            f"{what} must be a finite, non-negative epoch time", reason=ReasonCode.MALFORMED
        )
    return round(value * 1000) / 1000


def _check_params(params: object, what: str) -> dict[str, ParamValue]:
    if not cbor.is_map(params):
        raise _malformed(f"{what} must be a map")
    assert isinstance(params, Mapping)
    if len(params) > MAX_PARAMS:
        raise _malformed(f"{what} has more than {MAX_PARAMS} entries")
    out: dict[str, ParamValue] = {}
    for name, value in params.items():
        _text(name, f"{what} name", MAX_PARAM_NAME)
        kind = type(value)
        if kind is bool:
            pass
        elif kind is int:
            _int(value, f"{what} {name!r}", _INT64_MIN, _INT64_MAX)
        elif kind is float:
            if not math.isfinite(value):
                raise _malformed(f"{what} {name!r} must be a finite number")
        elif kind is str:
            _text(value, f"{what} {name!r}", MAX_PARAM_TEXT, empty=True)
        else:
            raise _malformed(f"{what} {name!r} must be text, integer, number or boolean")
        out[name] = value
    return out


def _check_model_text(value: object, what: str, limit: int = MAX_TEXT) -> None:
    if type(value) is not str or not value or len(value) > limit:
        raise FleetbusError(
            f"{what} must be a non-empty text string of at most {limit} chars",
            reason=ReasonCode.MALFORMED,
        )


# --- target --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a command goes: exactly one of a vehicle (or edge unit) id or a group name."""

    vehicle: str | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if (self.vehicle is None) == (self.group is None):
            raise FleetbusError(
                "a target names exactly one of vehicle or group", reason=ReasonCode.MALFORMED
            )
        _check_model_text(self.vehicle or self.group, "target")

    def to_wire(self) -> dict[str, str]:
        return {"vehicle": self.vehicle} if self.vehicle is not None else {"group": str(self.group)}

    @classmethod
    def from_wire(cls, value: object) -> Target:
        if not cbor.is_map(value):
            raise _malformed("target must be a map")
        assert isinstance(value, Mapping)
        if set(value) == {"vehicle"}:
            return cls(vehicle=_text(value["vehicle"], "target vehicle"))
        if set(value) == {"group"}:
            return cls(group=_text(value["group"], "target group"))
        raise _malformed("target must be {vehicle: id} or {group: name}")

    def __str__(self) -> str:
        return f"vehicle {self.vehicle}" if self.vehicle is not None else f"group {self.group}"


# --- commands ------------------------------------------------------------------------------

_COMMAND_FIELDS: Final = frozenset(
    {
        "id",
        "issuer",
        "target",
        "action",
        "params",
        "issued_at",
        "expires_at",
        "priority",
        "correlation_id",
        "idempotency_key",
    }
)


@dataclass(frozen=True)
class Command:
    """What a dispatcher asks for. Build one with ``Command.create`` (id and times filled in).

    Criticality is not a field: the bus's policy derives it from the action.
    """

    id: str
    issuer: str
    target: Target
    action: str
    params: Mapping[str, ParamValue]
    issued_at: float
    expires_at: float
    priority: int = 0
    correlation_id: str | None = None
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _UUID_RE.fullmatch(self.id):
            raise FleetbusError(
                "command id must be a canonical lowercase UUIDv7", reason=ReasonCode.MALFORMED
            )
        _check_model_text(self.issuer, "issuer")
        if not isinstance(self.target, Target):
            raise FleetbusError("target must be a Target", reason=ReasonCode.MALFORMED)
        if not isinstance(self.action, str) or not _ACTION_RE.fullmatch(self.action):
            raise FleetbusError(
                "action must be 1..64 characters of a-z, 0-9, '_', '.', '-', "
                "starting with a letter",
                reason=ReasonCode.MALFORMED,
            )
        try:
            object.__setattr__(self, "params", _check_params(dict(self.params), "params"))
        except FleetbusError as exc:
            raise FleetbusError(str(exc), reason=exc.reason) from None
        object.__setattr__(self, "issued_at", _check_time(self.issued_at, "issued_at"))
        object.__setattr__(self, "expires_at", _check_time(self.expires_at, "expires_at"))
        if self.expires_at < self.issued_at:
            raise FleetbusError("expires_at is before issued_at", reason=ReasonCode.MALFORMED)
        if type(self.priority) is not int or not -1000 <= self.priority <= 1000:
            raise FleetbusError(
                "priority must be an integer in -1000..1000", reason=ReasonCode.MALFORMED
            )
        for name in ("correlation_id", "idempotency_key"):
            value = getattr(self, name)
            if value is not None:
                _check_model_text(value, name)

    @classmethod
    def create(
        cls,
        *,
        issuer: str,
        target: Target,
        action: str,
        params: Mapping[str, ParamValue] | None = None,
        ttl_s: float = 60.0,
        priority: int = 0,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        now: float | None = None,
        command_id: str | None = None,
    ) -> Command:
        """A new command with a fresh UUIDv7 id, issued now and expiring ``ttl_s`` later."""
        if not math.isfinite(ttl_s) or ttl_s <= 0:
            raise FleetbusError(
                "ttl_s must be a positive number of seconds", reason=ReasonCode.MALFORMED
            )
        issued = time.time() if now is None else now
        return cls(
            id=command_id or new_command_id(),
            issuer=issuer,
            target=target,
            action=action,
            params=dict(params or {}),
            issued_at=issued,
            expires_at=issued + ttl_s,
            priority=priority,
            correlation_id=correlation_id,
            idempotency_key=idempotency_key,
        )

    def is_expired(self, at: float) -> bool:
        return at >= self.expires_at

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "issuer": self.issuer,
            "target": self.target.to_wire(),
            "action": self.action,
            "params": dict(self.params),
            "issued_at": _to_ms(self.issued_at),
            "expires_at": _to_ms(self.expires_at),
            "priority": self.priority,
            "correlation_id": self.correlation_id,
            "idempotency_key": self.idempotency_key,
        }

    @classmethod
    def from_wire(cls, value: object) -> Command:
        m = _map(value, "command", _COMMAND_FIELDS)
        command_id = _text(m["id"], "command id", 36)
        if not _UUID_RE.fullmatch(command_id):
            raise _malformed("command id must be a canonical lowercase UUIDv7")
        action = _text(m["action"], "action", 64)
        if not _ACTION_RE.fullmatch(action):
            raise _malformed("action has characters outside a-z, 0-9, '_', '.', '-'")
        issued_at = _ms(m["issued_at"], "issued_at")
        expires_at = _ms(m["expires_at"], "expires_at")
        if expires_at < issued_at:
            raise _malformed("expires_at is before issued_at")
        return cls(
            id=command_id,
            issuer=_text(m["issuer"], "issuer"),
            target=Target.from_wire(m["target"]),
            action=action,
            params=_check_params(m["params"], "params"),
            issued_at=issued_at,
            expires_at=expires_at,
            priority=_int(m["priority"], "priority", -1000, 1000),
            correlation_id=_opt_text(m["correlation_id"], "correlation id"),
            idempotency_key=_opt_text(m["idempotency_key"], "idempotency key"),
        )


def _signing_input(context: str, key_id: str, suite: str, body: Mapping[str, Any]) -> bytes:
    """``canonical CBOR([context, key id, suite, body])``: domain, key and suite are bound."""
    return _dumps([context, key_id, suite, dict(body)])


@dataclass(frozen=True)
class SignedCommand:
    """A command with its issuer's signature.

    Wire: ``[1, body map, issuer key id, suite, signature]`` in canonical CBOR; the signature is
    over ``["fleetbus-command-v1", key id, suite, body map]``.
    """

    command: Command
    key_id: str
    suite: str
    signature: bytes = field(repr=False)

    @classmethod
    def sign(cls, command: Command, signer: Signer) -> SignedCommand:
        body = command.to_wire()
        tbs = _signing_input(COMMAND_CONTEXT, signer.key_id, signer.suite, body)
        return cls(command, signer.key_id, signer.suite, signer.sign(tbs))

    def to_be_signed(self) -> bytes:
        return _signing_input(COMMAND_CONTEXT, self.key_id, self.suite, self.command.to_wire())

    def encode(self) -> bytes:
        return _dumps(
            [FORMAT_VERSION, self.command.to_wire(), self.key_id, self.suite, self.signature]
        )

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> SignedCommand:
        """Strict parse (no signature check): MALFORMED, OVERSIZE or UNSUPPORTED_VERSION."""
        value = _strict_loads(data, "signed command", max_size)
        items = _signed_items(value, "signed command")
        try:
            command = Command.from_wire(items[1])
        except FleetbusError as exc:
            raise _malformed(str(exc).removeprefix("malformed message: ")) from None
        return cls(
            command=command,
            key_id=_text(items[2], "issuer key id"),
            suite=_text(items[3], "signature suite"),
            signature=_bytes(items[4], "signature", MAX_SIGNATURE),
        )

    def verify(self, directory: KeyDirectory, *, at: float) -> Command:
        """The command, if its issuer's key ``key_id`` is valid at ``at`` and signed it.

        Raises ``FleetbusError``: UNKNOWN_SIGNER / SIGNER_REVOKED / SIGNER_EXPIRED /
        NOT_YET_VALID from the directory, BAD_SIGNATURE when the signature does not verify.
        """
        verifier = directory.verifier_for(self.command.issuer, self.key_id, at=at)
        _check_signature(verifier.suite, verifier.verify, self.suite, self.to_be_signed(), self)
        return self.command


def _signed_items(value: object, what: str) -> list[Any]:
    if not cbor.is_array(value):
        raise _malformed(f"{what} must be an array")
    assert isinstance(value, list | tuple)
    if value and type(value[0]) is int and value[0] != FORMAT_VERSION:
        raise FleetbusError(
            f"{what} has format version {value[0]}; this build reads {FORMAT_VERSION}",
            reason=ReasonCode.UNSUPPORTED_VERSION,
        )
    items = _array(value, what, 5)
    _int(items[0], f"{what} version", FORMAT_VERSION, FORMAT_VERSION)
    return items


def _check_signature(
    record_suite: str,
    verify: Callable[[bytes, bytes], bool],
    claimed_suite: str,
    tbs: bytes,
    signed: SignedCommand | SignedApproval,
) -> None:
    if record_suite != claimed_suite or not verify(tbs, signed.signature):
        raise FleetbusError(
            f"{type(signed).__name__}: signature does not verify", reason=ReasonCode.BAD_SIGNATURE
        )


# --- approvals -----------------------------------------------------------------------------


class Decision(StrEnum):
    APPROVE = "approve"
    DENY = "deny"


_APPROVAL_FIELDS: Final = frozenset({"command_id", "approver", "decision", "issued_at"})


@dataclass(frozen=True)
class Approval:
    """A second principal's decision about exactly one command id."""

    command_id: str
    approver: str
    decision: Decision
    issued_at: float

    def __post_init__(self) -> None:
        if not isinstance(self.command_id, str) or not _UUID_RE.fullmatch(self.command_id):
            raise FleetbusError(
                "approval command id must be a canonical lowercase UUIDv7",
                reason=ReasonCode.MALFORMED,
            )
        _check_model_text(self.approver, "approver")
        try:
            object.__setattr__(self, "decision", Decision(self.decision))
        except ValueError:
            raise FleetbusError(
                "decision must be 'approve' or 'deny'", reason=ReasonCode.MALFORMED
            ) from None
        object.__setattr__(self, "issued_at", _check_time(self.issued_at, "issued_at"))

    def approves(self, command_id: str) -> bool:
        """True only for an "approve" decision naming exactly ``command_id``."""
        return self.decision is Decision.APPROVE and self.command_id == command_id

    def to_wire(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "approver": self.approver,
            "decision": str(self.decision),
            "issued_at": _to_ms(self.issued_at),
        }

    @classmethod
    def from_wire(cls, value: object) -> Approval:
        m = _map(value, "approval", _APPROVAL_FIELDS)
        command_id = _text(m["command_id"], "approval command id", 36)
        if not _UUID_RE.fullmatch(command_id):
            raise _malformed("approval command id must be a canonical lowercase UUIDv7")
        decision = _text(m["decision"], "decision")
        if decision not in {"approve", "deny"}:
            raise _malformed("decision must be 'approve' or 'deny'")
        return cls(
            command_id=command_id,
            approver=_text(m["approver"], "approver"),
            decision=Decision(decision),
            issued_at=_ms(m["issued_at"], "issued_at"),
        )


@dataclass(frozen=True)
class SignedApproval:
    """An approval with its approver's signature; wire and signing input like
    ``SignedCommand`` with the domain ``"fleetbus-approval-v1"``."""

    approval: Approval
    key_id: str
    suite: str
    signature: bytes = field(repr=False)

    @classmethod
    def sign(cls, approval: Approval, signer: Signer) -> SignedApproval:
        tbs = _signing_input(APPROVAL_CONTEXT, signer.key_id, signer.suite, approval.to_wire())
        return cls(approval, signer.key_id, signer.suite, signer.sign(tbs))

    def to_be_signed(self) -> bytes:
        return _signing_input(APPROVAL_CONTEXT, self.key_id, self.suite, self.approval.to_wire())

    def encode(self) -> bytes:
        return _dumps(
            [FORMAT_VERSION, self.approval.to_wire(), self.key_id, self.suite, self.signature]
        )

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> SignedApproval:
        value = _strict_loads(data, "signed approval", max_size)
        items = _signed_items(value, "signed approval")
        try:
            approval = Approval.from_wire(items[1])
        except FleetbusError as exc:
            raise _malformed(str(exc).removeprefix("malformed message: ")) from None
        return cls(
            approval=approval,
            key_id=_text(items[2], "approver key id"),
            suite=_text(items[3], "signature suite"),
            signature=_bytes(items[4], "signature", MAX_SIGNATURE),
        )

    def verify(self, directory: KeyDirectory, *, at: float) -> Approval:
        """The approval, if the approver's key is valid at ``at`` and signed it."""
        verifier = directory.verifier_for(self.approval.approver, self.key_id, at=at)
        _check_signature(verifier.suite, verifier.verify, self.suite, self.to_be_signed(), self)
        return self.approval


# --- responses, status, telemetry ----------------------------------------------------------

_RESPONSE_FIELDS: Final = frozenset(
    {"command_id", "correlation_id", "vehicle_id", "status", "detail", "executed_at"}
)


@dataclass(frozen=True)
class Response:
    """A vehicle's answer to one command; ``status`` uses HTTP-like codes as Eclipse Hono does
    (2xx done, 4xx the command was refused, 5xx the vehicle failed). Carried as the payload of
    an envelope of kind ``rsp`` from the vehicle to the bus sealer; Kafka key: command id."""

    command_id: str
    vehicle_id: str
    status: int
    detail: str = ""
    correlation_id: str | None = None
    executed_at: float = 0.0

    def __post_init__(self) -> None:
        _check_model_text(self.command_id, "command id")
        _check_model_text(self.vehicle_id, "vehicle id")
        if type(self.status) is not int or not 100 <= self.status <= 599:
            raise FleetbusError(
                "status must be an HTTP-like code in 100..599", reason=ReasonCode.MALFORMED
            )
        if not isinstance(self.detail, str) or len(self.detail) > MAX_DETAIL:
            raise FleetbusError(
                f"detail must be text of at most {MAX_DETAIL} characters",
                reason=ReasonCode.MALFORMED,
            )
        if self.correlation_id is not None:
            _check_model_text(self.correlation_id, "correlation id")
        object.__setattr__(self, "executed_at", _check_time(self.executed_at, "executed_at"))

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status < 300

    def encode(self) -> bytes:
        return _dumps(
            {
                "command_id": self.command_id,
                "correlation_id": self.correlation_id,
                "vehicle_id": self.vehicle_id,
                "status": self.status,
                "detail": self.detail,
                "executed_at": _to_ms(self.executed_at),
            }
        )

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Response:
        m = _map(_strict_loads(data, "response", max_size), "response", _RESPONSE_FIELDS)
        return cls(
            command_id=_text(m["command_id"], "command id"),
            correlation_id=_opt_text(m["correlation_id"], "correlation id"),
            vehicle_id=_text(m["vehicle_id"], "vehicle id"),
            status=_int(m["status"], "status", 100, 599),
            detail=_text(m["detail"], "detail", MAX_DETAIL, empty=True),
            executed_at=_ms(m["executed_at"], "executed_at"),
        )


class CommandState(StrEnum):
    """Lifecycle states of a command on ``commands.status``."""

    REQUESTED = "requested"
    PENDING = "pending"  # waiting for M-of-N approvals
    AUTHORIZED = "authorized"
    REJECTED = "rejected"
    SEALED = "sealed"
    DELIVERED = "delivered"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"


#: States after which nothing more happens to a command (for one vehicle).
FINAL_STATES: Final = frozenset(
    {CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED, CommandState.EXPIRED}
)

_STATUS_FIELDS: Final = frozenset({"command_id", "state", "at", "detail", "reason", "vehicle_id"})


@dataclass(frozen=True)
class StatusEvent:
    """One lifecycle step of a command (canonical CBOR map on ``commands.status``, key: command
    id). ``vehicle_id`` is set once a group command has been expanded to vehicles."""

    command_id: str
    state: CommandState
    at: float
    detail: str = ""
    reason: ReasonCode | None = None
    vehicle_id: str | None = None

    def __post_init__(self) -> None:
        _check_model_text(self.command_id, "command id")
        try:
            object.__setattr__(self, "state", CommandState(self.state))
            if self.reason is not None:
                object.__setattr__(self, "reason", ReasonCode(self.reason))
        except ValueError:
            raise FleetbusError(
                "unknown state or reason code", reason=ReasonCode.MALFORMED
            ) from None
        object.__setattr__(self, "at", _check_time(self.at, "at"))
        if not isinstance(self.detail, str) or len(self.detail) > MAX_DETAIL:
            raise FleetbusError(
                f"detail must be text of at most {MAX_DETAIL} characters",
                reason=ReasonCode.MALFORMED,
            )
        if self.vehicle_id is not None:
            _check_model_text(self.vehicle_id, "vehicle id")

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def encode(self) -> bytes:
        return _dumps(
            {
                "command_id": self.command_id,
                "state": str(self.state),
                "at": _to_ms(self.at),
                "detail": self.detail,
                "reason": None if self.reason is None else str(self.reason),
                "vehicle_id": self.vehicle_id,
            }
        )

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> StatusEvent:
        m = _map(_strict_loads(data, "status event", max_size), "status event", _STATUS_FIELDS)
        state = _text(m["state"], "state")
        reason = _opt_text(m["reason"], "reason")
        try:
            state_value = CommandState(state)
            reason_value = None if reason is None else ReasonCode(reason)
        except ValueError:
            raise _malformed("unknown state or reason code") from None
        return cls(
            command_id=_text(m["command_id"], "command id"),
            state=state_value,
            at=_ms(m["at"], "at"),
            detail=_text(m["detail"], "detail", MAX_DETAIL, empty=True),
            reason=reason_value,
            vehicle_id=_opt_text(m["vehicle_id"], "vehicle id"),
        )


_TELEMETRY_FIELDS: Final = frozenset({"vehicle_id", "at", "fields"})


@dataclass(frozen=True)
class Telemetry:
    """Vehicle measurements; the payload of an envelope of kind ``tel`` (key: vehicle id)."""

    vehicle_id: str
    at: float
    fields: Mapping[str, ParamValue]

    def __post_init__(self) -> None:
        _check_model_text(self.vehicle_id, "vehicle id")
        object.__setattr__(self, "at", _check_time(self.at, "at"))
        try:
            object.__setattr__(self, "fields", _check_params(dict(self.fields), "fields"))
        except FleetbusError as exc:
            raise FleetbusError(str(exc), reason=exc.reason) from None

    def encode(self) -> bytes:
        return _dumps(
            {"vehicle_id": self.vehicle_id, "at": _to_ms(self.at), "fields": dict(self.fields)}
        )

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Telemetry:
        m = _map(_strict_loads(data, "telemetry", max_size), "telemetry", _TELEMETRY_FIELDS)
        return cls(
            vehicle_id=_text(m["vehicle_id"], "vehicle id"),
            at=_ms(m["at"], "at"),
            fields=_check_params(m["fields"], "fields"),
        )


#: Readings one telemetry batch may carry (docs/sdk.md, "Telemetry batching").
MAX_BATCH_READINGS: Final = 1000
_BATCH_FIELDS: Final = frozenset({"vehicle_id", "readings"})


@dataclass(frozen=True)
class TelemetryBatch:
    """Readings of one vehicle, sealed together as one wire-v2 message of kind ``tel``.

    Canonical CBOR ``{"vehicle_id": id, "readings": [[at ms, fields], ...]}``: the vehicle is
    named once per batch, which is most of what batching saves besides the envelope.
    """

    vehicle_id: str
    readings: tuple[tuple[float, Mapping[str, ParamValue]], ...]

    def __post_init__(self) -> None:
        _check_model_text(self.vehicle_id, "vehicle id")
        if not 1 <= len(self.readings) <= MAX_BATCH_READINGS:
            raise _malformed(f"a telemetry batch holds 1..{MAX_BATCH_READINGS} readings")
        checked = []
        for at, fields in self.readings:
            try:
                checked.append((_check_time(at, "at"), _check_params(dict(fields), "fields")))
            except (TypeError, ValueError) as exc:
                raise _malformed("a reading must be (time, fields)") from exc
        object.__setattr__(self, "readings", tuple(checked))

    def encode(self) -> bytes:
        return _dumps(
            {
                "vehicle_id": self.vehicle_id,
                "readings": [[_to_ms(at), dict(fields)] for at, fields in self.readings],
            }
        )

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> TelemetryBatch:
        m = _map(_strict_loads(data, "telemetry batch", max_size), "telemetry batch", _BATCH_FIELDS)
        raw = m["readings"]
        if type(raw) not in (list, tuple):
            raise _malformed("readings must be an array")
        readings = []
        for item in raw:
            at, fields = _array(item, "reading", 2)
            readings.append((_ms(at, "at"), _check_params(fields, "fields")))
        return cls(vehicle_id=_text(m["vehicle_id"], "vehicle id"), readings=tuple(readings))

    def telemetry(self) -> list[Telemetry]:
        """One ``Telemetry`` per reading (what the telemetry stage exports)."""
        return [Telemetry(self.vehicle_id, at, fields) for at, fields in self.readings]
