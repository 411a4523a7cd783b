"""Commands: the target, the command body and the issuer-signed command."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from fleetbus.bus import cbor
from fleetbus.bus.commands.ids import command_id_at, new_command_id
from fleetbus.bus.commands.wire import (
    _ACTION_RE,
    _UUID_RE,
    COMMAND_CONTEXT,
    COMMAND_DIGEST_CONTEXT,
    MAX_MESSAGE_SIZE,
    ParamValue,
    _check_model_text,
    _check_params,
    _check_signature,
    _check_time,
    _decode_signed,
    _dumps,
    _encode_signed,
    _int,
    _malformed,
    _map,
    _ms,
    _opt_text,
    _signing_input,
    _text,
    _to_ms,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode

if TYPE_CHECKING:
    from fleetbus.bus.directory import KeyDirectory
    from fleetbus.bus.keys import Signer


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
        if command_id is None:
            # The id carries the issue time: the bus refuses ids older than its replay window.
            command_id = new_command_id() if now is None else command_id_at(issued)
        return cls(
            id=command_id,
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

    def digest(self) -> bytes:
        """What an approval binds: SHA-256 of ``canonical CBOR(["fleetbus-command-digest-v1",
        ToBeSigned])`` (docs/wire-format.md, "Approvals"). Everything the issuer signed (body,
        key id, suite) and nothing else: a re-signature of the same command has the same
        digest, any other command under the same id has another."""
        return hashlib.sha256(_dumps([COMMAND_DIGEST_CONTEXT, self.to_be_signed()])).digest()

    def encode(self) -> bytes:
        return _encode_signed(self.command.to_wire(), self.key_id, self.suite, self.signature)

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> SignedCommand:
        """Strict parse (no signature check): MALFORMED, OVERSIZE or UNSUPPORTED_VERSION."""
        command, key_id, suite, signature = _decode_signed(
            data, "signed command", max_size, Command.from_wire, "issuer key id"
        )
        return cls(command=command, key_id=key_id, suite=suite, signature=signature)

    def verify(self, directory: KeyDirectory, *, at: float) -> Command:
        """The command, if its issuer's key ``key_id`` is valid at ``at`` and signed it.

        Raises ``FleetbusError``: UNKNOWN_SIGNER / SIGNER_REVOKED / SIGNER_EXPIRED /
        NOT_YET_VALID from the directory, BAD_SIGNATURE when the signature does not verify.
        """
        verifier = directory.verifier_for(self.command.issuer, self.key_id, at=at)
        _check_signature(verifier.suite, verifier.verify, self.suite, self.to_be_signed(), self)
        return self.command
