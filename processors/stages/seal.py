"""The seal stage: profile choice and sealing with failover, one batch signature per
transaction (commands.authorized → commands.outbound)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Final

from fleetbus.bus.commands import CommandState
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import KeyPath, RecipientKeys, SecurityProfile
from fleetbus.bus.topics import kafka_partition
from fleetbus.observability.metrics import KEYPATH_FAILOVER, KEYPATH_SELECTED, on_commit
from fleetbus.processors.audit import AuditEvent
from fleetbus.processors.engine import (
    InputRecord,
    Output,
    PartitionState,
    StageResult,
    dead_letter_result,
)
from fleetbus.processors.stages.common import (
    FOR_SEAL,
    FOR_TRACK,
    AuthorizedCommand,
    PipelineTopics,
    reject,
    status_output,
)
from fleetbus.providers.keypath import REASON_NOT_CONFIGURED, FailoverEvent
from fleetbus.providers.sealing import PreparedEnvelope, SealRequest
from fleetbus.providers.sealing_v2 import PreparedMessage


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
    vehicle's key, where the response stage keeps it to answer the vehicle's ``epoch_unknown``
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
        partitions: int = 1,
        group_members: Callable[[str, int, int], Sequence[str]] | None = None,
    ) -> None:
        self.topics = topics
        # commands.authorized's partition count: vehicle v's records belong on partition
        # kafka_partition(v, partitions), and a group expands there to those vehicles only
        # (``group_members(group, partition, partitions)``).
        self.partitions = partitions
        self.group_members = group_members
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
                units = self._prepare(record, now)
            except Exception as exc:
                results[index] = exc
                continue
            if not units:
                results[index] = StageResult()  # a group with no vehicle on this partition
            for unit in units:
                if isinstance(unit, _Prepared):
                    prepared.append((index, unit))
                else:
                    self._add(results, index, unit)
        v1 = [(i, p) for i, p in prepared if not p.v2]
        v2 = [(i, p) for i, p in prepared if p.v2]
        try:
            envelopes = self.sealer.sign_prepared([p.envelope for _, p in v1])
        except FleetbusError as exc:
            if len(v1) == 1:
                index, item = v1[0]
                self._add(results, index, self._refused(item, exc, now))
            else:
                # One envelope of the batch cannot be completed (e.g. oversize): seal each
                # one on its own so that only that one is refused.
                for index, item in v1:
                    self._add(results, index, self._seal_alone(item, now))
            v1, envelopes = [], []
        for (index, item), envelope in zip(v1, envelopes, strict=True):
            self._add(results, index, self._sealed(item, [envelope], now))
        if v2:
            messages = [p.envelope for _, p in v2 if isinstance(p.envelope, PreparedMessage)]
            batches: list[list[bytes]] = []
            try:
                batches = self.sealer_v2.records_for(messages)
            except FleetbusError as exc:
                for index, item in v2:
                    self._add(results, index, self._refused(item, exc, now))
            for (index, item), sealed in zip(v2, batches, strict=False):
                self._add(results, index, self._sealed(item, sealed, now))
            if batches:
                # Messages go without their establishment only once it is on the topic.
                on_commit(partial(self.sealer_v2.announced, [m.epoch_id for m in messages]))
        return [r if r is not None else RuntimeError("unprocessed record") for r in results]

    @staticmethod
    def _add(results: list[StageResult | Exception | None], index: int, unit: StageResult) -> None:
        """One vehicle's result into its record's (a group record has one per vehicle): the
        record counts as sealed ("ok") when any of its vehicles was."""
        current = results[index]
        if not isinstance(current, StageResult):
            results[index] = unit
            return
        outcome = "ok" if "ok" in (current.outcome, unit.outcome) else current.outcome
        current.extend(unit)
        current.outcome = outcome

    def _seal_alone(self, item: _Prepared, now: float) -> StageResult:
        """Prepare and sign one vehicle's envelope again, alone (v1)."""
        again = self._prepare_vehicle(item.record, item.auth, now)
        if isinstance(again, StageResult):
            return again
        try:
            (envelope,) = self.sealer.sign_prepared([again.envelope])
        except FleetbusError as exc:
            return self._refused(again, exc, now)
        return self._sealed(again, [envelope], now)

    def _prepare(self, record: InputRecord, now: float) -> list[StageResult | _Prepared]:
        """What one authorized record asks for: nothing (the track stage's copy), one vehicle,
        or a group's vehicles on this record's partition."""
        try:
            auth = AuthorizedCommand.decode(record.value)
        except FleetbusError as exc:
            return [
                dead_letter_result(
                    self.name, self.topics.dlq, record, exc.reason, str(exc), now=now
                )
            ]
        if auth.reader == FOR_TRACK:
            return []
        if auth.reader and record.partition >= self.partitions:
            # The topic has more partitions than the pipeline was configured with: groups would
            # skip vehicles of the extra partitions, so refuse loudly rather than lose them.
            raise FleetbusError(
                f"commands.authorized partition {record.partition} is beyond the configured "
                f"{self.partitions} partitions (FLEETBUS_PARTITIONS)",
                reason=ReasonCode.CONFIG,
            )
        if auth.group:
            if self.group_members is None:
                raise FleetbusError(
                    "this seal stage has no group membership to expand a group command",
                    reason=ReasonCode.CONFIG,
                )
            members = self.group_members(auth.group, record.partition, self.partitions)
            return [
                self._prepare_vehicle(record, replace(auth, vehicle_id=v), now) for v in members
            ]
        if auth.reader == FOR_SEAL and (
            kafka_partition(auth.vehicle_id.encode(), self.partitions) != record.partition
        ):
            # This partition holds only its own vehicles' keys (docs/key-management.md): a
            # record on another vehicle's partition was not written by our authorize stage.
            return [
                reject(
                    self.name,
                    self.topics,
                    record,
                    auth.command_id,
                    ReasonCode.WRONG_RECIPIENT,
                    f"{auth.vehicle_id} is not a vehicle of partition {record.partition}",
                    now,
                    issuer=auth.issuer,
                    vehicle_id=auth.vehicle_id,
                )
            ]
        return [self._prepare_vehicle(record, auth, now)]

    def _prepare_vehicle(
        self, record: InputRecord, auth: AuthorizedCommand, now: float
    ) -> StageResult | _Prepared:
        cid, vehicle = auth.command_id, auth.vehicle_id
        if now > auth.expires_at + self.skew_s:
            return reject(
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
            result = reject(
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
        result = reject(
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
                status_output(
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
