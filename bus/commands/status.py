"""Responses of vehicles, and the lifecycle states and status events of commands."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from fleetbus.bus.commands.wire import (
    MAX_DETAIL,
    MAX_MESSAGE_SIZE,
    _bytes,
    _check_model_text,
    _check_time,
    _dumps,
    _int,
    _malformed,
    _map,
    _ms,
    _opt_text,
    _strict_loads,
    _text,
    _to_ms,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode

if TYPE_CHECKING:
    pass


# --- responses and status -----------------------------------------------------------------

_RESPONSE_FIELDS: Final = frozenset(
    {"command_id", "correlation_id", "vehicle_id", "status", "detail", "executed_at"}
)


@dataclass(frozen=True)
class Response:
    """A vehicle's answer to one command; ``status`` uses HTTP-like codes as Eclipse Hono does
    (2xx done, 4xx the command was refused, 5xx the vehicle failed). Carried as the payload of
    an envelope of kind ``rsp`` from the vehicle to the bus sealer; Kafka key: the vehicle id
    (wire v2) or the command id (v1)."""

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


#: How a group command's ``authorized`` event (no vehicle id) announces how many vehicles the
#: seal-stage partitions will name: they seal in separate transactions, so a watcher cannot
#: know from the events alone when every target has been named.
_GROUP_TARGETS_PREFIX: Final = "targets="


def group_targets_detail(count: int, detail: str) -> str:
    """The detail of a group command's ``authorized`` event: ``targets=<n>; <detail>``."""
    return f"{_GROUP_TARGETS_PREFIX}{count}; {detail}"


def group_targets(detail: str) -> int | None:
    """The vehicle count a group's ``authorized`` event announces (None: it announces none)."""
    if not detail.startswith(_GROUP_TARGETS_PREFIX):
        return None
    number = detail[len(_GROUP_TARGETS_PREFIX) :].split(";", 1)[0]
    return int(number) if number.isdigit() and len(number) < 10 else None


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


# --- the response stage's record to the track stage ----------------------------------------

_VERIFIED_FIELDS: Final = frozenset({"v", "response", "key_path", "wire", "expires_at"})


@dataclass(frozen=True)
class VerifiedResponse:
    """A vehicle's response the response stage opened and verified (authenticated sender named
    in the response, fresh, not replayed), forwarded on ``commands.responses.verified`` keyed by
    command id to the track stage, which judges it against the command's targets.

    ``key_path`` is the path the envelope was sealed on (for the audit record), ``wire`` its
    format (1 or 2), ``expires_at`` its expiry: how long the track stage may hold it while the
    command's authorized record is still on its way."""

    response: Response
    key_path: str
    wire: int
    expires_at: float

    def __post_init__(self) -> None:
        if not isinstance(self.response, Response):
            raise _malformed("response must be a Response")
        _check_model_text(self.key_path, "key path")
        if self.wire not in (1, 2):
            raise _malformed("wire must be 1 or 2")
        object.__setattr__(self, "expires_at", _check_time(self.expires_at, "expires_at"))

    @property
    def command_id(self) -> str:
        return self.response.command_id

    @property
    def vehicle_id(self) -> str:
        return self.response.vehicle_id

    def encode(self) -> bytes:
        return _dumps(
            {
                "v": 1,
                "response": self.response.encode(),
                "key_path": self.key_path,
                "wire": self.wire,
                "expires_at": _to_ms(self.expires_at),
            }
        )

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> VerifiedResponse:
        what = "verified response"
        m = _map(_strict_loads(data, what, max_size), what, _VERIFIED_FIELDS)
        _int(m["v"], "version", 1, 1)
        return cls(
            response=Response.decode(
                _bytes(m["response"], "response", max_size), max_size=max_size
            ),
            key_path=_text(m["key_path"], "key path"),
            wire=_int(m["wire"], "wire", 1, 2),
            expires_at=_ms(m["expires_at"], "expires_at"),
        )
