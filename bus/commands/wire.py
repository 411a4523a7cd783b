"""The commands wire format's constants, strict field readers and signed-structure helpers
(shared by every message model; not public API)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from fleetbus.bus import cbor
from fleetbus.bus.errors import FleetbusError, ReasonCode

if TYPE_CHECKING:
    from fleetbus.bus.commands.approval import SignedApproval
    from fleetbus.bus.commands.command import SignedCommand
    from fleetbus.bus.commands.telemetry import SignedTelemetryBatch


#: Domain separator of a command's ToBeSigned.
COMMAND_CONTEXT: Final = "fleetbus-command-v1"
#: Domain separator of an approval's ToBeSigned. v2: the approval binds its command's digest;
#: a v1 approval (command id only) is refused (``unsupported_version``), never upgraded.
APPROVAL_CONTEXT: Final = "fleetbus-approval-v2"
#: Domain separator of a command digest: SHA-256 over ``[this, the command's ToBeSigned]``.
COMMAND_DIGEST_CONTEXT: Final = "fleetbus-command-digest-v1"
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


def _signing_input(context: str, key_id: str, suite: str, body: Mapping[str, Any]) -> bytes:
    """``canonical CBOR([context, key id, suite, body])``: domain, key and suite are bound."""
    return _dumps([context, key_id, suite, dict(body)])


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


_Body = TypeVar("_Body")


def _encode_signed(body: Mapping[str, Any], key_id: str, suite: str, signature: bytes) -> bytes:
    """``[1, body map, key id, suite, signature]`` in canonical CBOR."""
    return _dumps([FORMAT_VERSION, body, key_id, suite, signature])


def _decode_signed(
    data: object,
    what: str,
    max_size: int,
    read_body: Callable[[object], _Body],
    key_what: str,
) -> tuple[_Body, str, str, bytes]:
    """Strict parse of a signed structure: (body, key id, suite, signature); no signature check.
    ``key_what`` names the key id in errors ("issuer key id", "approver key id")."""
    return _read_signed(_strict_loads(data, what, max_size), what, read_body, key_what)


def _read_signed(
    value: object, what: str, read_body: Callable[[object], _Body], key_what: str
) -> tuple[_Body, str, str, bytes]:
    """``_decode_signed`` of a value already decoded by ``_strict_loads``."""
    items = _signed_items(value, what)
    try:
        body = read_body(items[1])
    except FleetbusError as exc:
        if exc.reason is ReasonCode.UNSUPPORTED_VERSION:
            raise
        raise _malformed(str(exc).removeprefix("malformed message: ")) from None
    return (
        body,
        _text(items[2], key_what),
        _text(items[3], "signature suite"),
        _bytes(items[4], "signature", MAX_SIGNATURE),
    )


def _check_signature(
    record_suite: str,
    verify: Callable[[bytes, bytes], bool],
    claimed_suite: str,
    tbs: bytes,
    signed: SignedCommand | SignedApproval | SignedTelemetryBatch,
) -> None:
    if record_suite != claimed_suite or not verify(tbs, signed.signature):
        raise FleetbusError(
            f"{type(signed).__name__}: signature does not verify", reason=ReasonCode.BAD_SIGNATURE
        )
