"""What the stages share: the topic names they read and write, the records between
stages (authorized, rejected) and the status and reject outputs every stage writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cbor2

from fleetbus.bus.commands import CommandState, StatusEvent
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.processors.audit import AuditEvent
from fleetbus.processors.engine import InputRecord, Output, StageResult, dead_letter_result


def keyed_by(record: InputRecord, command_id: str) -> bool:
    """True when the Kafka record key is exactly the command id."""
    return record.key == command_id.encode()


def encode_cbor(value: object) -> bytes:
    return cbor2.dumps(value, canonical=True)


def to_ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass(frozen=True)
class PipelineTopics:
    """Full topic names the stages read and write."""

    requested: str
    approvals: str
    authorized: str
    rejected: str
    outbound: str
    responses: str
    responses_verified: str
    status: str
    telemetry_raw: str
    telemetry_verified: str
    audit: str
    dlq: str

    @classmethod
    def from_settings(cls, topics: Any) -> PipelineTopics:
        full = topics.full
        return cls(
            requested=full(topics.commands_requested),
            approvals=full(topics.commands_approvals),
            authorized=full(topics.commands_authorized),
            rejected=full(topics.commands_rejected),
            outbound=full(topics.commands_outbound),
            responses=full(topics.commands_responses),
            responses_verified=full(topics.commands_responses_verified),
            status=full(topics.commands_status),
            telemetry_raw=full(topics.telemetry_raw),
            telemetry_verified=full(topics.telemetry_verified),
            audit=full(topics.audit),
            dlq=full(topics.dlq),
        )


# --- records between stages ----------------------------------------------------------------


#: Readers of an authorized record (v2). The seal stage's copy is keyed by vehicle id (a group
#: command's: one per partition, explicit), so a seal-stage partition sees only its vehicles;
#: the track stage's copy is keyed by command id, beside the command's status and responses.
FOR_SEAL = "seal"
FOR_TRACK = "track"


@dataclass(frozen=True)
class AuthorizedCommand:
    """A command the policy allowed, for one vehicle (``vehicle_id``) or, not yet expanded, for
    a group (``group``, ``vehicle_id`` empty). ``reader``: ``FOR_SEAL`` or ``FOR_TRACK`` (v2);
    empty in a v1 record (one per vehicle, keyed by command id, read by both stages: what
    workers of earlier releases wrote)."""

    command_id: str
    vehicle_id: str
    issuer: str
    action: str
    criticality: str
    issued_at: float
    expires_at: float
    signed_command: bytes = field(repr=False)
    decision: str = ""
    approvers: tuple[str, ...] = ()
    authorized_at: float = 0.0
    group: str = ""
    reader: str = ""

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "v": 1,
            "command_id": self.command_id,
            "vehicle_id": self.vehicle_id,
            "issuer": self.issuer,
            "action": self.action,
            "criticality": self.criticality,
            "issued_at": to_ms(self.issued_at),
            "expires_at": to_ms(self.expires_at),
            "signed_command": self.signed_command,
            "decision": self.decision,
            "approvers": list(self.approvers),
            "authorized_at": to_ms(self.authorized_at),
        }
        if self.reader:
            doc.update(v=2, group=self.group, reader=self.reader)
        return encode_cbor(doc)

    @classmethod
    def decode(cls, data: bytes | None) -> AuthorizedCommand:
        try:
            m = cbor2.loads(data or b"")
            if m["v"] not in (1, 2):
                raise ValueError("version")
            group, reader = ("", "") if m["v"] == 1 else (str(m["group"]), str(m["reader"]))
            if m["v"] == 2 and (
                reader not in (FOR_SEAL, FOR_TRACK) or (group == "") == (str(m["vehicle_id"]) == "")
            ):
                raise ValueError("reader, or not exactly one of vehicle and group")
            return cls(
                command_id=str(m["command_id"]),
                vehicle_id=str(m["vehicle_id"]),
                issuer=str(m["issuer"]),
                action=str(m["action"]),
                criticality=str(m["criticality"]),
                issued_at=m["issued_at"] / 1000,
                expires_at=m["expires_at"] / 1000,
                signed_command=bytes(m["signed_command"]),
                decision=str(m["decision"]),
                approvers=tuple(str(a) for a in m["approvers"]),
                authorized_at=m["authorized_at"] / 1000,
                group=group,
                reader=reader,
            )
        except Exception as exc:
            raise FleetbusError("malformed authorized record", reason=ReasonCode.MALFORMED) from exc


@dataclass(frozen=True)
class RejectedCommand:
    """A refused command; key: command id."""

    command_id: str
    reason: ReasonCode
    detail: str
    at: float
    issuer: str | None = None
    vehicle_id: str | None = None

    def encode(self) -> bytes:
        return encode_cbor(
            {
                "v": 1,
                "command_id": self.command_id,
                "reason": str(self.reason),
                "detail": self.detail[:1024],
                "at": to_ms(self.at),
                "issuer": self.issuer,
                "vehicle_id": self.vehicle_id,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> RejectedCommand:
        m = cbor2.loads(data)
        return cls(
            command_id=m["command_id"],
            reason=ReasonCode(m["reason"]),
            detail=m["detail"],
            at=m["at"] / 1000,
            issuer=m["issuer"],
            vehicle_id=m["vehicle_id"],
        )


def status_output(
    topics: PipelineTopics,
    command_id: str,
    state: CommandState,
    now: float,
    *,
    detail: str = "",
    reason: ReasonCode | None = None,
    vehicle_id: str | None = None,
) -> Output:
    event = StatusEvent(
        command_id=command_id,
        state=state,
        at=now,
        detail=detail[:1024],
        reason=reason,
        vehicle_id=vehicle_id,
    )
    return Output(topics.status, command_id.encode(), event.encode())


def followed_by(first: StageResult, then: StageResult) -> StageResult:
    """``first``'s outputs and audit followed by ``then``'s; the outcome is ``then``'s."""
    first.extend(then)
    first.outcome = then.outcome
    return first


def reject(
    stage: str,
    topics: PipelineTopics,
    record: InputRecord,
    command_id: str,
    reason: ReasonCode,
    detail: str,
    now: float,
    *,
    issuer: str | None,
    vehicle_id: str | None = None,
    dlq: bool = True,
) -> StageResult:
    """Rejected record + status event + (DLQ record with the input bytes) + audit event."""
    rejected = RejectedCommand(command_id, reason, detail, now, issuer, vehicle_id)
    result = (
        dead_letter_result(
            stage, topics.dlq, record, reason, detail, now=now, command_id=command_id
        )
        if dlq
        else StageResult()
    )
    result.outputs += [
        Output(topics.rejected, command_id.encode(), rejected.encode()),
        status_output(
            topics,
            command_id,
            CommandState.REJECTED,
            now,
            detail=detail,
            reason=reason,
            vehicle_id=vehicle_id,
        ),
    ]
    result.audit.append(
        AuditEvent(
            actor=issuer or "unknown",
            event="rejected",
            command_id=command_id,
            reason=reason.value,
            detail={"stage": stage, "detail": detail[:256], "vehicle": vehicle_id},
        )
    )
    result.outcome = "rejected"
    return result


# --- authorize -----------------------------------------------------------------------------
