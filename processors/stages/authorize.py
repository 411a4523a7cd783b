"""The authorize stage: identity, freshness, replay, Cedar policy, group expansion and M-of-N
approvals (commands.requested + commands.approvals → commands.authorized | rejected).

Over 500 lines because the authorize stage is one state machine (commands, approvals, timers)
whose methods share one partition-state layout; its state records come first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import cbor2

from fleetbus.bus.commands import (
    Approval,
    CommandState,
    Decision,
    SignedApproval,
    SignedCommand,
    group_targets_detail,
    uuid7_timestamp_ms,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.processors.audit import AuditEvent
from fleetbus.processors.engine import (
    InputRecord,
    Output,
    PartitionState,
    StageResult,
    dead_letter_result,
)
from fleetbus.processors.policy import PolicyEngine
from fleetbus.processors.stages.common import (
    FOR_SEAL,
    FOR_TRACK,
    AuthorizedCommand,
    PipelineTopics,
    encode_cbor,
    followed_by,
    keyed_by,
    reject,
    status_output,
    to_ms,
)

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
            "until": to_ms(self.until),
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
class CommandEntry:
    """What the authorize stage remembers per command id (state value, CBOR)."""

    status: str  # pending | authorized | rejected
    until: float  # expiry + skew (the id is kept longer: ``AuthorizeStage._forget_at``)
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
        return encode_cbor(
            {
                "status": self.status,
                "until": to_ms(self.until),
                "issuer": self.issuer,
                "window_until": to_ms(self.window_until),
                "signed": self.signed,
                "approvals": [a.to_wire() for a in self.approvals],
                "offset": self.offset,
                "partition": self.partition,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> CommandEntry:
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
    verified (the replay set, kept until expiry + skew and at least until the id, by its UUIDv7
    time, is too old to be accepted; a pending command with its signed approvals) and
    ``apr/<id>`` for signed approvals and denies that arrived before their command (at most
    ``max_early_approvals``, one per approver, each held for one window).

    The two topics race, so an approval is never trusted for having been checked once: every
    decision judges every held approval again, at that moment, against that command (signature
    and key validity, its digest of exactly that command, not the issuer, Cedar ``approve`` on
    its vehicle or group, window). A valid deny vetoes; what fails is dead-lettered with its
    reason when it is judged.
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
        authorized_partitions: int = 1,
    ) -> None:
        self.topics = topics
        # A group command's seal-stage record goes to each of them (the topic's partition count).
        self.authorized_partitions = authorized_partitions
        self.directory = directory
        self.policy = policy
        self.approvals_required = approvals_required
        self.window_s = approval_window_s
        self.skew_s = clock_skew_s
        self.max_lifetime_s = max_lifetime_s
        # How long after its UUIDv7 time a command id is accepted, and so how long the replay
        # set keeps it at least: once forgotten, an id can never be accepted again.
        self.id_window_s = max_lifetime_s + clock_skew_s
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

    def _refusal(
        self, signed: SignedCommand, state: PartitionState, now: float
    ) -> tuple[ReasonCode, str] | None:
        """Why a command is refused before any policy decision (the first failing check, in
        this order), or None."""
        command = signed.command
        try:
            signed.verify(self.directory, at=now)
        except FleetbusError as exc:
            reason = exc.reason if exc.reason in _SIGNER_REASONS else ReasonCode.UNKNOWN_SIGNER
            return reason, f"issuer not verified: {reason.value}"
        if now > command.expires_at + self.skew_s:
            return ReasonCode.EXPIRED, "command expired before it was authorized"
        if command.issued_at > now + self.skew_s:
            return (
                ReasonCode.NOT_YET_VALID,
                "command is issued in the future (beyond the clock-skew allowance)",
            )
        id_at = uuid7_timestamp_ms(command.id) / 1000
        if id_at > now + self.skew_s:
            # Refused so that no entry of the replay set is kept further ahead than the window.
            return (
                ReasonCode.NOT_YET_VALID,
                "command id is from the future (its UUIDv7 time, beyond the clock-skew allowance)",
            )
        if now > id_at + self.id_window_s:
            # An id this old may have been seen and forgotten: it is never accepted again.
            return (
                ReasonCode.EXPIRED,
                f"command id is older than the replay window ({self.max_lifetime_s:.0f} s + "
                "skew by its UUIDv7 time)",
            )
        if command.expires_at - command.issued_at > self.max_lifetime_s:
            return (
                ReasonCode.POLICY_DENIED,
                f"command lifetime exceeds the replay window ({self.max_lifetime_s:.0f} s)",
            )
        if state.get(f"cmd/{command.id}") is not None:
            return ReasonCode.REPLAYED, "command id was already seen"
        return None

    def _command(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if record.value is None:
            return self._dlq(record, ReasonCode.MALFORMED, "empty record", now)
        try:
            signed = SignedCommand.decode(record.value, max_size=self.max_bytes)
        except FleetbusError as exc:
            return self._dlq(record, exc.reason, str(exc), now)
        command = signed.command
        cid, issuer = command.id, command.issuer
        if not keyed_by(record, cid):
            # The replay set is per partition: a command re-published under another key would
            # land on another partition and pass it. The key decides the partition, so it must
            # be the command id.
            return self._dlq(record, ReasonCode.MALFORMED, "record key must be the command id", now)
        refusal = self._refusal(signed, state, now)
        if refusal is not None:
            reason, detail = refusal
            return reject(self.name, self.topics, record, cid, reason, detail, now, issuer=issuer)
        entry = CommandEntry(
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
        return followed_by(result, settled)

    def _decide(
        self,
        record: InputRecord,
        signed: SignedCommand,
        entry: CommandEntry,
        state: PartitionState,
        now: float,
    ) -> StageResult:
        command = signed.command
        cid, issuer = command.id, command.issuer
        key = f"cmd/{cid}"
        target = command.target
        if target.vehicle is not None:
            if self.policy.registry.vehicle(target.vehicle) is None:
                entry.close("rejected")
                state.put(key, entry.encode())
                return reject(
                    self.name,
                    self.topics,
                    record,
                    cid,
                    ReasonCode.POLICY_DENIED,
                    f"unknown vehicle {target.vehicle}",
                    now,
                    issuer=issuer,
                )
            targets = 1
        else:
            # Only the count: each seal-stage partition expands the group to its own vehicles.
            targets = self.policy.registry.group_size(str(target.group))
            if not targets:
                entry.close("rejected")
                state.put(key, entry.encode())
                return reject(
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
            return reject(
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
                    status_output(
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
        authorized = AuthorizedCommand(
            command_id=cid,
            vehicle_id=target.vehicle or "",
            issuer=issuer,
            action=command.action,
            criticality=decision.criticality,
            issued_at=command.issued_at,
            expires_at=command.expires_at,
            signed_command=signed.encode(),
            decision=decision.detail,
            approvers=approvers,
            authorized_at=now,
            group="" if target.vehicle else str(target.group),
        )
        outputs = self._authorized_outputs(authorized)
        outputs.append(
            status_output(
                self.topics,
                cid,
                CommandState.AUTHORIZED,
                now,
                vehicle_id=target.vehicle,
                detail=(
                    decision.detail
                    if target.vehicle
                    else group_targets_detail(targets, decision.detail)
                ),
            )
        )
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
                        "vehicles": targets,
                        "approvers": ",".join(approvers),
                        "policies": ",".join(decision.policies),
                    },
                )
            ],
        )

    def _authorized_outputs(self, authorized: AuthorizedCommand) -> list[Output]:
        """The seal stage's copy keyed by vehicle id (a group's: one on every partition, each
        seal-stage partition expands it to its own vehicles) and the track stage's, keyed by
        command id (docs/pipeline.md)."""
        cid = authorized.command_id.encode()
        seal = replace(authorized, reader=FOR_SEAL).encode()
        if authorized.vehicle_id:
            outputs = [Output(self.topics.authorized, authorized.vehicle_id.encode(), seal)]
        else:
            outputs = [
                Output(self.topics.authorized, cid, seal, partition=p)
                for p in range(self.authorized_partitions)
            ]
        # The track stage opens nothing and learns single vehicle or group from the record
        # itself: its copy leaves the signed command out (about half of the record).
        track = replace(authorized, reader=FOR_TRACK, signed_command=b"").encode()
        return [*outputs, Output(self.topics.authorized, cid, track)]

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
        if not keyed_by(record, cid):
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
        entry = CommandEntry.decode(raw)
        if entry.status != "pending":
            return StageResult(
                audit=[
                    AuditEvent(approver, "approval_ignored", cid, detail={"status": entry.status})
                ]
            )
        signed_command = SignedCommand.decode(entry.signed, max_size=self.max_bytes)
        # Signature, key and issue time were checked above at this same ``now``.
        refusal = self._rules(approval, signed_command, entry, now)
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
            return reject(
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
        state.put(f"apr/{cid}", encode_cbor({"approvals": [h.to_wire() for h in early]}))
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
        self, value: bytes, command: SignedCommand, entry: CommandEntry, now: float
    ) -> tuple[ReasonCode, str] | None:
        """Why this signed approval does not count for ``command`` now (None: it counts).

        Every approval goes through here each time approvals are counted, whenever it arrived.
        """
        try:
            # Held bytes written before an upgrade of the approval format fail here with their
            # own reason (``unsupported_version``): they never count.
            signed = SignedApproval.decode(value, max_size=self.max_bytes)
        except FleetbusError as exc:
            return exc.reason, str(exc)
        try:
            signed.verify(self.directory, at=now)
        except FleetbusError as exc:
            reason = exc.reason if exc.reason in _SIGNER_REASONS else ReasonCode.UNKNOWN_SIGNER
            return reason, f"approval not verified: {reason.value}"
        return self._rules(signed.approval, command, entry, now)

    def _rules(
        self, approval: Approval, signed: SignedCommand, entry: CommandEntry, now: float
    ) -> tuple[ReasonCode, str] | None:
        """``_judge`` after the signature: the command it approves, issue time, issuer, Cedar
        ``approve``, window."""
        if not approval.is_for(signed):
            # The same id, another command: an approval replayed onto a command published
            # under a reused id, or one its approver signed for a different command.
            return ReasonCode.APPROVAL_MISMATCH, "approval is for another command (digest differs)"
        command = signed.command
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
        entry: CommandEntry,
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
            refusal = None if held is judged else self._judge(held.value, signed, entry, now)
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
            rejected = reject(
                self.name,
                self.topics,
                record,
                cid,
                ReasonCode.POLICY_DENIED,
                f"denied by approver {veto.approver}",
                now,
                issuer=command.issuer,
            )
            return followed_by(result, rejected), len(counted)
        return followed_by(result, self._decide(record, signed, entry, state, now)), len(counted)

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
        entry = CommandEntry.decode(value)
        if entry.status == "pending":  # rejected when its window closes or it expires
            return min(entry.window_until, entry.until)
        return self._forget_at(key.removeprefix("cmd/"), entry)

    def _forget_at(self, cid: str, entry: CommandEntry) -> float:
        """When a decided command's id leaves the replay set: after its expiry plus skew, and
        never before its id is too old to be accepted (computed, so that entries written by
        earlier versions are kept as long)."""
        return max(entry.until, uuid7_timestamp_ms(cid) / 1000 + self.id_window_s)

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
                    state.put(key, encode_cbor({"approvals": [h.to_wire() for h in live]}))
                continue
            entry = CommandEntry.decode(raw)
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
                    reject(
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
            elif entry.status != "pending" and self._forget_at(cid, entry) < now:
                state.delete(key)
        return result
