"""Vehicle telemetry: one reading, and a batch of readings (wire v2 uplink)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from fleetbus.bus import cbor
from fleetbus.bus.commands.wire import (
    MAX_MESSAGE_SIZE,
    ParamValue,
    _array,
    _check_model_text,
    _check_params,
    _check_signature,
    _check_time,
    _dumps,
    _encode_signed,
    _malformed,
    _map,
    _ms,
    _read_signed,
    _signing_input,
    _strict_loads,
    _text,
    _to_ms,
)
from fleetbus.bus.errors import FleetbusError

if TYPE_CHECKING:
    from fleetbus.bus.keys import Signer, Verifier


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
        return _dumps(self.to_wire())

    def to_wire(self) -> dict[str, Any]:
        return {
            "vehicle_id": self.vehicle_id,
            "readings": [[_to_ms(at), dict(fields)] for at, fields in self.readings],
        }

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> TelemetryBatch:
        return cls.from_wire(_strict_loads(data, "telemetry batch", max_size))

    @classmethod
    def from_wire(cls, value: object) -> TelemetryBatch:
        m = _map(value, "telemetry batch", _BATCH_FIELDS)
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


#: Domain separator of a telemetry batch's ToBeSigned (docs/wire-format.md, "V2.3.1").
TELEMETRY_BATCH_CONTEXT: Final = "fleetbus-telemetry-batch-v1"
#: A vehicle whose directory record carries this capability must sign every telemetry batch:
#: the telemetry stage refuses its unsigned telemetry (docs/sdk.md, "Signed telemetry").
SIGNED_TELEMETRY_CAPABILITY: Final = "signed-telemetry"


@dataclass(frozen=True)
class SignedTelemetryBatch:
    """A ``TelemetryBatch`` signed by its vehicle's own directory key (non-repudiation).

    ``[1, batch map, key id, suite, signature]``, the shape of a signed command, over
    ``canonical CBOR([TELEMETRY_BATCH_CONTEXT, key id, suite, batch map])``. It travels as the
    payload of the v2 message (encrypted); its bytes (``encode``) are what the audit trail keeps
    for a third party to verify with the vehicle's public key alone.
    """

    batch: TelemetryBatch
    key_id: str
    suite: str
    signature: bytes

    @classmethod
    def sign(cls, batch: TelemetryBatch, signer: Signer) -> SignedTelemetryBatch:
        tbs = _signing_input(TELEMETRY_BATCH_CONTEXT, signer.key_id, signer.suite, batch.to_wire())
        return cls(batch, signer.key_id, signer.suite, signer.sign(tbs))

    def to_be_signed(self) -> bytes:
        return _signing_input(
            TELEMETRY_BATCH_CONTEXT, self.key_id, self.suite, self.batch.to_wire()
        )

    def encode(self) -> bytes:
        return _encode_signed(self.batch.to_wire(), self.key_id, self.suite, self.signature)

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> SignedTelemetryBatch:
        return cls.from_wire(_strict_loads(data, "signed telemetry batch", max_size))

    @classmethod
    def from_wire(cls, value: object) -> SignedTelemetryBatch:
        """``decode`` of a value already strictly decoded (no second CBOR pass)."""
        what = "signed telemetry batch"
        return cls(*_read_signed(value, what, TelemetryBatch.from_wire, "vehicle key id"))

    def verify(self, verifier: Verifier) -> None:
        """BAD_SIGNATURE unless ``verifier`` (the vehicle's key ``key_id``, from the directory)
        is of this suite and accepts the signature."""
        _check_signature(verifier.suite, verifier.verify, self.suite, self.to_be_signed(), self)

    def digest(self) -> bytes:
        """SHA-256 of ``encode()``: what the audit record names the evidence by."""
        return hashlib.sha256(self.encode()).digest()


def decode_batch_payload(
    data: bytes, *, max_size: int = MAX_MESSAGE_SIZE
) -> TelemetryBatch | SignedTelemetryBatch:
    """The payload of a v2 ``tel`` message: a batch (a CBOR map) or a signed batch (an array).
    Strict like every decoder here; no signature is checked."""
    value = _strict_loads(data, "telemetry batch", max_size)
    if cbor.is_array(value):
        return SignedTelemetryBatch.from_wire(value)
    return TelemetryBatch.from_wire(value)
