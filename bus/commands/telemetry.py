"""Vehicle telemetry: one reading, and a batch of readings (wire v2 uplink)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from fleetbus.bus.commands.wire import (
    MAX_MESSAGE_SIZE,
    ParamValue,
    _array,
    _check_model_text,
    _check_params,
    _check_time,
    _dumps,
    _malformed,
    _map,
    _ms,
    _strict_loads,
    _text,
    _to_ms,
)
from fleetbus.bus.errors import FleetbusError

if TYPE_CHECKING:
    pass


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
