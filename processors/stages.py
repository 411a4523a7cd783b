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
from typing import Any, Final

import cbor2

from fleetbus.bus.commands import (
    CommandState,
    Decision,
    Response,
    SignedApproval,
    SignedCommand,
    StatusEvent,
    Telemetry,
    uuid7_timestamp_ms,
)
from fleetbus.bus.envelope import EnvelopeError, decode_envelope
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import KeyPath, RecipientKeys, SecurityProfile
from fleetbus.observability.metrics import (
    COMMAND_LATENCY,
    ENVELOPE_REJECTS,
    KEYPATH_FAILOVER,
    KEYPATH_SELECTED,
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
from fleetbus.providers.keypath import FailoverEvent
from fleetbus.providers.sealing import PreparedEnvelope, SealRequest

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
_SIGNER_REASONS: Final = frozenset(
    {
        ReasonCode.UNKNOWN_SIGNER,
        ReasonCode.SIGNER_REVOKED,
        ReasonCode.SIGNER_EXPIRED,
        ReasonCode.BAD_SIGNATURE,
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


@dataclass
class _CommandEntry:
    """What the authorize stage remembers per command id (state value, CBOR)."""

    status: str  # pending | authorized | rejected
    until: float  # forget after (expiry + skew): the replay window
    issuer: str
    window_until: float = 0.0
    signed: bytes = b""
    approvers: list[str] = field(default_factory=list)
    offset: int = -1
    partition: int = -1

    def encode(self) -> bytes:
        return _dumps(
            {
                "status": self.status,
                "until": _ms(self.until),
                "issuer": self.issuer,
                "window_until": _ms(self.window_until),
                "signed": self.signed,
                "approvers": self.approvers,
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
            approvers=list(m["approvers"]),
            offset=m["offset"],
            partition=m["partition"],
        )


class AuthorizeStage:
    """commands.requested + commands.approvals → authorized (one per vehicle) | rejected.

    State per partition (changelogged): ``cmd/<id>`` for every command id whose signature
    verified (the replay set, kept until expiry + skew; pending commands with their approvals)
    and ``apr/<id>`` for approvals that arrived before their command.
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
    ) -> None:
        self.topics = topics
        self.directory = directory
        self.policy = policy
        self.approvals_required = approvals_required
        self.window_s = approval_window_s
        self.skew_s = clock_skew_s
        self.max_lifetime_s = max_lifetime_s
        self.max_bytes = max_message_bytes

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
        early = state.get(f"apr/{cid}")
        if early is not None:
            entry.approvers = [a for a in cbor2.loads(early)["approvers"] if a != issuer]
            state.delete(f"apr/{cid}")
        result = self._decide(record, signed, entry, state, now)
        return result

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
                entry.status = "rejected"
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
                entry.status = "rejected"
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
            approvals=len(entry.approvers),
            required_approvals=self.approvals_required,
            now=now,
        )
        if decision.outcome == "deny":
            entry.status = "rejected"
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
                            "approvals": len(entry.approvers),
                            "required": self.approvals_required,
                        },
                    )
                ],
                outcome="pending",
            )
        entry.status = "authorized"
        entry.signed = b""  # the replay set needs only the id
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
                    approvers=tuple(entry.approvers),
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
                        "approvers": ",".join(entry.approvers),
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
        raw = state.get(f"cmd/{cid}")
        if raw is None:
            # Approval before its command: keep it for one window.
            early_raw = state.get(f"apr/{cid}")
            early: dict[str, Any] = (
                cbor2.loads(early_raw) if early_raw else {"approvers": [], "until": 0}
            )
            if approval.decision is Decision.APPROVE and approver not in early["approvers"]:
                early["approvers"].append(approver)
            early["until"] = _ms(now + self.window_s)
            state.put(f"apr/{cid}", _dumps(early))
            return StageResult(
                audit=[
                    AuditEvent(
                        approver, "approval_early", cid, detail={"decision": str(approval.decision)}
                    )
                ]
            )
        entry = _CommandEntry.decode(raw)
        if entry.status != "pending":
            return StageResult(
                audit=[
                    AuditEvent(approver, "approval_ignored", cid, detail={"status": entry.status})
                ]
            )
        signed_command = SignedCommand.decode(entry.signed, max_size=self.max_bytes)
        target = signed_command.command.target
        if approver == entry.issuer:
            return self._dlq(
                record,
                ReasonCode.POLICY_DENIED,
                "an issuer cannot approve its own command",
                now,
                actor=approver,
                command_id=cid,
            )
        if not self.policy.may_approve(approver, vehicle=target.vehicle, group=target.group):
            return self._dlq(
                record,
                ReasonCode.POLICY_DENIED,
                f"{approver} may not approve this command",
                now,
                actor=approver,
                command_id=cid,
            )
        if now > entry.window_until or approval.issued_at > entry.window_until:
            return self._dlq(
                record,
                ReasonCode.POLICY_DENIED,
                "approval arrived after the window",
                now,
                actor=approver,
                command_id=cid,
            )
        command_record = InputRecord(
            self.topics.requested, entry.partition, entry.offset, cid.encode(), entry.signed
        )
        if approval.decision is Decision.DENY:
            entry.status = "rejected"
            entry.signed = b""
            state.put(f"cmd/{cid}", entry.encode())
            return _reject(
                self.name,
                self.topics,
                command_record,
                cid,
                ReasonCode.POLICY_DENIED,
                f"denied by approver {approver}",
                now,
                issuer=entry.issuer,
            )
        if approver in entry.approvers:
            return StageResult(audit=[AuditEvent(approver, "approval_duplicate", cid)])
        entry.approvers.append(approver)
        result = self._decide(command_record, signed_command, entry, state, now)
        result.audit.insert(
            0, AuditEvent(approver, "approved", cid, detail={"count": len(entry.approvers)})
        )
        return result

    # -- timers ---------------------------------------------------------------------------

    def deadline(self, key: str, value: bytes) -> float | None:
        """When ``tick`` must look at a state entry: a pending command when its approval window
        closes, any other command when its replay window ends, an early approval when it
        expires (the conditions ``tick`` checks, from the same rounded values)."""
        if key.startswith("apr/"):
            until_ms: int = cbor2.loads(value)["until"]
            return until_ms / 1000
        if not key.startswith("cmd/"):
            return None
        entry = _CommandEntry.decode(value)
        return entry.window_until if entry.status == "pending" else entry.until

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        result = StageResult()
        for key in state.due(now, self.deadline):
            raw = state.get(key)
            if raw is None:
                continue
            if key.startswith("apr/"):
                if cbor2.loads(raw)["until"] / 1000 < now:
                    state.delete(key)
                continue
            entry = _CommandEntry.decode(raw)
            cid = key.removeprefix("cmd/")
            if entry.status == "pending" and now > entry.window_until:
                entry.status = "rejected"
                signed, entry.signed = entry.signed, b""
                state.put(key, entry.encode())
                record = InputRecord(
                    self.topics.requested, entry.partition, entry.offset, cid.encode(), signed
                )
                result.extend(
                    _reject(
                        self.name,
                        self.topics,
                        record,
                        cid,
                        ReasonCode.POLICY_DENIED,
                        f"approval window elapsed ({len(entry.approvers)} of "
                        f"{self.approvals_required} approvals)",
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
    envelope: PreparedEnvelope
    failovers: list[AuditEvent]


class SealStage:
    """commands.authorized → commands.outbound (key: vehicle id) + a "sealed" status event."""

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
    ) -> None:
        self.topics = topics
        self.directory = directory
        self.sealer = sealer
        self.profiles = dict(profiles)
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

    def choose_profile(self, criticality: str, recipient: RecipientKeys) -> SecurityProfile:
        for rule in self.rules:
            if rule.matches(criticality, recipient.capabilities) and rule.profile in self.profiles:
                return self.profiles[rule.profile]
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
        try:
            envelopes = self.sealer.sign_prepared([p.envelope for _, p in prepared])
        except FleetbusError as exc:
            if len(prepared) == 1:
                index, item = prepared[0]
                results[index] = self._refused(item, exc, now)
            else:
                # One envelope of the batch cannot be completed (e.g. oversize): seal each
                # record on its own so that only that one is refused.
                for index, item in prepared:
                    results[index] = self.process_batch([item.record], state, now)[0]
            prepared, envelopes = [], []
        for (index, item), envelope in zip(prepared, envelopes, strict=True):
            results[index] = self._sealed(item, envelope, now)
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
            profile = self.choose_profile(auth.criticality, recipient)
            envelope = self.sealer.prepare(
                SealRequest(
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
            )
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

    def _sealed(self, item: _Prepared, envelope: bytes, now: float) -> StageResult:
        auth, profile, path = item.auth, item.profile, item.envelope.key_path
        cid, vehicle = auth.command_id, auth.vehicle_id
        KEYPATH_SELECTED.labels(profile=profile.name, path=path).inc()
        legacy = "pqc" not in item.recipient.capabilities
        detail = f"profile {profile.name}, key path {path}" + (
            " (legacy: vehicle has no pqc capability)" if legacy else ""
        )
        return StageResult(
            outputs=[
                Output(
                    self.topics.outbound,
                    vehicle.encode(),
                    envelope,
                    headers=(("fleetbus-command-id", cid.encode()),),
                ),
                _status(
                    self.topics, cid, CommandState.SEALED, now, detail=detail, vehicle_id=vehicle
                ),
            ],
            audit=[
                *item.failovers,
                AuditEvent(
                    actor="bus",
                    event="sealed",
                    command_id=cid,
                    detail={
                        "vehicle": vehicle,
                        "profile": profile.name,
                        "key_path": path,
                        "legacy": legacy,
                    },
                ),
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
    (Key-path minimums are by containment, so one minimum cannot cover xwing and x25519.)"""

    def __init__(
        self, directory: Any, pqc_opener: Any, legacy_opener: Any, clock: Any = None
    ) -> None:
        import time

        self.directory = directory
        self.pqc = pqc_opener
        self.legacy = legacy_opener
        self._clock = clock or time.time

    def open(self, data: bytes, *, topic: str) -> Any:
        try:
            sender = decode_envelope(data).header.sender
            record = self.directory.current(sender, at=self._clock())
            capable = "pqc" in record.capabilities
        except EnvelopeError:
            raise
        except Exception:
            capable = True  # unknown sender: the stricter opener rejects it with its reason
        return (self.pqc if capable else self.legacy).open(data, topic=topic)


# --- track ---------------------------------------------------------------------------------

_ACTIVE: Final = frozenset({"authorized", "sealed", "delivered"})
_FINAL: Final = frozenset({"succeeded", "failed", "rejected", "expired"})


class TrackStage:
    """authorized + status + responses → delivered / succeeded / failed / expired events.

    State ``cmd/<id>``: issued/expiry times and each vehicle's state. The tick marks vehicles
    still active after expiry + skew as expired.
    """

    name = "track"

    def __init__(
        self,
        *,
        topics: PipelineTopics,
        opener: Any,  # EnvelopeOpener of the bus sealer principal
        clock_skew_s: float,
        max_message_bytes: int,
        retention_s: float = 300.0,
    ) -> None:
        self.topics = topics
        self.opener = opener
        self.skew_s = clock_skew_s
        self.max_bytes = max_message_bytes
        self.retention_s = retention_s

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

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if record.topic == self.topics.authorized:
            auth = AuthorizedCommand.decode(record.value)
            entry = self._load(state, auth.command_id)
            entry["issued_at"] = _ms(auth.issued_at)
            entry["expires_at"] = _ms(auth.expires_at)
            entry["vehicles"].setdefault(auth.vehicle_id, "authorized")
            self._store(state, auth.command_id, entry)
            return StageResult()
        if record.topic == self.topics.status:
            return self._status(record, state, now)
        return self._response(record, state, now)

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
        return StageResult()

    def _observe(self, cid: str, entry: Mapping[str, Any], outcome: str, now: float) -> None:
        try:
            issued = entry["issued_at"] / 1000 or uuid7_timestamp_ms(cid) / 1000
        except FleetbusError:
            return
        COMMAND_LATENCY.labels(outcome=outcome).observe(max(0.0, now - issued))

    def _response(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        def dlq(reason: ReasonCode, detail: str) -> StageResult:
            return dead_letter_result(self.name, self.topics.dlq, record, reason, detail, now=now)

        if record.value is None:
            return dlq(ReasonCode.MALFORMED, "empty record")
        try:
            opened = self.opener.open(record.value, topic=self.topics.responses)
        except EnvelopeError as exc:
            ENVELOPE_REJECTS.labels(role="bus", reason=exc.reason.value).inc()
            return dlq(exc.reason, f"response envelope rejected: {exc.reason.value}")
        try:
            response = Response.decode(opened.payload, max_size=self.max_bytes)
        except FleetbusError as exc:
            return dlq(exc.reason, f"response payload: {exc}")
        if response.vehicle_id != opened.sender or response.command_id != opened.message_id:
            return dlq(ReasonCode.WRONG_RECIPIENT, "response names another vehicle or command")
        cid, vid = response.command_id, response.vehicle_id
        entry = self._load(state, cid)
        vehicles: dict[str, str] = entry["vehicles"]
        current = vehicles.get(vid)
        if current is None and vehicles:
            return dlq(ReasonCode.POLICY_DENIED, f"{vid} was not a target of this command")
        if current in _FINAL:
            return StageResult(audit=[AuditEvent(vid, "duplicate_response", cid)])
        if response.status in (102, 202):
            new_state = CommandState.DELIVERED
        elif response.succeeded:
            new_state = CommandState.SUCCEEDED
        else:
            new_state = CommandState.FAILED
        vehicles[vid] = str(new_state)
        if not entry["expires_at"]:
            entry["expires_at"] = _ms(opened.expires_at)
        self._store(state, cid, entry)
        if new_state is not CommandState.DELIVERED:
            self._observe(cid, entry, str(new_state), now)
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
                    detail={"status": response.status, "key_path": opened.key_path.name},
                )
            ],
        )

    def deadline(self, key: str, value: bytes) -> float | None:
        """When ``tick`` must look at a command: at expiry + skew while a vehicle is still
        active (to expire it), then at the end of the retention (to forget the command)."""
        if not key.startswith("cmd/"):
            return None
        entry: dict[str, Any] = cbor2.loads(value)
        expires: float = entry["expires_at"] / 1000
        if not expires:
            return None
        if any(state in _ACTIVE for state in entry["vehicles"].values()):
            return expires + self.skew_s
        return expires + self.skew_s + self.retention_s

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        result = StageResult()
        for key in state.due(now, self.deadline):
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
    """telemetry.raw (envelopes of kind tel) → telemetry.verified (JSON after export policy)."""

    name = "telemetry"

    def __init__(
        self,
        *,
        topics: PipelineTopics,
        opener: Any,
        policy: PolicyEngine,
        consumer: str,
        max_message_bytes: int,
    ) -> None:
        self.topics = topics
        self.opener = opener
        self.policy = policy
        self.consumer = consumer
        self.max_bytes = max_message_bytes

    def input_topics(self) -> Sequence[str]:
        return [self.topics.telemetry_raw]

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        def dlq(reason: ReasonCode, detail: str) -> StageResult:
            return dead_letter_result(self.name, self.topics.dlq, record, reason, detail, now=now)

        if record.value is None:
            return dlq(ReasonCode.MALFORMED, "empty record")
        try:
            opened = self.opener.open(record.value, topic=self.topics.telemetry_raw)
        except EnvelopeError as exc:
            ENVELOPE_REJECTS.labels(role="bus", reason=exc.reason.value).inc()
            return dlq(exc.reason, f"telemetry envelope rejected: {exc.reason.value}")
        try:
            telemetry = Telemetry.decode(opened.payload, max_size=self.max_bytes)
        except FleetbusError as exc:
            return dlq(exc.reason, f"telemetry payload: {exc}")
        if telemetry.vehicle_id != opened.sender:
            return dlq(ReasonCode.WRONG_RECIPIENT, "telemetry names another vehicle")
        exported = self.policy.export(self.consumer, telemetry.fields)
        doc = {
            "vehicle_id": telemetry.vehicle_id,
            "at": telemetry.at,
            "consumer": self.consumer,
            "key_path": opened.key_path.name,
            "fields": exported,
        }
        value = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return StageResult(
            outputs=[Output(self.topics.telemetry_verified, telemetry.vehicle_id.encode(), value)]
        )

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
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
