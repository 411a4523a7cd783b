"""The telemetry stage: opens vehicles' telemetry and applies the export policy
(telemetry.raw → telemetry.verified)."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any, Final

from fleetbus.bus.commands import (
    SIGNED_TELEMETRY_CAPABILITY,
    SignedTelemetryBatch,
    Telemetry,
    decode_batch_payload,
)
from fleetbus.bus.envelope import EnvelopeError, MessageKind
from fleetbus.bus.envelope_v2 import Message, ParsedEstablishment, decode_record
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.observability.metrics import ENVELOPE_REJECTS, on_commit
from fleetbus.processors.audit import AuditEvent
from fleetbus.processors.engine import (
    InputRecord,
    Output,
    PartitionState,
    StageResult,
    dead_letter_result,
)
from fleetbus.processors.policy import PolicyEngine
from fleetbus.processors.stages.common import PipelineTopics, to_ms
from fleetbus.processors.stages.opening import (
    UplinkKey,
    V1Uplink,
    accept_uplink_epoch,
    admit_v1_uplink,
    ask_for_uplink_epoch,
    check_stage_owns_replay,
    uplink_asker,
)
from fleetbus.processors.uplink import (
    ASKED_PREFIX,
    EPOCH_PREFIX,
    StateEpochStore,
    UplinkLimits,
    UplinkReplay,
    expire_asked,
    expire_epochs,
    stored_until,
)

# --- telemetry -----------------------------------------------------------------------------


class TelemetryStage:
    """telemetry.raw (envelopes of kind tel) → telemetry.verified (JSON after export policy).

    Records must be keyed by the sending vehicle: its replay state (``UplinkReplay``, in this
    stage's changelogged partition state) lives on that partition, so a captured envelope
    re-published later, after a restart or a rebalance, is refused as ``replayed``.

    A v2 batch may be signed by its vehicle (``SignedTelemetryBatch``): the signature is checked
    against the vehicle's key in the directory, each reading is exported with ``signed`` true
    and the signed bytes go into the audit trail as evidence (docs/sdk.md, "Signed telemetry").
    Unsigned telemetry is refused from vehicles whose record carries the
    ``signed-telemetry`` capability, and from every vehicle with ``require_signed``.
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
        require_signed: bool = False,
        sealer_principal: str | None = None,
        status_signer: Any = None,  # the bus sealer's Signer: ask vehicles for new epochs
    ) -> None:
        check_stage_owns_replay(self.name, opener)
        self.topics = topics
        self.opener = opener
        self.policy = policy
        self.consumer = consumer
        self.max_bytes = max_message_bytes
        self.limits = limits or UplinkLimits()
        self.replay = UplinkReplay(limits=self.limits, skew_s=clock_skew_s)
        # Wire format v2 uplink: epochs in the partition state, secrets only in memory.
        self.v2_openers = v2_openers
        self.skew_ms = to_ms(clock_skew_s)
        self._secrets: dict[bytes, bytes] = {}
        self.require_signed = require_signed
        self.asker = uplink_asker(topics, opener, sealer_principal, status_signer)

    def input_topics(self) -> Sequence[str]:
        return [self.topics.telemetry_raw]

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        admitted = admit_v1_uplink(self, record, state, now, TELEMETRY, self._v2)
        if isinstance(admitted, StageResult):
            return admitted
        opened, telemetry = admitted
        # A v1 envelope's signature covers its ciphertext, not the readings a third party could
        # check without the bus's key: v1 telemetry is unsigned here, and refused where a
        # signature is required (else sending v1 would strip the requirement).
        refused = self._unsigned_refused(record, opened.sender, now)
        if refused is not None:
            return refused
        return StageResult(outputs=[self._export(telemetry, opened.key_path.name, signed=False)])

    def _unsigned_refused(self, record: InputRecord, sender: str, now: float) -> StageResult | None:
        """The DLQ result for unsigned telemetry of ``sender`` when it must sign, else None."""
        if not self.require_signed:
            try:
                capabilities = self.opener.directory.current(sender, at=now).capabilities
            except FleetbusError as exc:
                detail = f"telemetry sender's key record: {exc.reason.value}"
                return self._dlq(record, now, exc.reason, detail, actor=sender)
            if SIGNED_TELEMETRY_CAPABILITY not in capabilities:
                return None
        return self._dlq(
            record,
            now,
            ReasonCode.POLICY_DENIED,
            f"unsigned telemetry from {sender}, which must sign its telemetry batches",
            actor=sender,
        )

    def _dlq(
        self, record: InputRecord, now: float, reason: ReasonCode, detail: str, **kw: Any
    ) -> StageResult:
        on_commit(ENVELOPE_REJECTS.labels(role="bus", reason=reason.value).inc)
        return dead_letter_result(self.name, self.topics.dlq, record, reason, detail, now=now, **kw)

    def _export(self, telemetry: Telemetry, key_path: str, *, signed: bool) -> Output:
        exported = self.policy.export(self.consumer, telemetry.fields)
        doc = {
            "vehicle_id": telemetry.vehicle_id,
            "at": telemetry.at,
            "consumer": self.consumer,
            "key_path": key_path,
            "signed": signed,
            "fields": exported,
        }
        value = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return Output(self.topics.telemetry_verified, telemetry.vehicle_id.encode(), value)

    def _v2(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        """A wire-v2 uplink record: a vehicle's establishment (its epoch goes into this
        partition's state) or a message carrying a ``TelemetryBatch`` (exported per reading).
        The replay window of the epoch, in the same state, replaces ``UplinkReplay`` here."""

        def dlq(reason: ReasonCode, detail: str, **kw: Any) -> StageResult:
            return self._dlq(record, now, reason, detail, **kw)

        if self.v2_openers is None:
            return dlq(ReasonCode.UNSUPPORTED_VERSION, "wire format v2 is not read by this stage")
        value, topic = record.value or b"", self.topics.telemetry_raw
        pqc = self.v2_openers[0]
        store = StateEpochStore(state, self._secrets, pqc.rederive, skew_ms=self.skew_ms)
        try:
            parsed = decode_record(value, max_size=self.max_bytes)
            if isinstance(parsed, ParsedEstablishment):
                return accept_uplink_epoch(self, record, state, now, parsed, store)
            if not isinstance(parsed, Message):
                raise EnvelopeError("a status record on telemetry.raw", reason=ReasonCode.MALFORMED)
            store.check_keyed_by_sender(record.key, parsed.header.recipient, parsed.header.epoch_id)
            opened = pqc.open(value, topic=topic, store=store)
        except FleetbusError as exc:
            result = dlq(exc.reason, f"telemetry v2 record rejected: {exc.reason.value}")
            return ask_for_uplink_epoch(self.asker, result, record, state, exc, now)
        sender = opened.sender
        if record.key != sender.encode():
            return dlq(ReasonCode.MALFORMED, "record key must be the sending vehicle")
        if opened.kind is not MessageKind.TELEMETRY:
            return dlq(ReasonCode.WRONG_RECIPIENT, "not a telemetry message")
        try:
            payload = decode_batch_payload(opened.payload, max_size=self.max_bytes)
        except FleetbusError as exc:
            return dlq(exc.reason, f"telemetry batch: {exc}", actor=sender)
        signed: SignedTelemetryBatch | None = None
        if isinstance(payload, SignedTelemetryBatch):
            signed, batch = payload, payload.batch
        else:
            batch = payload
        if batch.vehicle_id != sender:
            return dlq(ReasonCode.WRONG_RECIPIENT, "telemetry names another vehicle")
        audit: list[AuditEvent] = []
        if signed is not None:
            try:
                # The key named must be the sender's own and valid now: revoked, expired or
                # rotated out is refused with the directory's reason, as for any signer.
                signed.verify(self.opener.directory.verifier_for(sender, signed.key_id, at=now))
            except FleetbusError as exc:
                detail = f"telemetry batch signature rejected: {exc.reason.value}"
                return dlq(exc.reason, detail, actor=sender)
            audit.append(_evidence(signed))
        else:
            refused = self._unsigned_refused(record, sender, now)
            if refused is not None:
                return refused
        path = opened.key_path.name
        outputs = [self._export(t, path, signed=signed is not None) for t in batch.telemetry()]
        return StageResult(outputs=outputs, audit=audit)

    def deadline(self, key: str, value: bytes) -> float | None:
        """When ``tick`` must look at a state entry: an uplink id or epoch when it ends."""
        if key.startswith((EPOCH_PREFIX, ASKED_PREFIX)):
            return stored_until(value) / 1000
        return self.replay.deadline(key, value)

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        due = state.due(now, self.deadline)
        self.replay.expire(state, due, now)
        expire_epochs(state, due, now)
        expire_asked(state, due, now)
        return StageResult()


def _evidence(signed: SignedTelemetryBatch) -> AuditEvent:
    """The audit record of a verified signed batch: its exact signed bytes (base64), so that a
    third party re-verifies them with the vehicle's public key from the key directory and
    nothing of the bus (docs/audit.md, "Signed telemetry")."""
    evidence = signed.encode()
    return AuditEvent(
        actor=signed.batch.vehicle_id,
        event="telemetry_signed",
        detail={
            "key_id": signed.key_id,
            "suite": signed.suite,
            "readings": len(signed.batch.readings),
            "sha256": signed.digest().hex(),
            "signed_batch": base64.b64encode(evidence).decode("ascii"),
        },
    )


def _identify_telemetry(telemetry: Telemetry, opened: Any) -> UplinkKey | str:
    if telemetry.vehicle_id != opened.sender:
        return "telemetry names another vehicle"
    # The replay state is per partition: under another key the envelope would land on a
    # partition that has not seen it.
    return UplinkKey(opened.sender, "record key must be the sending vehicle")


#: The v1 records this stage reads (``admit_v1_uplink``).
TELEMETRY: Final = V1Uplink(
    topic=lambda topics: topics.telemetry_raw,
    what="telemetry",
    decode=Telemetry.decode,
    identify=_identify_telemetry,
)
