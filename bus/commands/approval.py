"""Approvals: a second principal's signed decision about one exact command."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, cast

from fleetbus.bus import cbor
from fleetbus.bus.commands.wire import (
    _UUID_RE,
    APPROVAL_CONTEXT,
    MAX_MESSAGE_SIZE,
    _bytes,
    _check_model_text,
    _check_signature,
    _check_time,
    _decode_signed,
    _encode_signed,
    _malformed,
    _map,
    _ms,
    _signing_input,
    _text,
    _to_ms,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode

if TYPE_CHECKING:
    from fleetbus.bus.commands.command import SignedCommand
    from fleetbus.bus.directory import KeyDirectory
    from fleetbus.bus.keys import Signer


# --- approvals -----------------------------------------------------------------------------


class Decision(StrEnum):
    APPROVE = "approve"
    DENY = "deny"


#: Bytes of a command digest (SHA-256, ``SignedCommand.digest``).
DIGEST_SIZE: Final = hashlib.sha256().digest_size
_APPROVAL_FIELDS: Final = frozenset(
    {"command_id", "command_digest", "approver", "decision", "issued_at"}
)
#: The fields of a v1 approval, which named only a command id: refused, never upgraded.
_V1_APPROVAL_FIELDS: Final = _APPROVAL_FIELDS - {"command_digest"}


@dataclass(frozen=True)
class Approval:
    """A second principal's decision about exactly one command: its id and its digest
    (``SignedCommand.digest``), so that no other command under that id can use it. Build one
    with ``Approval.for_command``."""

    command_id: str
    approver: str
    decision: Decision
    issued_at: float
    command_digest: bytes = field(repr=False)

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
        if type(self.command_digest) is not bytes or len(self.command_digest) != DIGEST_SIZE:
            raise FleetbusError(
                f"command digest must be {DIGEST_SIZE} bytes", reason=ReasonCode.MALFORMED
            )

    @classmethod
    def for_command(
        cls,
        signed: SignedCommand,
        *,
        approver: str,
        decision: Decision | str = Decision.APPROVE,
        issued_at: float,
    ) -> Approval:
        """``approver``'s decision about exactly this signed command."""
        return cls(
            command_id=signed.command.id,
            approver=approver,
            decision=Decision(decision),
            issued_at=issued_at,
            command_digest=signed.digest(),
        )

    def is_for(self, signed: SignedCommand) -> bool:
        """Whether this approval is about exactly ``signed``: its id and, compared in constant
        time, its digest."""
        return self.command_id == signed.command.id and hmac.compare_digest(
            self.command_digest, signed.digest()
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "command_digest": self.command_digest,
            "approver": self.approver,
            "decision": str(self.decision),
            "issued_at": _to_ms(self.issued_at),
        }

    @classmethod
    def from_wire(cls, value: object) -> Approval:
        if cbor.is_map(value) and set(cast("Mapping[str, Any]", value)) == _V1_APPROVAL_FIELDS:
            raise FleetbusError(
                "a v1 approval names only a command id, not the command: refused; approve "
                "again with the command",
                reason=ReasonCode.UNSUPPORTED_VERSION,
            )
        m = _map(value, "approval", _APPROVAL_FIELDS)
        command_id = _text(m["command_id"], "approval command id", 36)
        if not _UUID_RE.fullmatch(command_id):
            raise _malformed("approval command id must be a canonical lowercase UUIDv7")
        digest = _bytes(m["command_digest"], "command digest", DIGEST_SIZE)
        if len(digest) != DIGEST_SIZE:
            raise _malformed(f"command digest must be {DIGEST_SIZE} bytes")
        decision = _text(m["decision"], "decision")
        if decision not in {"approve", "deny"}:
            raise _malformed("decision must be 'approve' or 'deny'")
        return cls(
            command_id=command_id,
            approver=_text(m["approver"], "approver"),
            decision=Decision(decision),
            issued_at=_ms(m["issued_at"], "issued_at"),
            command_digest=digest,
        )


@dataclass(frozen=True)
class SignedApproval:
    """An approval with its approver's signature; wire and signing input like
    ``SignedCommand`` with the domain ``"fleetbus-approval-v2"``."""

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
        return _encode_signed(self.approval.to_wire(), self.key_id, self.suite, self.signature)

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> SignedApproval:
        approval, key_id, suite, signature = _decode_signed(
            data, "signed approval", max_size, Approval.from_wire, "approver key id"
        )
        return cls(approval=approval, key_id=key_id, suite=suite, signature=signature)

    def verify(self, directory: KeyDirectory, *, at: float) -> Approval:
        """The approval, if the approver's key is valid at ``at`` and signed it."""
        verifier = directory.verifier_for(self.approval.approver, self.key_id, at=at)
        _check_signature(verifier.suite, verifier.verify, self.suite, self.to_be_signed(), self)
        return self.approval
