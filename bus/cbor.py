"""Strict CBOR, the one reader every fleetbus wire format uses (RFC 8949 section 4.2.1).

``decode`` accepts well-formed CBOR only (definite lengths, no duplicate map keys, strict UTF-8,
bounded nesting); ``require_deterministic`` insists that the bytes are exactly the deterministic
encoding of what they decoded to (so no trailing bytes, long-form integers or unsorted keys).
Failures are ``StrictCBORError`` subclasses; each wire format wraps them in its own message and
reason code, which is why they carry no text a reader sees.
"""

from __future__ import annotations

from typing import Any, Final

import cbor2

from fleetbus.bus.errors import FleetbusError, ReasonCode

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "NonDeterministicCBOR",
    "NotWellFormedCBOR",
    "StrictCBORError",
    "UnsupportedCBORItem",
    "decode",
    "decode_deterministic",
    "dumps",
    "is_array",
    "is_map",
    "require_deterministic",
]

#: Nesting bound when a format names none (cbor2's own default is far deeper).
DEFAULT_MAX_DEPTH: Final = 8


class StrictCBORError(FleetbusError):
    """Bytes are not the strict CBOR a fleetbus format reads (reason MALFORMED)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=ReasonCode.MALFORMED)


class NotWellFormedCBOR(StrictCBORError):
    """Not one well-formed, definite-length CBOR item without duplicate keys."""


class UnsupportedCBORItem(StrictCBORError):
    """Decoded, but holds an item cbor2 cannot encode again (so never one of ours)."""


class NonDeterministicCBOR(StrictCBORError):
    """Decoded, but the bytes are not its deterministic encoding."""


def dumps(value: object) -> bytes:
    """Deterministic CBOR (definite lengths, shortest ints and floats, sorted map keys)."""
    return cbor2.dumps(value, canonical=True)


def decode(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """One well-formed CBOR item; raises ``NotWellFormedCBOR`` (its ``__cause__`` is cbor2's)."""
    try:
        return cbor2.loads(
            data,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            max_depth=max_depth,
            str_errors="strict",
        )
    except Exception as exc:  # cbor2 raises CBORDecodeError, ValueError, RecursionError, ...
        raise NotWellFormedCBOR(f"not well-formed CBOR ({type(exc).__name__})") from exc


def require_deterministic(value: object, data: bytes) -> None:
    """Raise unless ``data`` is exactly the deterministic encoding of ``value``."""
    try:
        again = dumps(value)
    except Exception as exc:  # a decoded value cbor2 cannot re-encode is not ours either
        raise UnsupportedCBORItem("contains unsupported CBOR items") from exc
    if again != data:  # duplicate keys, long-form ints, indefinite lengths, trailing bytes ...
        raise NonDeterministicCBOR("not deterministically encoded CBOR")


def decode_deterministic(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """``decode`` then ``require_deterministic``: the bytes a strict reader accepts."""
    value = decode(data, max_depth=max_depth)
    require_deterministic(value, data)
    return value


def is_map(value: object) -> bool:
    """A decoded CBOR map (cbor2 decodes maps inside tags and map keys as frozendicts)."""
    return type(value) in (dict, cbor2.frozendict)


def is_array(value: object) -> bool:
    """A decoded CBOR array (cbor2 decodes arrays inside tags as tuples)."""
    return type(value) in (list, tuple)
