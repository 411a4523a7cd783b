"""The pipeline's business logic as plain functions over records: decode → verify → decide →
seal → outputs. No Kafka here; ``fleetbus.processors.eos`` runs these exactly once.

Stages: ``AuthorizeStage`` (identity, freshness, replay, Cedar policy, group expansion, M-of-N
approvals), ``SealStage`` (profile choice, sealing with failover), ``TrackStage`` (lifecycle,
expiry, end-to-end latency) and ``TelemetryStage`` (open, export policy).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import cbor2

from fleetbus.bus.commands import (
    Approval,
    Command,
    CommandState,
    Decision,
    Response,
    SignedApproval,
    SignedCommand,
    StatusEvent,
    Telemetry,
    TelemetryBatch,
    uuid7_timestamp_ms,
)
from fleetbus.bus.envelope import EnvelopeError, MessageKind, decode_envelope
from fleetbus.bus.envelope_v2 import (
    Direction,
    Message,
    ParsedEstablishment,
    ParsedStatus,
    decode_record,
    record_version,
)
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.bus.keys import KeyPath, RecipientKeys, SecurityProfile
from fleetbus.observability.metrics import (
    BUS_LATENCY,
    COMMAND_LATENCY,
    ENVELOPE_REJECTS,
    KEYPATH_FAILOVER,
    KEYPATH_SELECTED,
    on_commit,
)
from fleetbus.processors.audit import AuditEvent
from fleetbus.processors.eos import (
    InputRecord,
    Output,
    PartitionState,
    StageResult,
    dead_letter_result,
)
from fleetbus.processors.policy import PolicyEngine
from fleetbus.processors.uplink import (
    EPOCH_COUNT_PREFIX,
    EPOCH_PREFIX,
    EPOCHS_PER_SENDER,
    StateEpochStore,
    UplinkLimits,
    UplinkReplay,
    add_to_count,
    read_count,
    sender_key,
    stored_until,
)
from fleetbus.providers.keypath import REASON_NOT_CONFIGURED, FailoverEvent
from fleetbus.providers.sealing import PreparedEnvelope, SealRequest, VerifiedRoots
from fleetbus.providers.sealing_v2 import (
    PreparedMessage,
    directory_verifier,
    open_status,
    verify_signed_record,
)

__all__ = [
    "AuthorizeStage",
    "AuthorizedCommand",
    "PipelineTopics",
    "ProfileChoice",
    "RejectedCommand",
    "SealStage",
    "TelemetryStage",
    "TrackStage",
]

_log = logging.getLogger(__name__)


def _keyed_by(record: InputRecord, command_id: str) -> bool:
    """True when the Kafka record key is exactly the command id."""
    return record.key == command_id.encode()


PENDING_STATE: Final = CommandState.PENDING
#: What a failed issuer or approver verification reports as is: the directory's verdict on the
#: key (a key whose validity has not begun is ``not_yet_valid``, not unknown) and our own faults.
#: Anything else means "not a signer we know".
_SIGNER_REASONS: Final = frozenset(
    {
        ReasonCode.UNKNOWN_SIGNER,
        ReasonCode.SIGNER_REVOKED,
        ReasonCode.SIGNER_EXPIRED,
        ReasonCode.NOT_YET_VALID,
        ReasonCode.BAD_SIGNATURE,
        ReasonCode.CONFIG,
        ReasonCode.INTERNAL,
    }
)


def _dumps(value: object) -> bytes:
    return cbor2.dumps(value, canonical=True)


def _ms(seconds: float) -> int:
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
            status=full(topics.commands_status),
            telemetry_raw=full(topics.telemetry_raw),
            telemetry_verified=full(topics.telemetry_verified),
            audit=full(topics.audit),
            dlq=full(topics.dlq),
        )


# --- records between stages ----------------------------------------------------------------


@dataclass(frozen=True)
class AuthorizedCommand:
    """One (command, vehicle) the policy allowed; key: command id."""

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

    def encode(self) -> bytes:
        return _dumps(
            {
                "v": 1,
                "command_id": self.command_id,
                "vehicle_id": self.vehicle_id,
                "issuer": self.issuer,
                "action": self.action,
                "criticality": self.criticality,
                "issued_at": _ms(self.issued_at),
                "expires_at": _ms(self.expires_at),
                "signed_command": self.signed_command,
                "decision": self.decision,
                "approvers": list(self.approvers),
                "authorized_at": _ms(self.authorized_at),
            }
        )

    @classmethod
    def decode(cls, data: bytes | None) -> AuthorizedCommand:
        try:
            m = cbor2.loads(data or b"")
            if m["v"] != 1:
                raise ValueError("version")
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
        return _dumps(
            {
                "v": 1,
                "command_id": self.command_id,
                "reason": str(self.reason),
                "detail": self.detail[:1024],
                "at": _ms(self.at),
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


def _status(
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


def _then(first: StageResult, then: StageResult) -> StageResult:
    """``first``'s outputs and audit followed by ``then``'s; the outcome is ``then``'s."""
    first.extend(then)
    first.outcome = then.outcome
    return first


def _reject(
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
        _status(
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

#: Early approvals (and denies) one command id may hold before its command arrives, one per
#: approver: filling them takes this many distinct principal keys, and the excess is refused.
MAX_EARLY_APPROVALS: Final = 8


@dataclass(frozen=True)
class _HeldApproval:
    """A signed approval or deny the authorize stage keeps until it judges it against its
    command: the original bytes (verified again at every decision), where they came from (for
    the DLQ record) and, for one that came before its command, when it stops being held."""

    approver: str
    deny: bool
    value: bytes = field(repr=False)
    partition: int
    offset: int
    until: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "approver": self.approver,
            "deny": self.deny,
            "value": self.value,
            "partition": self.partition,
            "offset": self.offset,
            "until": _ms(self.until),
        }

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> _HeldApproval:
        return cls(
            approver=str(m["approver"]),
            deny=bool(m["deny"]),
            value=bytes(m["value"]),
            partition=int(m["partition"]),
            offset=int(m["offset"]),
            until=m["until"] / 1000,
        )

    def record(self, topic: str, command_id: str) -> InputRecord:
        return InputRecord(topic, self.partition, self.offset, command_id.encode(), self.value)


def _held_list(raw: bytes | None) -> list[_HeldApproval]:
    """The held approvals of an ``apr/<id>`` state value. A value written before approvals were
    kept as signed bytes holds bare names, which cannot be judged: it holds none."""
    if raw is None:
        return []
    return [_HeldApproval.from_wire(a) for a in cbor2.loads(raw).get("approvals", [])]


@dataclass
class _CommandEntry:
    """What the authorize stage remembers per command id (state value, CBOR)."""

    status: str  # pending | authorized | rejected
    until: float  # forget after (expiry + skew): the replay window
    issuer: str
    window_until: float = 0.0
    signed: bytes = b""
    approvals: list[_HeldApproval] = field(default_factory=list)
    offset: int = -1
    partition: int = -1

    def close(self, status: str) -> None:
        """Decided: the replay set needs only the id, not the command or its approvals."""
        self.status, self.signed, self.approvals = status, b"", []

    def encode(self) -> bytes:
        return _dumps(
            {
                "status": self.status,
                "until": _ms(self.until),
                "issuer": self.issuer,
                "window_until": _ms(self.window_until),
                "signed": self.signed,
                "approvals": [a.to_wire() for a in self.approvals],
                "offset": self.offset,
                "partition": self.partition,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> _CommandEntry:
        m = cbor2.loads(data)
        return cls(
            status=m["status"],
            until=m["until"] / 1000,
            issuer=m["issuer"],
            window_until=m["window_until"] / 1000,
            signed=bytes(m["signed"]),
            # Entries written before approvals were kept as signed bytes carry bare approver
            # names ("approvers"), which cannot be judged again: such a command needs new ones.
            approvals=[_HeldApproval.from_wire(a) for a in m.get("approvals", [])],
            offset=m["offset"],
            partition=m["partition"],
        )


class AuthorizeStage:
    """commands.requested + commands.approvals → authorized (one per vehicle) | rejected.

    State per partition (changelogged): ``cmd/<id>`` for every command id whose signature
    verified (the replay set, kept until expiry + skew; a pending command with its signed
    approvals) and ``apr/<id>`` for signed approvals and denies that arrived before their
    command (at most ``max_early_approvals``, one per approver, each held for one window).

    The two topics race, so an approval is never trusted for having been checked once: every
    decision judges every held approval again, at that moment, against that command (signature
    and key validity, not the issuer, Cedar ``approve`` on its vehicle or group, window). A
    valid deny vetoes; what fails is dead-lettered with its reason when it is judged.
    """

    name = "authorize"

    def __init__(
        self,
        *,
        topics: PipelineTopics,
        directory: Any,
        policy: PolicyEngine,
        approvals_required: int,
        approval_window_s: float,
        clock_skew_s: float,
        max_lifetime_s: float,
        max_message_bytes: int,
        max_early_approvals: int = MAX_EARLY_APPROVALS,
    ) -> None:
        self.topics = topics
        self.directory = directory
        self.policy = policy
        self.approvals_required = approvals_required
        self.window_s = approval_window_s
        self.skew_s = clock_skew_s
        self.max_lifetime_s = max_lifetime_s
        self.max_bytes = max_message_bytes
        # Never fewer slots than a quorum: M approvers publishing early must all fit.
        self.max_early = max(max_early_approvals, approvals_required)

    def input_topics(self) -> Sequence[str]:
        return [self.topics.requested, self.topics.approvals]

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if record.topic == self.topics.approvals:
            return self._approval(record, state, now)
        return self._command(record, state, now)

    def _dlq(
        self, record: InputRecord, reason: ReasonCode, detail: str, now: float, **kw: Any
    ) -> StageResult:
        return dead_letter_result(self.name, self.topics.dlq, record, reason, detail, now=now, **kw)

    # -- commands -------------------------------------------------------------------------

    def _command(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if record.value is None:
            return self._dlq(record, ReasonCode.MALFORMED, "empty record", now)
        try:
            signed = SignedCommand.decode(record.value, max_size=self.max_bytes)
        except FleetbusError as exc:
            return self._dlq(record, exc.reason, str(exc), now)
        command = signed.command
        cid, issuer = command.id, command.issuer
        if not _keyed_by(record, cid):
            # The replay set is per partition: a command re-published under another key would
            # land on another partition and pass it. The key decides the partition, so it must
            # be the command id.
            return self._dlq(record, ReasonCode.MALFORMED, "record key must be the command id", now)
        try:
            signed.verify(self.directory, at=now)
        except FleetbusError as exc:
            reason = exc.reason if exc.reason in _SIGNER_REASONS else ReasonCode.UNKNOWN_SIGNER
            return _reject(
                self.name,
                self.topics,
                record,
                cid,
                reason,
                f"issuer not verified: {reason.value}",
                now,
                issuer=issuer,
            )
        if now > command.expires_at + self.skew_s:
            return _reject(
                self.name,
                self.topics,
                record,
                cid,
                ReasonCode.EXPIRED,
                "command expired before it was authorized",
                now,
                issuer=issuer,
            )
        if command.issued_at > now + self.skew_s:
            return _reject(
                self.name,
                self.topics,
                record,
                cid,
                ReasonCode.NOT_YET_VALID,
                "command is issued in the future (beyond the clock-skew allowance)",
                now,
                issuer=issuer,
            )
        if command.expires_at - command.issued_at > self.max_lifetime_s:
            return _reject(
                self.name,
                self.topics,
                record,
                cid,
                ReasonCode.POLICY_DENIED,
                f"command lifetime exceeds the replay window ({self.max_lifetime_s:.0f} s)",
                now,
                issuer=issuer,
            )
        key = f"cmd/{cid}"
        if state.get(key) is not None:
            return _reject(
                self.name,
                self.topics,
                record,
                cid,
                ReasonCode.REPLAYED,
                "command id was already seen",
                now,
                issuer=issuer,
            )
        entry = _CommandEntry(
            status="pending",
            until=command.expires_at + self.skew_s,
            issuer=issuer,
            window_until=now + self.window_s,
            signed=record.value,
            offset=record.offset,
            partition=record.partition,
        )
        result = StageResult()
        for held in _held_list(state.get(f"apr/{cid}")):
            if held.until < now:  # the timer may not have run yet: the outcome must not differ
                result.extend(self._unclaimed(held, cid, now))
            else:
                entry.approvals.append(held)
        state.delete(f"apr/{cid}")
        settled, _ = self._settle(record, signed, entry, state, now)
        return _then(result, settled)

    def _decide(
        self,
        record: InputRecord,
        signed: SignedCommand,
        entry: _CommandEntry,
        state: PartitionState,
        now: float,
    ) -> StageResult:
        command = signed.command
        cid, issuer = command.id, command.issuer
        key = f"cmd/{cid}"
        target = command.target
        vehicles: list[str]
        if target.vehicle is not None:
            vehicles = [target.vehicle]
            if target.vehicle not in self.policy.registry.vehicles:
                entry.close("rejected")
                state.put(key, entry.encode())
                return _reject(
                    self.name,
                    self.topics,
                    record,
                    cid,
                    ReasonCode.POLICY_DENIED,
                    f"unknown vehicle {target.vehicle}",
                    now,
                    issuer=issuer,
                )
        else:
            vehicles = self.policy.registry.group_members(str(target.group))
            if not vehicles:
                entry.close("rejected")
                state.put(key, entry.encode())
                return _reject(
                    self.name,
                    self.topics,
                    record,
                    cid,
                    ReasonCode.POLICY_DENIED,
                    f"group {target.group} has no vehicles",
                    now,
                    issuer=issuer,
                )
        decision = self.policy.decide_command(
            issuer=issuer,
            action=command.action,
            vehicle=target.vehicle,
            group=target.group,
            approvals=len(entry.approvals),
            required_approvals=self.approvals_required,
            now=now,
        )
        if decision.outcome == "deny":
            entry.close("rejected")
            state.put(key, entry.encode())
            return _reject(
                self.name,
                self.topics,
                record,
                cid,
                ReasonCode.POLICY_DENIED,
                decision.detail,
                now,
                issuer=issuer,
            )
        if decision.outcome == "pending":
            entry.status = "pending"
            state.put(key, entry.encode())
            return StageResult(
                outputs=[
                    _status(
                        self.topics,
                        cid,
                        PENDING_STATE,
                        now,
                        detail=f"pending: {decision.detail} within {self.window_s:.0f} s",
                    )
                ],
                audit=[
                    AuditEvent(
                        actor=issuer,
                        event="pending_approval",
                        command_id=cid,
                        detail={
                            "action": command.action,
                            "approvals": len(entry.approvals),
                            "required": self.approvals_required,
                        },
                    )
                ],
                outcome="pending",
            )
        approvers = tuple(a.approver for a in entry.approvals)
        entry.close("authorized")
        state.put(key, entry.encode())
        outputs = [
            Output(
                self.topics.authorized,
                cid.encode(),
                AuthorizedCommand(
                    command_id=cid,
                    vehicle_id=vehicle,
                    issuer=issuer,
                    action=command.action,
                    criticality=decision.criticality,
                    issued_at=command.issued_at,
                    expires_at=command.expires_at,
                    signed_command=signed.encode(),
                    decision=decision.detail,
                    approvers=approvers,
                    authorized_at=now,
                ).encode(),
            )
            for vehicle in vehicles
        ]
        outputs += [
            _status(
                self.topics, cid, CommandState.AUTHORIZED, now, vehicle_id=v, detail=decision.detail
            )
            for v in vehicles
        ]
        return StageResult(
            outputs=outputs,
            audit=[
                AuditEvent(
                    actor=issuer,
                    event="authorized",
                    command_id=cid,
                    detail={
                        "action": command.action,
                        "criticality": decision.criticality,
                        "target": str(target),
                        "vehicles": len(vehicles),
                        "approvers": ",".join(approvers),
                        "policies": ",".join(decision.policies),
                    },
                )
            ],
        )

    # -- approvals ------------------------------------------------------------------------

    def _approval(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if record.value is None:
            return self._dlq(record, ReasonCode.MALFORMED, "empty record", now)
        try:
            signed = SignedApproval.decode(record.value, max_size=self.max_bytes)
        except FleetbusError as exc:
            return self._dlq(record, exc.reason, str(exc), now)
        approval = signed.approval
        cid, approver = approval.command_id, approval.approver
        if not _keyed_by(record, cid):
            # Approvals must meet their command's pending state on the same partition.
            return self._dlq(record, ReasonCode.MALFORMED, "record key must be the command id", now)
        try:
            signed.verify(self.directory, at=now)
        except FleetbusError as exc:
            reason = exc.reason if exc.reason in _SIGNER_REASONS else ReasonCode.UNKNOWN_SIGNER
            return self._dlq(
                record,
                reason,
                f"approval not verified: {reason.value}",
                now,
                actor=approver,
                command_id=cid,
            )
        if approval.issued_at > now + self.skew_s:
            return self._dlq(
                record,
                ReasonCode.NOT_YET_VALID,
                "approval issued in the future",
                now,
                actor=approver,
                command_id=cid,
            )
        held = _HeldApproval(
            approver=approver,
            deny=approval.decision is Decision.DENY,
            value=record.value,
            partition=record.partition,
            offset=record.offset,
            until=now + self.window_s,
        )
        raw = state.get(f"cmd/{cid}")
        if raw is None:
            return self._hold(record, held, cid, state, now)
        entry = _CommandEntry.decode(raw)
        if entry.status != "pending":
            return StageResult(
                audit=[
                    AuditEvent(approver, "approval_ignored", cid, detail={"status": entry.status})
                ]
            )
        signed_command = SignedCommand.decode(entry.signed, max_size=self.max_bytes)
        # Signature, key and issue time were checked above at this same ``now``.
        refusal = self._rules(approval, signed_command.command, entry, now)
        if refusal is not None:
            return self._dlq(record, *refusal, now, actor=approver, command_id=cid)
        duplicate = any(h.approver == approver for h in entry.approvals)
        # The newest passing record of an approver replaces its older one (whose key may have
        # lapsed since): a deny so vetoes below, an approval leaves the count as it was. A held
        # deny would have vetoed already, so an approval never replaces one here.
        entry.approvals = [h for h in entry.approvals if h.approver != approver] + [held]
        if duplicate and not held.deny:
            state.put(f"cmd/{cid}", entry.encode())
            return StageResult(audit=[AuditEvent(approver, "approval_duplicate", cid)])
        command_record = InputRecord(
            self.topics.requested, entry.partition, entry.offset, cid.encode(), entry.signed
        )
        stale = self._recheck_command(signed_command, now)
        if stale is not None:
            entry.close("rejected")
            state.put(f"cmd/{cid}", entry.encode())
            return _reject(
                self.name,
                self.topics,
                command_record,
                cid,
                *stale,
                now,
                issuer=entry.issuer,
            )
        result, counted = self._settle(command_record, signed_command, entry, state, now, held)
        if not held.deny:
            result.audit.insert(0, AuditEvent(approver, "approved", cid, detail={"count": counted}))
        return result

    def _hold(
        self, record: InputRecord, held: _HeldApproval, cid: str, state: PartitionState, now: float
    ) -> StageResult:
        """Keep an approval or deny that came before its command, to be judged when it comes.

        One entry per approver: a newer one of the same decision replaces it (its hold starts
        again), a deny replaces an approval, an approval never replaces a deny.
        """
        early = _held_list(state.get(f"apr/{cid}"))
        decision = "deny" if held.deny else "approve"
        prior = next((h for h in early if h.approver == held.approver), None)
        if prior is not None and prior.deny and not held.deny:
            duplicate = AuditEvent(
                held.approver, "approval_duplicate", cid, detail={"held": "deny"}
            )
            return StageResult(audit=[duplicate])
        if prior is None and len(early) >= self.max_early:
            return self._dlq(
                record,
                ReasonCode.TOO_MANY_APPROVALS,
                f"{len(early)} approvals are already held for this command id before its command",
                now,
                actor=held.approver,
                command_id=cid,
            )
        early = [h for h in early if h.approver != held.approver] + [held]
        state.put(f"apr/{cid}", _dumps({"approvals": [h.to_wire() for h in early]}))
        return StageResult(
            audit=[
                AuditEvent(
                    held.approver,
                    "approval_early",
                    cid,
                    detail={"decision": decision, "replaces": prior is not None},
                )
            ]
        )

    def _judge(
        self, value: bytes, command: Command, entry: _CommandEntry, now: float
    ) -> tuple[ReasonCode, str] | None:
        """Why this signed approval does not count for ``command`` now (None: it counts).

        Every approval goes through here each time approvals are counted, whenever it arrived.
        """
        try:
            signed = SignedApproval.decode(value, max_size=self.max_bytes)
            signed.verify(self.directory, at=now)
        except FleetbusError as exc:
            reason = exc.reason if exc.reason in _SIGNER_REASONS else ReasonCode.UNKNOWN_SIGNER
            return reason, f"approval not verified: {reason.value}"
        return self._rules(signed.approval, command, entry, now)

    def _rules(
        self, approval: Approval, command: Command, entry: _CommandEntry, now: float
    ) -> tuple[ReasonCode, str] | None:
        """``_judge`` after the signature: issue time, issuer, Cedar ``approve``, window."""
        if approval.issued_at > now + self.skew_s:
            return ReasonCode.NOT_YET_VALID, "approval issued in the future"
        if approval.approver == command.issuer:
            return ReasonCode.POLICY_DENIED, "an issuer cannot approve its own command"
        approver, target = approval.approver, command.target
        if not self.policy.may_approve(approver, vehicle=target.vehicle, group=target.group):
            return ReasonCode.POLICY_DENIED, f"{approver} may not approve this command"
        if now > entry.window_until or approval.issued_at > entry.window_until:
            return ReasonCode.POLICY_DENIED, "approval arrived after the window"
        return None

    def _recheck_command(self, signed: SignedCommand, now: float) -> tuple[ReasonCode, str] | None:
        """Why a pending command may no longer be authorized now: its issuer's key was revoked
        or expired, or the command expired, while it waited for approvals."""
        try:
            signed.verify(self.directory, at=now)
        except FleetbusError as exc:
            reason = exc.reason if exc.reason in _SIGNER_REASONS else ReasonCode.UNKNOWN_SIGNER
            return reason, f"issuer no longer verified: {reason.value}"
        if now > signed.command.expires_at + self.skew_s:
            return ReasonCode.EXPIRED, "command expired while waiting for approvals"
        return None

    def _settle(
        self,
        record: InputRecord,
        signed: SignedCommand,
        entry: _CommandEntry,
        state: PartitionState,
        now: float,
        judged: _HeldApproval | None = None,
    ) -> tuple[StageResult, int]:
        """Judge every held approval of a pending command now (but ``judged``, which the caller
        judged at this ``now``): a valid deny vetoes, the valid approvals are counted, the
        others go to the DLQ; then decide. Returns the result and the number counted."""
        command = signed.command
        cid = command.id
        result = StageResult()
        counted: list[_HeldApproval] = []
        veto: _HeldApproval | None = None
        for held in entry.approvals:
            refusal = None if held is judged else self._judge(held.value, command, entry, now)
            if refusal is not None:
                dlq_record = held.record(self.topics.approvals, cid)
                result.extend(
                    self._dlq(dlq_record, *refusal, now, actor=held.approver, command_id=cid)
                )
            elif held.deny:
                veto = veto or held
            else:
                counted.append(held)
        entry.approvals = counted
        if veto is not None:
            entry.close("rejected")
            state.put(f"cmd/{cid}", entry.encode())
            rejected = _reject(
                self.name,
                self.topics,
                record,
                cid,
                ReasonCode.POLICY_DENIED,
                f"denied by approver {veto.approver}",
                now,
                issuer=command.issuer,
            )
            return _then(result, rejected), len(counted)
        return _then(result, self._decide(record, signed, entry, state, now)), len(counted)

    def _unclaimed(self, held: _HeldApproval, cid: str, now: float) -> StageResult:
        return self._dlq(
            held.record(self.topics.approvals, cid),
            ReasonCode.EXPIRED,
            f"approval held {self.window_s:.0f} s; its command did not arrive",
            now,
            actor=held.approver,
            command_id=cid,
        )

    # -- timers ---------------------------------------------------------------------------

    def deadline(self, key: str, value: bytes) -> float | None:
        """When ``tick`` must look at a state entry: a pending command when its approval window
        closes, any other command when its replay window ends, an early approval when it
        expires (the conditions ``tick`` checks, from the same rounded values)."""
        if key.startswith("apr/"):
            held = _held_list(value)
            return min(h.until for h in held) if held else 0.0
        if not key.startswith("cmd/"):
            return None
        entry = _CommandEntry.decode(value)
        if entry.status == "pending":  # rejected when its window closes or it expires
            return min(entry.window_until, entry.until)
        return entry.until

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        result = StageResult()
        for key in state.due(now, self.deadline):
            raw = state.get(key)
            if raw is None:
                continue
            if key.startswith("apr/"):
                cid = key.removeprefix("apr/")
                held = _held_list(raw)
                live = [h for h in held if h.until >= now]
                for gone in held:
                    if gone.until < now:
                        result.extend(self._unclaimed(gone, cid, now))
                if not live:
                    state.delete(key)
                elif len(live) < len(held):
                    state.put(key, _dumps({"approvals": [h.to_wire() for h in live]}))
                continue
            entry = _CommandEntry.decode(raw)
            cid = key.removeprefix("cmd/")
            if entry.status == "pending" and now > min(entry.window_until, entry.until):
                counted = len(entry.approvals)
                signed = entry.signed
                entry.close("rejected")
                state.put(key, entry.encode())
                record = InputRecord(
                    self.topics.requested, entry.partition, entry.offset, cid.encode(), signed
                )
                if now > entry.until:
                    reason = ReasonCode.EXPIRED
                    detail = f"command expired while waiting for approvals ({counted} of "
                else:
                    reason = ReasonCode.POLICY_DENIED
                    detail = f"approval window elapsed ({counted} of "
                result.extend(
                    _reject(
                        self.name,
                        self.topics,
                        record,
                        cid,
                        reason,
                        f"{detail}{self.approvals_required} approvals)",
                        now,
                        issuer=entry.issuer,
                    )
                )
            elif entry.until < now and entry.status != "pending":
                state.delete(key)
        return result


# --- seal ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileChoice:
    """A rule: first match (criticality, vehicle capability) picks the profile."""

    profile: str
    criticality: str | None = None
    capability: str | None = None

    def matches(self, criticality: str, capabilities: frozenset[str]) -> bool:
        return (self.criticality is None or self.criticality == criticality) and (
            self.capability is None or self.capability in capabilities
        )


@dataclass(frozen=True)
class _Prepared:
    """A record of a seal batch whose envelope is encrypted and waits for the batch signature."""

    record: InputRecord
    auth: AuthorizedCommand
    recipient: RecipientKeys
    profile: SecurityProfile
    envelope: PreparedEnvelope | PreparedMessage
    failovers: list[AuditEvent]

    @property
    def v2(self) -> bool:
        return isinstance(self.envelope, PreparedMessage)


#: Directory capability by which a vehicle announces that it reads wire format v2.
WIRE2_CAPABILITY: Final = "wire2"


class SealStage:
    """commands.authorized → commands.outbound (key: vehicle id) + a "sealed" status event.

    With ``sealer_v2`` and ``wire_version`` 2, a vehicle whose directory record announces
    ``wire2`` gets wire format v2: the establishment of a new epoch goes in front of the first
    message on the vehicle's partition, and a copy of it to ``commands.responses`` under the
    vehicle's key, where the track stage keeps it to answer the vehicle's ``epoch_unknown``
    status (docs/wire-format.md V2.7). An epoch counts as announced once the transaction that
    carried its establishment committed; until then every batch carries it again.
    """

    name = "seal"

    def __init__(
        self,
        *,
        topics: PipelineTopics,
        directory: Any,
        sealer: Any,  # EnvelopeSealer
        profiles: Mapping[str, SecurityProfile],
        rules: Sequence[ProfileChoice],
        clock_skew_s: float,
        unservable: Mapping[str, SecurityProfile] | None = None,
        sealer_v2: Any = None,  # EpochSealer
        wire_version: int = 1,
    ) -> None:
        self.topics = topics
        self.directory = directory
        self.sealer = sealer
        self.sealer_v2: Any = sealer_v2 if wire_version == 2 else None
        self.profiles = dict(profiles)
        # Profiles as declared whose providers this worker lacks (``servable_profiles``).
        self.unservable = dict(unservable or {})
        self.rules = list(rules)
        self.skew_s = clock_skew_s
        self._failovers: list[FailoverEvent] = []

    def on_failover(self, event: FailoverEvent) -> None:
        """ProfileSealer listener: metric now, audit record with the seal's transaction."""
        KEYPATH_FAILOVER.labels(
            profile=event.profile,
            from_path=event.from_path.name,
            to_path=event.to_path.name if event.to_path else "none",
            reason=event.reason,
        ).inc()
        self._failovers.append(event)

    def input_topics(self) -> Sequence[str]:
        return [self.topics.authorized]

    def choose_profile(
        self, criticality: str, recipient: RecipientKeys, now: float
    ) -> SecurityProfile:
        """The profile of the first rule that matches. When this worker cannot serve it, the
        command is refused (``key_path_exhausted``, counted and audited as a failover to
        nothing): a later rule names a weaker profile, and falling through to it would be the
        downgrade the first rule exists to prevent."""
        for rule in self.rules:
            if not rule.matches(criticality, recipient.capabilities):
                continue
            profile = self.profiles.get(rule.profile)
            if profile is not None:
                return profile
            declared = self.unservable.get(rule.profile)
            if declared is not None:
                self.on_failover(
                    FailoverEvent(
                        profile=declared.name,
                        from_path=declared.key_paths[0],
                        to_path=None,
                        reason=REASON_NOT_CONFIGURED,
                        at=now,
                    )
                )
            raise FleetbusError(
                f"profile {rule.profile} cannot be served by this worker",
                reason=ReasonCode.KEY_PATH_EXHAUSTED,
            )
        raise FleetbusError(
            f"no security profile rule matches {criticality} for this vehicle",
            reason=ReasonCode.KEY_PATH_EXHAUSTED,
        )

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        result = self.process_batch([record], state, now)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def process_batch(
        self, records: Sequence[InputRecord], state: PartitionState, now: float
    ) -> list[StageResult | Exception]:
        """Seal every record of a batch, then sign them together: with batch signing on, one
        signature over the Merkle root of the batch's envelopes (the runner commits them in one
        transaction). Each record keeps its own checks, rejects and failover audit."""
        results: list[StageResult | Exception | None] = [None] * len(records)
        prepared: list[tuple[int, _Prepared]] = []
        for index, record in enumerate(records):
            try:
                outcome = self._prepare(record, now)
            except Exception as exc:
                results[index] = exc
                continue
            if isinstance(outcome, StageResult):
                results[index] = outcome
            else:
                prepared.append((index, outcome))
        v1 = [(i, p) for i, p in prepared if not p.v2]
        v2 = [(i, p) for i, p in prepared if p.v2]
        try:
            envelopes = self.sealer.sign_prepared([p.envelope for _, p in v1])
        except FleetbusError as exc:
            if len(v1) == 1:
                index, item = v1[0]
                results[index] = self._refused(item, exc, now)
            else:
                # One envelope of the batch cannot be completed (e.g. oversize): seal each
                # record on its own so that only that one is refused.
                for index, item in v1:
                    results[index] = self.process_batch([item.record], state, now)[0]
            v1, envelopes = [], []
        for (index, item), envelope in zip(v1, envelopes, strict=True):
            results[index] = self._sealed(item, [envelope], now)
        if v2:
            messages = [p.envelope for _, p in v2 if isinstance(p.envelope, PreparedMessage)]
            batches: list[list[bytes]] = []
            try:
                batches = self.sealer_v2.records_for(messages)
            except FleetbusError as exc:
                for index, item in v2:
                    results[index] = self._refused(item, exc, now)
            for (index, item), sealed in zip(v2, batches, strict=False):
                results[index] = self._sealed(item, sealed, now)
            if batches:
                # Messages go without their establishment only once it is on the topic.
                on_commit(partial(self.sealer_v2.announced, [m.epoch_id for m in messages]))
        return [r if r is not None else RuntimeError("unprocessed record") for r in results]

    def _prepare(self, record: InputRecord, now: float) -> StageResult | _Prepared:
        try:
            auth = AuthorizedCommand.decode(record.value)
        except FleetbusError as exc:
            return dead_letter_result(
                self.name, self.topics.dlq, record, exc.reason, str(exc), now=now
            )
        cid, vehicle = auth.command_id, auth.vehicle_id
        if now > auth.expires_at + self.skew_s:
            return _reject(
                self.name,
                self.topics,
                record,
                cid,
                ReasonCode.EXPIRED,
                "command expired before it was sealed",
                now,
                issuer=auth.issuer,
                vehicle_id=vehicle,
            )
        self._failovers.clear()
        try:
            recipient = self.directory.recipient_keys(vehicle, at=now)
            profile = self.choose_profile(auth.criticality, recipient, now)
            request = SealRequest(
                "cmd",
                self.topics.outbound,
                recipient,
                cid,
                auth.action,
                auth.signed_command,
                auth.issued_at,
                auth.expires_at,
                profile,
            )
            envelope: PreparedEnvelope | PreparedMessage
            if self.sealer_v2 is not None and WIRE2_CAPABILITY in recipient.capabilities:
                envelope = self.sealer_v2.prepare(request)
            else:
                envelope = self.sealer.prepare(request)
        except FleetbusError as exc:
            result = _reject(
                self.name,
                self.topics,
                record,
                cid,
                exc.reason,
                f"cannot seal for {vehicle}: {exc.reason.value}",
                now,
                issuer=auth.issuer,
                vehicle_id=vehicle,
            )
            result.audit = self._failover_audit(cid, vehicle) + result.audit
            return result
        return _Prepared(
            record, auth, recipient, profile, envelope, self._failover_audit(cid, vehicle)
        )

    def _refused(self, item: _Prepared, exc: FleetbusError, now: float) -> StageResult:
        auth = item.auth
        result = _reject(
            self.name,
            self.topics,
            item.record,
            auth.command_id,
            exc.reason,
            f"cannot seal for {auth.vehicle_id}: {exc.reason.value}",
            now,
            issuer=auth.issuer,
            vehicle_id=auth.vehicle_id,
        )
        result.audit = item.failovers + result.audit
        return result

    def _sealed(self, item: _Prepared, records: Sequence[bytes], now: float) -> StageResult:
        """``records``: what goes on the vehicle's partition, in order (v2: an establishment
        may precede the message)."""
        auth, profile, path = item.auth, item.profile, item.envelope.key_path
        cid, vehicle = auth.command_id, auth.vehicle_id
        on_commit(KEYPATH_SELECTED.labels(profile=profile.name, path=path).inc)
        legacy = "pqc" not in item.recipient.capabilities
        detail = f"profile {profile.name}, key path {path}" + (
            " (legacy: vehicle has no pqc capability)" if legacy else ""
        )
        audit_detail: dict[str, Any] = {
            "vehicle": vehicle,
            "profile": profile.name,
            "key_path": path,
            "legacy": legacy,
        }
        outputs: list[Output] = []
        if isinstance(item.envelope, PreparedMessage):
            # v2: the command id stays inside the ciphertext, so no Kafka header names it; the
            # audit record ties the command to its epoch and sequence number instead.
            audit_detail.update(
                wire=2, epoch=item.envelope.epoch_id.hex(), sequence=item.envelope.sequence
            )
            for value in records[:-1]:
                outputs.append(Output(self.topics.outbound, vehicle.encode(), value))
                outputs.append(Output(self.topics.responses, vehicle.encode(), value))
            outputs.append(Output(self.topics.outbound, vehicle.encode(), records[-1]))
        else:
            outputs.append(
                Output(
                    self.topics.outbound,
                    vehicle.encode(),
                    records[-1],
                    headers=(("fleetbus-command-id", cid.encode()),),
                )
            )
        return StageResult(
            outputs=[
                *outputs,
                _status(
                    self.topics, cid, CommandState.SEALED, now, detail=detail, vehicle_id=vehicle
                ),
            ],
            audit=[
                *item.failovers,
                AuditEvent(actor="bus", event="sealed", command_id=cid, detail=audit_detail),
            ],
        )

    def _failover_audit(self, cid: str, vehicle: str) -> list[AuditEvent]:
        events = [
            AuditEvent(
                actor="bus",
                event="keypath_failover",
                command_id=cid,
                reason=e.reason,
                detail={
                    "vehicle": vehicle,
                    "profile": e.profile,
                    "from_path": e.from_path.name,
                    "to_path": e.to_path.name if e.to_path else None,
                },
            )
            for e in self._failovers
        ]
        self._failovers.clear()
        return events

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        return StageResult()


class UplinkOpener:
    """Opens vehicle-to-bus envelopes with the minimum key path the sender's capabilities
    allow: ``pqc_minimum`` for vehicles with the pqc capability, ``legacy_minimum`` otherwise.
    (Key-path minimums are by containment, so one minimum cannot cover xwing and x25519.)

    The openers must not check replays themselves (``check_replay=False``): the stage that
    reads the topic owns that check, in its transactional partition state (``UplinkReplay``).
    """

    def __init__(
        self, directory: Any, pqc_opener: Any, legacy_opener: Any, clock: Any = None
    ) -> None:
        import time

        self.directory = directory
        self.pqc = pqc_opener
        self.legacy = legacy_opener
        self._clock = clock or time.time

    @property
    def checks_replay(self) -> bool:
        return any(getattr(o, "checks_replay", False) for o in (self.pqc, self.legacy))

    def open(self, data: bytes, *, topic: str) -> Any:
        try:
            sender = decode_envelope(data).header.sender
            record = self.directory.current(sender, at=self._clock())
            capable = "pqc" in record.capabilities
        except EnvelopeError:
            raise
        except Exception:
            capable = True  # unknown sender: the stricter opener rejects it with its reason
        opened = (self.pqc if capable else self.legacy).open(data, topic=topic)
        # The sender is authenticated now; its key being in the directory is not enough: only
        # the fleet's side (vehicles, edge units) speaks on the uplink. A dispatcher's or the
        # sealer's key must not produce telemetry or outcomes, even under its own id.
        kind = self.directory.current(opened.sender, at=self._clock()).kind
        if kind not in _UPLINK_KINDS:
            raise EnvelopeError(
                f"uplink sender {opened.sender!r} is a {kind}, not a vehicle or edge unit",
                reason=ReasonCode.POLICY_DENIED,
            )
        return opened


_UPLINK_KINDS: Final = frozenset({"vehicle", "edge"})


def _stage_owns_replay(stage: str, opener: Any) -> None:
    if getattr(opener, "checks_replay", False):
        # An in-memory replay set is not rolled back with an aborted transaction: the batch,
        # read again, would be refused as replayed and its responses lost (issue 14, item 2).
        raise ConfigError(
            f"{stage} stage: its opener keeps its own replay set; build the openers with "
            "check_replay=False (the stage keeps the replay state in its partition state)"
        )


def _refusal_detail(reason: ReasonCode, sender: str, message_id: str, limits: UplinkLimits) -> str:
    if reason is ReasonCode.REPLAYED:
        return f"message id {message_id} from {sender} was already accepted"
    return (
        f"{sender} has {limits.ids_per_sender} live message ids in this partition's replay "
        "state; refused until some expire"
    )


# --- track ---------------------------------------------------------------------------------

_ACTIVE: Final = frozenset({"authorized", "sealed", "delivered"})
_FINAL: Final = frozenset({"succeeded", "failed", "rejected", "expired"})
#: ``hold/<command id>/<vehicle key>``: a response from a vehicle no authorized record names yet.
_HOLD: Final = "hold/"
#: ``up/h/<vehicle key>``: held responses of that vehicle in this partition.
_HELD_COUNT: Final = "up/h/"
#: ``est/<vehicle key>/<epoch id hex>``: a v2 establishment the seal stage sent to that vehicle,
#: kept until the epoch ends to be sent again when the vehicle reports it unknown.
_EST: Final = "est/"
#: ``est-sent/<vehicle key>/<epoch id hex>``: when it was last sent again (one per interval).
_EST_SENT: Final = "est-sent/"
#: Seconds between two re-deliveries of one establishment, however many statuses ask for it.
EST_RESEND_INTERVAL_S: Final = 10.0


class TrackStage:
    """authorized + status + responses → delivered / succeeded / failed / expired events.

    State ``cmd/<id>``: issued/expiry times, each target vehicle's state and ``single`` (the
    command names one vehicle, so the target set is complete with its authorized record).

    A response counts only from a vehicle the command was sealed to — one that an authorized
    record or a ``sealed`` status event names. The three topics race, so a response from any
    other vehicle is held (``hold/<id>/<vehicle>``, at most ``held_per_sender`` per vehicle)
    until that vehicle's authorized record or sealed event arrives (then it counts) or the
    response expires (then it goes to the DLQ as ``policy_denied``); once the target set is
    known to be complete it is refused at once. Responses must be keyed by their command id
    (their replay state and their command's state live on that partition); the replay state is
    ``UplinkReplay`` in this partition state. The tick marks vehicles still active after
    expiry + skew as expired, judges expired held responses and forgets expired replay ids.
    """

    name = "track"

    def __init__(
        self,
        *,
        topics: PipelineTopics,
        opener: Any,  # UplinkOpener of the bus sealer principal, without its own replay check
        clock_skew_s: float,
        max_message_bytes: int,
        retention_s: float = 300.0,
        limits: UplinkLimits | None = None,
        sealer_principal: str | None = None,
    ) -> None:
        _stage_owns_replay(self.name, opener)
        self.topics = topics
        self.opener = opener
        # The bus's sealer id: whose v2 establishments this stage keeps for re-delivery, and
        # to whom vehicles address their epoch statuses. None: v2 records are not read here.
        self.sealer_principal = sealer_principal
        self._roots = VerifiedRoots(1024)
        self.skew_s = clock_skew_s
        self.max_bytes = max_message_bytes
        self.retention_s = retention_s
        self.limits = limits or UplinkLimits()
        self.replay = UplinkReplay(limits=self.limits, skew_s=clock_skew_s)

    def input_topics(self) -> Sequence[str]:
        return [self.topics.authorized, self.topics.status, self.topics.responses]

    @staticmethod
    def _load(state: PartitionState, cid: str) -> dict[str, Any]:
        raw = state.get(f"cmd/{cid}")
        if raw is None:
            return {"issued_at": 0, "expires_at": 0, "vehicles": {}}
        value: dict[str, Any] = cbor2.loads(raw)
        return value

    @staticmethod
    def _store(state: PartitionState, cid: str, entry: Mapping[str, Any]) -> None:
        state.put(f"cmd/{cid}", _dumps(dict(entry)))

    @staticmethod
    def _hold_key(cid: str, vid: str) -> str:
        return f"{_HOLD}{cid}/{sender_key('', vid)}"

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if record.topic == self.topics.authorized:
            return self._authorized(record, state, now)
        if record.topic == self.topics.status:
            return self._status(record, state, now)
        return self._response(record, state, now)

    def _authorized(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        auth = AuthorizedCommand.decode(record.value)
        target = SignedCommand.decode(auth.signed_command, max_size=self.max_bytes).command.target
        entry = self._load(state, auth.command_id)
        entry["issued_at"] = _ms(auth.issued_at)
        entry["expires_at"] = _ms(auth.expires_at)
        # Where the bus's own latency starts: after any approval wait (docs/observability.md).
        entry.setdefault("authorized_at", _ms(now))
        entry["vehicles"].setdefault(auth.vehicle_id, "authorized")
        if target.vehicle is not None:
            entry["single"] = True
        self._store(state, auth.command_id, entry)
        return self._release_held(state, auth.command_id, auth.vehicle_id, now)

    def _status(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        event = StatusEvent.decode(record.value or b"", max_size=self.max_bytes)
        state_name = str(event.state)
        cid = event.command_id
        if event.state is CommandState.REJECTED and event.reason is ReasonCode.REPLAYED:
            return StageResult()  # a replay says nothing about the original command
        if state_name not in {"sealed", "rejected"}:
            return StageResult()  # our own events, or the authorize stage's (seen via authorized)
        entry = self._load(state, cid)
        vehicles: dict[str, str] = entry["vehicles"]
        targets = [event.vehicle_id] if event.vehicle_id else list(vehicles) or [""]
        for vid in targets:
            if vehicles.get(vid) in _FINAL:
                continue
            vehicles[vid] = state_name
            if state_name == "rejected":
                self._observe(cid, entry, "rejected", now)
        if not entry["expires_at"]:
            entry["expires_at"] = _ms(now + self.retention_s)
        self._store(state, cid, entry)
        if state_name == "sealed" and event.vehicle_id:
            # The bus sealed the command to this vehicle: a response it sent first now counts.
            return self._release_held(state, cid, event.vehicle_id, now)
        return StageResult()

    def _observe(self, cid: str, entry: Mapping[str, Any], outcome: str, now: float) -> None:
        try:
            issued = entry["issued_at"] / 1000 or uuid7_timestamp_ms(cid) / 1000
        except FleetbusError:
            return
        on_commit(partial(COMMAND_LATENCY.labels(outcome=outcome).observe, max(0.0, now - issued)))

    def _response(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        def dlq(reason: ReasonCode, detail: str, **kw: Any) -> StageResult:
            return dead_letter_result(
                self.name, self.topics.dlq, record, reason, detail, now=now, **kw
            )

        if record.value is None:
            return dlq(ReasonCode.MALFORMED, "empty record")
        try:
            version = record_version(record.value, max_size=self.max_bytes)
        except EnvelopeError:
            version = 1  # the opener refuses it with its own reason
        if version == 2:
            return self._v2(record, state, now)
        try:
            opened = self.opener.open(record.value, topic=self.topics.responses)
        except EnvelopeError as exc:
            on_commit(ENVELOPE_REJECTS.labels(role="bus", reason=exc.reason.value).inc)
            return dlq(exc.reason, f"response envelope rejected: {exc.reason.value}")
        try:
            response = Response.decode(opened.payload, max_size=self.max_bytes)
        except FleetbusError as exc:
            return dlq(exc.reason, f"response payload: {exc}")
        if response.vehicle_id != opened.sender or response.command_id != opened.message_id:
            return dlq(ReasonCode.WRONG_RECIPIENT, "response names another vehicle or command")
        cid, vid = response.command_id, response.vehicle_id
        if not _keyed_by(record, cid):
            # The command's state and the response's replay state live on the partition of the
            # command id: under another key the response would meet neither.
            return dlq(ReasonCode.MALFORMED, "record key must be the command id")
        refused = self.replay.admit(state, vid, opened.message_id, opened.expires_at, now)
        if refused is not None:
            ENVELOPE_REJECTS.labels(role="bus", reason=refused.value).inc()
            detail = _refusal_detail(refused, vid, opened.message_id, self.limits)
            return dlq(refused, detail, actor=vid, command_id=cid)
        entry = self._load(state, cid)
        if vid in entry["vehicles"]:
            return self._apply(state, entry, response, opened.key_path.name, now)
        if entry.get("single") or "" in entry["vehicles"]:
            # The target set is complete (one vehicle, or rejected before any was named).
            return dlq(
                ReasonCode.POLICY_DENIED,
                f"{vid} was not a target of this command",
                actor=vid,
                command_id=cid,
            )
        return self._hold(record, state, response, opened, now)

    def _v2(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        """A v2 record on commands.responses: the seal stage's copy of an establishment (kept),
        or a vehicle's ``epoch_unknown`` status (answered with that establishment)."""

        def dlq(reason: ReasonCode, detail: str, **kw: Any) -> StageResult:
            on_commit(ENVELOPE_REJECTS.labels(role="bus", reason=reason.value).inc)
            return dead_letter_result(
                self.name, self.topics.dlq, record, reason, detail, now=now, **kw
            )

        value = record.value or b""
        directory = self.opener.directory
        if self.sealer_principal is None:
            return dlq(ReasonCode.UNSUPPORTED_VERSION, "wire format v2 is not read by this stage")
        try:
            parsed = decode_record(value, max_size=self.max_bytes)
            if isinstance(parsed, Message):
                raise EnvelopeError(
                    "v2 responses are not written by this release's vehicle agents",
                    reason=ReasonCode.UNSUPPORTED_VERSION,
                )
            if isinstance(parsed, ParsedEstablishment):
                est = parsed.establishment
                if (
                    est.sender != self.sealer_principal
                    or est.direction is not Direction.DOWNLINK
                    or est.topic != self.topics.outbound
                    or record.key != est.recipient.encode()
                ):
                    raise EnvelopeError(
                        "not a downlink establishment of this bus under its vehicle's key",
                        reason=ReasonCode.WRONG_RECIPIENT,
                    )
                verifier = directory_verifier(
                    directory, est.sender, est.sender_key_id, est.signature_suite, now
                )
                verify_signed_record(
                    parsed, verifier, est.sender, est.sender_key_id, self._roots, now
                )
                key = f"{sender_key(_EST, est.recipient)}/{est.epoch_id.hex()}"
                until = est.not_after_ms + _ms(self.skew_s)
                state.put(key, _dumps({"until": until, "record": value}))
                return StageResult()
            assert isinstance(parsed, ParsedStatus)
            status = open_status(
                value,
                topic=self.topics.responses,
                own_id=self.sealer_principal,
                directory=directory,
                clock=lambda: now,
                skew_s=self.skew_s,
                max_size=self.max_bytes,
                roots=self._roots,
            )
            if record.key != status.sender.encode():
                raise EnvelopeError(
                    "a status must be keyed by its sender", reason=ReasonCode.MALFORMED
                )
            if directory.current(status.sender, at=now).kind not in _UPLINK_KINDS:
                raise EnvelopeError(
                    f"{status.sender!r} is not a vehicle or edge unit",
                    reason=ReasonCode.POLICY_DENIED,
                )
        except EnvelopeError as exc:
            return dlq(exc.reason, f"v2 record rejected: {exc.reason.value}")
        except FleetbusError as exc:
            return dlq(exc.reason, f"v2 record rejected: {exc.reason.value}")
        vid, epoch = status.sender, status.epoch_id.hex()
        detail: dict[str, str | int] = {
            "vehicle": vid,
            "epoch": epoch,
            "sequence": status.sequence,
        }
        raw = state.get(f"{sender_key(_EST, vid)}/{epoch}")
        if raw is None:
            # Past its end, or never sent by this bus: the vehicle's held messages expire
            # and their commands are reported expired; the next command opens a new epoch.
            return StageResult(
                audit=[AuditEvent("bus", "epoch_unknown", None, ReasonCode.EPOCH_UNKNOWN, detail)]
            )
        sent_key = f"{sender_key(_EST_SENT, vid)}/{epoch}"
        last = state.get(sent_key)
        if last is not None and now - cbor2.loads(last) < EST_RESEND_INTERVAL_S:
            return StageResult()
        state.put(sent_key, _dumps(now))
        return StageResult(
            outputs=[Output(self.topics.outbound, vid.encode(), cbor2.loads(raw)["record"])],
            audit=[AuditEvent("bus", "epoch_redelivered", None, None, detail)],
        )

    def _hold(
        self,
        record: InputRecord,
        state: PartitionState,
        response: Response,
        opened: Any,
        now: float,
    ) -> StageResult:
        cid, vid = response.command_id, response.vehicle_id
        key = self._hold_key(cid, vid)
        result = StageResult()
        old = state.get(key)
        if old is not None:
            # An expired hold of an earlier envelope with this id that the tick has not judged
            # yet: judge it now rather than overwrite it.
            result.extend(self._judge_held(state, key, cbor2.loads(old), now))
        count_key = sender_key(_HELD_COUNT, vid)
        if read_count(state, count_key) >= self.limits.held_per_sender:
            full = dead_letter_result(
                self.name,
                self.topics.dlq,
                record,
                ReasonCode.SENDER_STATE_FULL,
                f"{vid} has {self.limits.held_per_sender} held responses in this partition; "
                "refused until some are judged",
                now=now,
                actor=vid,
                command_id=cid,
            )
            ENVELOPE_REJECTS.labels(role="bus", reason=ReasonCode.SENDER_STATE_FULL.value).inc()
            result.extend(full)
            result.outcome = full.outcome
            return result
        add_to_count(state, count_key, 1)
        until = _ms(opened.expires_at + self.skew_s)
        held = {
            "until": until,
            "command_id": cid,
            "vehicle": vid,
            "payload": opened.payload,
            "key_path": opened.key_path.name,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "key": record.key,
            "value": record.value,
        }
        state.put(key, _dumps(held))
        result.audit.append(
            AuditEvent(
                actor=vid,
                event="response_held",
                command_id=cid,
                detail={"reason": "no authorized record names this vehicle yet"},
            )
        )
        result.outcome = "pending"
        return result

    def _release_held(self, state: PartitionState, cid: str, vid: str, now: float) -> StageResult:
        """The response ``vid`` sent before it was known as a target, counted now."""
        key = self._hold_key(cid, vid)
        raw = state.get(key)
        if raw is None:
            return StageResult()
        return self._judge_held(state, key, cbor2.loads(raw), now)

    def _judge_held(
        self, state: PartitionState, key: str, held: Mapping[str, Any], now: float
    ) -> StageResult:
        cid, vid = str(held["command_id"]), str(held["vehicle"])
        state.delete(key)
        add_to_count(state, sender_key(_HELD_COUNT, vid), -1)
        entry = self._load(state, cid)
        if vid in entry["vehicles"]:
            response = Response.decode(bytes(held["payload"]), max_size=self.max_bytes)
            return self._apply(state, entry, response, str(held["key_path"]), now)
        record = InputRecord(
            str(held["topic"]),
            int(held["partition"]),
            int(held["offset"]),
            held["key"],
            held["value"],
        )
        return dead_letter_result(
            self.name,
            self.topics.dlq,
            record,
            ReasonCode.POLICY_DENIED,
            f"{vid} was not a target of this command (no authorized record named it before "
            "its response expired)",
            now=now,
            actor=vid,
            command_id=cid,
        )

    def _apply(
        self,
        state: PartitionState,
        entry: dict[str, Any],
        response: Response,
        key_path: str,
        now: float,
    ) -> StageResult:
        cid, vid = response.command_id, response.vehicle_id
        vehicles: dict[str, str] = entry["vehicles"]
        if vehicles.get(vid) in _FINAL:
            return StageResult(audit=[AuditEvent(vid, "duplicate_response", cid)])
        if response.status in (102, 202):
            new_state = CommandState.DELIVERED
        elif response.succeeded:
            new_state = CommandState.SUCCEEDED
        else:
            new_state = CommandState.FAILED
        vehicles[vid] = str(new_state)
        self._store(state, cid, entry)
        if new_state is not CommandState.DELIVERED:
            self._observe(cid, entry, str(new_state), now)
            if entry.get("authorized_at"):
                latency = max(0.0, now - entry["authorized_at"] / 1000)
                on_commit(partial(BUS_LATENCY.labels(outcome=str(new_state)).observe, latency))
        detail = f"status {response.status}" + (f": {response.detail}" if response.detail else "")
        return StageResult(
            outputs=[
                _status(
                    self.topics,
                    cid,
                    new_state,
                    now,
                    detail=detail,
                    vehicle_id=vid,
                    reason=None,
                )
            ],
            audit=[
                AuditEvent(
                    actor=vid,
                    event=str(new_state),
                    command_id=cid,
                    detail={"status": response.status, "key_path": key_path},
                )
            ],
        )

    def deadline(self, key: str, value: bytes) -> float | None:
        """When ``tick`` must look at a command: at expiry + skew while a vehicle is still
        active (to expire it), then at the end of the retention (to forget the command); a
        held response, a kept establishment and an uplink id when they end."""
        if key.startswith((_HOLD, _EST)):
            return stored_until(value) / 1000
        if not key.startswith("cmd/"):
            return self.replay.deadline(key, value)
        entry: dict[str, Any] = cbor2.loads(value)
        expires: float = entry["expires_at"] / 1000
        if not expires:
            return None
        if any(state in _ACTIVE for state in entry["vehicles"].values()):
            return expires + self.skew_s
        return expires + self.skew_s + self.retention_s

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        result = StageResult()
        now_ms = _ms(now)
        due = state.due(now, self.deadline)
        # Held responses first: one received before expiry counts before "expired" is decided.
        for key in due:
            if not key.startswith(_HOLD):
                continue
            raw = state.get(key)
            if raw is None:
                continue
            held = cbor2.loads(raw)
            if held["until"] < now_ms:
                result.extend(self._judge_held(state, key, held, now))
        for key in due:
            if not key.startswith(_EST):
                continue
            raw = state.get(key)
            if raw is not None and cbor2.loads(raw)["until"] < now_ms:
                state.delete(key)
                state.delete(_EST_SENT + key.removeprefix(_EST))
        self.replay.expire(state, due, now)
        for key in due:
            if not key.startswith("cmd/"):
                continue
            raw = state.get(key)
            if raw is None:
                continue
            cid = key.removeprefix("cmd/")
            entry: dict[str, Any] = cbor2.loads(raw)
            expires = entry["expires_at"] / 1000
            if not expires or now <= expires + self.skew_s:
                continue
            vehicles: dict[str, str] = entry["vehicles"]
            changed = False
            for vid, current in sorted(vehicles.items()):
                if current in _ACTIVE:
                    vehicles[vid] = "expired"
                    changed = True
                    self._observe(cid, entry, "expired", now)
                    result.outputs.append(
                        _status(
                            self.topics,
                            cid,
                            CommandState.EXPIRED,
                            now,
                            detail=f"no final response before expiry (last: {current})",
                            reason=ReasonCode.EXPIRED,
                            vehicle_id=vid or None,
                        )
                    )
                    result.audit.append(
                        AuditEvent(
                            "bus", "expired", cid, ReasonCode.EXPIRED.value, {"vehicle": vid}
                        )
                    )
            if changed:
                self._store(state, cid, entry)
            elif now > expires + self.skew_s + self.retention_s:
                state.delete(key)
        return result


# --- telemetry -----------------------------------------------------------------------------


class TelemetryStage:
    """telemetry.raw (envelopes of kind tel) → telemetry.verified (JSON after export policy).

    Records must be keyed by the sending vehicle: its replay state (``UplinkReplay``, in this
    stage's changelogged partition state) lives on that partition, so a captured envelope
    re-published later, after a restart or a rebalance, is refused as ``replayed``.
    """

    name = "telemetry"

    def __init__(
        self,
        *,
        topics: PipelineTopics,
        opener: Any,  # UplinkOpener without its own replay check
        policy: PolicyEngine,
        consumer: str,
        max_message_bytes: int,
        clock_skew_s: float = 30.0,
        limits: UplinkLimits | None = None,
        v2_openers: tuple[Any, Any] | None = None,  # EpochOpener (pqc minimum, legacy minimum)
    ) -> None:
        _stage_owns_replay(self.name, opener)
        self.topics = topics
        self.opener = opener
        self.policy = policy
        self.consumer = consumer
        self.max_bytes = max_message_bytes
        self.limits = limits or UplinkLimits()
        self.replay = UplinkReplay(limits=self.limits, skew_s=clock_skew_s)
        # Wire format v2 uplink: epochs in the partition state, secrets only in memory.
        self.v2_openers = v2_openers
        self.skew_ms = _ms(clock_skew_s)
        self._secrets: dict[bytes, bytes] = {}

    def input_topics(self) -> Sequence[str]:
        return [self.topics.telemetry_raw]

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        def dlq(reason: ReasonCode, detail: str, **kw: Any) -> StageResult:
            return dead_letter_result(
                self.name, self.topics.dlq, record, reason, detail, now=now, **kw
            )

        if record.value is None:
            return dlq(ReasonCode.MALFORMED, "empty record")
        try:
            version = record_version(record.value, max_size=self.max_bytes)
        except EnvelopeError:
            version = 1  # the opener refuses it with its own reason
        if version == 2:
            return self._v2(record, state, now)
        try:
            opened = self.opener.open(record.value, topic=self.topics.telemetry_raw)
        except EnvelopeError as exc:
            on_commit(ENVELOPE_REJECTS.labels(role="bus", reason=exc.reason.value).inc)
            return dlq(exc.reason, f"telemetry envelope rejected: {exc.reason.value}")
        try:
            telemetry = Telemetry.decode(opened.payload, max_size=self.max_bytes)
        except FleetbusError as exc:
            return dlq(exc.reason, f"telemetry payload: {exc}")
        if telemetry.vehicle_id != opened.sender:
            return dlq(ReasonCode.WRONG_RECIPIENT, "telemetry names another vehicle")
        sender = opened.sender
        if record.key != sender.encode():
            # The replay state is per partition: under another key the envelope would land on
            # a partition that has not seen it.
            return dlq(ReasonCode.MALFORMED, "record key must be the sending vehicle")
        refused = self.replay.admit(state, sender, opened.message_id, opened.expires_at, now)
        if refused is not None:
            ENVELOPE_REJECTS.labels(role="bus", reason=refused.value).inc()
            detail = _refusal_detail(refused, sender, opened.message_id, self.limits)
            return dlq(refused, detail, actor=sender)
        return StageResult(outputs=[self._export(telemetry, opened.key_path.name)])

    def _export(self, telemetry: Telemetry, key_path: str) -> Output:
        exported = self.policy.export(self.consumer, telemetry.fields)
        doc = {
            "vehicle_id": telemetry.vehicle_id,
            "at": telemetry.at,
            "consumer": self.consumer,
            "key_path": key_path,
            "fields": exported,
        }
        value = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return Output(self.topics.telemetry_verified, telemetry.vehicle_id.encode(), value)

    def _v2(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        """A wire-v2 uplink record: a vehicle's establishment (its epoch goes into this
        partition's state) or a message carrying a ``TelemetryBatch`` (exported per reading).
        The replay window of the epoch, in the same state, replaces ``UplinkReplay`` here."""

        def dlq(reason: ReasonCode, detail: str, **kw: Any) -> StageResult:
            on_commit(ENVELOPE_REJECTS.labels(role="bus", reason=reason.value).inc)
            return dead_letter_result(
                self.name, self.topics.dlq, record, reason, detail, now=now, **kw
            )

        if self.v2_openers is None:
            return dlq(ReasonCode.UNSUPPORTED_VERSION, "wire format v2 is not read by this stage")
        value, topic = record.value or b"", self.topics.telemetry_raw
        directory = self.opener.directory
        pqc, legacy = self.v2_openers
        store = StateEpochStore(state, self._secrets, pqc.rederive, skew_ms=self.skew_ms)
        try:
            parsed = decode_record(value, max_size=self.max_bytes)
            if isinstance(parsed, ParsedEstablishment):
                sender = parsed.establishment.sender
                if record.key != sender.encode():
                    raise EnvelopeError(
                        "record key must be the sending vehicle", reason=ReasonCode.MALFORMED
                    )
                entry = directory.current(sender, at=now)
                if entry.kind not in _UPLINK_KINDS:
                    raise EnvelopeError(
                        f"uplink sender {sender!r} is a {entry.kind}, not a vehicle or edge unit",
                        reason=ReasonCode.POLICY_DENIED,
                    )
                opener = pqc if "pqc" in entry.capabilities else legacy
                count_key = sender_key(EPOCH_COUNT_PREFIX, sender)
                if read_count(state, count_key) >= EPOCHS_PER_SENDER:
                    on_commit(ENVELOPE_REJECTS.labels(role="bus", reason="sender_state_full").inc)
                    return dead_letter_result(
                        self.name, self.topics.dlq, record, ReasonCode.SENDER_STATE_FULL,
                        f"{sender} holds {EPOCHS_PER_SENDER} uplink epochs in this partition; "
                        "refused until one ends", now=now, actor=sender,
                    )  # fmt: skip
                accepted = opener.open(value, topic=topic, store=store)
                if accepted.new:
                    add_to_count(state, count_key, 1)
                return StageResult()
            if not isinstance(parsed, Message):
                raise EnvelopeError("a status record on telemetry.raw", reason=ReasonCode.MALFORMED)
            opened = pqc.open(value, topic=topic, store=store)
        except FleetbusError as exc:
            return dlq(exc.reason, f"telemetry v2 record rejected: {exc.reason.value}")
        sender = opened.sender
        if record.key != sender.encode():
            return dlq(ReasonCode.MALFORMED, "record key must be the sending vehicle")
        if opened.kind is not MessageKind.TELEMETRY:
            return dlq(ReasonCode.WRONG_RECIPIENT, "not a telemetry message")
        try:
            batch = TelemetryBatch.decode(opened.payload, max_size=self.max_bytes)
        except FleetbusError as exc:
            return dlq(exc.reason, f"telemetry batch: {exc}", actor=sender)
        if batch.vehicle_id != sender:
            return dlq(ReasonCode.WRONG_RECIPIENT, "telemetry names another vehicle")
        path = opened.key_path.name
        return StageResult(outputs=[self._export(t, path) for t in batch.telemetry()])

    def deadline(self, key: str, value: bytes) -> float | None:
        """When ``tick`` must look at a state entry: an uplink id or epoch when it ends."""
        if key.startswith(EPOCH_PREFIX):
            return stored_until(value) / 1000
        return self.replay.deadline(key, value)

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        due = state.due(now, self.deadline)
        self.replay.expire(state, due, now)
        for key in due:
            if not key.startswith(EPOCH_PREFIX):
                continue
            raw = state.get(key)
            if raw is not None and stored_until(raw) < _ms(now):
                state.delete(key)  # the epoch ended: its window and record go
                sender = cbor2.loads(raw)["sender"]
                add_to_count(state, sender_key(EPOCH_COUNT_PREFIX, sender), -1)
        return StageResult()


def profile_from_settings(
    name: str, key_paths: Sequence[str], allow_fallback: bool, minimum_path: str, suite: str
) -> SecurityProfile:
    return SecurityProfile(
        name=name,
        key_paths=[KeyPath.parse(p) for p in key_paths],
        signature_suite=suite,
        allow_fallback=allow_fallback,
        minimum_path=KeyPath.parse(minimum_path),
    )
