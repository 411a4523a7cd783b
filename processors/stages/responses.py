"""The response stage: opens and verifies what vehicles send on ``commands.responses`` and
forwards each verified response, keyed by command id, to the track stage.

It reads the topic where the vehicles' records are keyed: wire-v2 records by vehicle id (a
vehicle's uplink epochs, its responses in them, its ``epoch_unknown`` statuses and the seal
stage's copies of the establishments sent to it all meet one partition, so a worker needs the
keys and epochs of the vehicles of its own partitions only) and, during the migration window,
v1 envelopes of agents that do not speak v2, keyed by command id (docs/wire-format.md V2.10).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import cbor2

from fleetbus.bus.commands import Response, VerifiedResponse
from fleetbus.bus.envelope import EnvelopeError, MessageKind
from fleetbus.bus.envelope_v2 import (
    Direction,
    Message,
    ParsedEstablishment,
    ParsedStatus,
    decode_record,
)
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
from fleetbus.processors.stages.common import PipelineTopics, encode_cbor, to_ms
from fleetbus.processors.stages.opening import (
    UPLINK_KINDS,
    UplinkKey,
    V1Uplink,
    accept_uplink_epoch,
    admit_v1_uplink,
    ask_for_uplink_epoch,
    check_stage_owns_replay,
    refusal_detail,
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
    sender_key,
    stored_until,
)
from fleetbus.providers.sealing import VerifiedRoots
from fleetbus.providers.sealing_v2 import (
    directory_verifier,
    open_status,
    verify_signed_record,
)

#: ``est/<vehicle key>/<epoch id hex>``: a v2 establishment the seal stage sent to that vehicle,
#: kept until the epoch ends to be sent again when the vehicle reports it unknown.
_EST: Final = "est/"
#: ``est-sent/<vehicle key>/<epoch id hex>``: when it was last sent again (one per interval).
_EST_SENT: Final = "est-sent/"
#: Seconds between two re-deliveries of one establishment, however many statuses ask for it.
EST_RESEND_INTERVAL_S: Final = 10.0


class ResponseStage:
    """commands.responses (vehicles' sealed answers) → commands.responses.verified.

    Every check the bus makes of an answer is made here, before the track stage sees it: the
    envelope opens to the bus sealer on the minimum key path of the sender's capabilities, the
    sender is a vehicle or edge unit of the directory, the response names that sender and the
    envelope's message id as its command, the record is keyed as its replay state needs (v2:
    the vehicle id; v1: the command id), and the (sender, message id) pair is admitted once to
    ``UplinkReplay`` in this partition's state — for v2 on top of the epoch's sequence window.
    Bad input goes to the DLQ with its reason, a metric and an audit record. Whether the sender
    was a target of the command is the track stage's judgement (issue 11): it holds the
    command's state, keyed by command id.
    """

    name = "responses"

    def __init__(
        self,
        *,
        topics: PipelineTopics,
        opener: Any,  # UplinkOpener of the bus sealer principal, without its own replay check
        clock_skew_s: float,
        max_message_bytes: int,
        limits: UplinkLimits | None = None,
        sealer_principal: str | None = None,
        v2_openers: tuple[Any, Any] | None = None,  # EpochOpener (pqc minimum, legacy minimum)
        status_signer: Any = None,  # the bus sealer's Signer: ask vehicles for new epochs
    ) -> None:
        check_stage_owns_replay(self.name, opener)
        self.topics = topics
        self.opener = opener
        # The bus's sealer id: whose v2 establishments this stage keeps for re-delivery, and
        # to whom vehicles address their epoch statuses. None: v2 records are not read here.
        self.sealer_principal = sealer_principal
        self.v2_openers = v2_openers
        self._roots = VerifiedRoots(1024)
        self.skew_s = clock_skew_s
        self.skew_ms = to_ms(clock_skew_s)
        self.max_bytes = max_message_bytes
        self.limits = limits or UplinkLimits()
        self.replay = UplinkReplay(limits=self.limits, skew_s=clock_skew_s)
        # Epoch secrets only in memory; the partition state holds the epochs' public part.
        self._secrets: dict[bytes, bytes] = {}
        self.asker = uplink_asker(topics, opener, sealer_principal, status_signer)

    def input_topics(self) -> Sequence[str]:
        return [self.topics.responses]

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        admitted = admit_v1_uplink(self, record, state, now, RESPONSES_V1, self._v2)
        if isinstance(admitted, StageResult):
            return admitted
        opened, response = admitted
        return self._forward(response, opened, wire=1)

    def _forward(self, response: Response, opened: Any, *, wire: int) -> StageResult:
        verified = VerifiedResponse(response, opened.key_path.name, wire, opened.expires_at)
        cid = response.command_id
        return StageResult(
            outputs=[Output(self.topics.responses_verified, cid.encode(), verified.encode())]
        )

    def _dlq(
        self, record: InputRecord, now: float, reason: ReasonCode, detail: str, **kw: Any
    ) -> StageResult:
        on_commit(ENVELOPE_REJECTS.labels(role="bus", reason=reason.value).inc)
        return dead_letter_result(self.name, self.topics.dlq, record, reason, detail, now=now, **kw)

    def _v2(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        """A v2 record: a vehicle's uplink establishment or response, a vehicle's
        ``epoch_unknown`` status, or the seal stage's copy of a downlink establishment."""
        if self.sealer_principal is None or self.v2_openers is None:
            return self._dlq(
                record, now, ReasonCode.UNSUPPORTED_VERSION, "wire format v2 is not read here"
            )
        value = record.value or b""
        try:
            parsed = decode_record(value, max_size=self.max_bytes)
            if isinstance(parsed, ParsedEstablishment):
                if parsed.establishment.direction is Direction.UPLINK:
                    return accept_uplink_epoch(self, record, state, now, parsed, self._store(state))
                return self._keep_downlink(record, state, now, parsed)
            if isinstance(parsed, ParsedStatus):
                return self._epoch_status(record, state, now)
            assert isinstance(parsed, Message)
            store = self._store(state)
            store.check_keyed_by_sender(record.key, parsed.header.recipient, parsed.header.epoch_id)
            opened = self.v2_openers[0].open(value, topic=self.topics.responses, store=store)
        except FleetbusError as exc:
            result = self._dlq(record, now, exc.reason, f"v2 record rejected: {exc.reason.value}")
            return ask_for_uplink_epoch(self.asker, result, record, state, exc, now)
        if opened.kind is not MessageKind.RESPONSE:
            return self._dlq(record, now, ReasonCode.WRONG_RECIPIENT, "not a response message")
        try:
            response = Response.decode(opened.payload, max_size=self.max_bytes)
        except FleetbusError as exc:
            return self._dlq(record, now, exc.reason, f"response payload: {exc}")
        keyed = _identify_v2(response, opened)
        if isinstance(keyed, str):
            return self._dlq(record, now, ReasonCode.WRONG_RECIPIENT, keyed)
        if record.key != keyed.key.encode():
            return self._dlq(record, now, ReasonCode.MALFORMED, keyed.detail)
        # The epoch window refuses a copy of this message; this refuses the same answer sealed
        # again (a vehicle re-sends it after a redelivery), as for v1, so one answer counts once.
        sender = opened.sender
        refused = self.replay.admit(state, sender, opened.message_id, opened.expires_at, now)
        if refused is not None:
            detail = refusal_detail(refused, sender, opened.message_id, self.limits)
            return self._dlq(
                record, now, refused, detail, actor=sender, command_id=keyed.command_id
            )
        return self._forward(response, opened, wire=2)

    def _store(self, state: PartitionState) -> StateEpochStore:
        assert self.v2_openers is not None
        rederive = self.v2_openers[0].rederive
        return StateEpochStore(state, self._secrets, rederive, skew_ms=self.skew_ms)

    def _keep_downlink(
        self, record: InputRecord, state: PartitionState, now: float, parsed: ParsedEstablishment
    ) -> StageResult:
        """The seal stage's copy of an establishment it sent to a vehicle: kept, to be sent
        again when that vehicle reports the epoch unknown."""
        est = parsed.establishment
        if (
            est.sender != self.sealer_principal
            or est.topic != self.topics.outbound
            or record.key != est.recipient.encode()
        ):
            raise EnvelopeError(
                "not a downlink establishment of this bus under its vehicle's key",
                reason=ReasonCode.WRONG_RECIPIENT,
            )
        directory = self.opener.directory
        verifier = directory_verifier(
            directory, est.sender, est.sender_key_id, est.signature_suite, now
        )
        verify_signed_record(parsed, verifier, est.sender, est.sender_key_id, self._roots, now)
        key = f"{sender_key(_EST, est.recipient)}/{est.epoch_id.hex()}"
        until = est.not_after_ms + self.skew_ms
        state.put(key, encode_cbor({"until": until, "record": record.value}))
        return StageResult()

    def _epoch_status(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        """A vehicle's signed ``epoch_unknown``: the kept establishment goes to it again."""
        assert self.sealer_principal is not None
        directory = self.opener.directory
        status = open_status(
            record.value or b"",
            topic=self.topics.responses,
            own_id=self.sealer_principal,
            directory=directory,
            clock=lambda: now,
            skew_s=self.skew_s,
            max_size=self.max_bytes,
            roots=self._roots,
        )
        if record.key != status.sender.encode():
            raise EnvelopeError("a status must be keyed by its sender", reason=ReasonCode.MALFORMED)
        if directory.current(status.sender, at=now).kind not in UPLINK_KINDS:
            raise EnvelopeError(
                f"{status.sender!r} is not a vehicle or edge unit", reason=ReasonCode.POLICY_DENIED
            )
        vid, epoch = status.sender, status.epoch_id.hex()
        detail: dict[str, str | int] = {"vehicle": vid, "epoch": epoch, "sequence": status.sequence}
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
        state.put(sent_key, encode_cbor(now))
        return StageResult(
            outputs=[Output(self.topics.outbound, vid.encode(), cbor2.loads(raw)["record"])],
            audit=[AuditEvent("bus", "epoch_redelivered", None, None, detail)],
        )

    def deadline(self, key: str, value: bytes) -> float | None:
        """When ``tick`` must look at a state entry: an uplink id, an uplink epoch or a kept
        downlink establishment when it ends."""
        if key.startswith((_EST, EPOCH_PREFIX, ASKED_PREFIX)):
            return stored_until(value) / 1000
        return self.replay.deadline(key, value)

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        due = state.due(now, self.deadline)
        self.replay.expire(state, due, now)
        expire_epochs(state, due, now)
        expire_asked(state, due, now)
        for key in due:
            if not key.startswith(_EST):
                continue
            raw = state.get(key)
            if raw is not None and stored_until(raw) < to_ms(now):
                state.delete(key)
                state.delete(_EST_SENT + key.removeprefix(_EST))
        return StageResult()


def _identify_v1(response: Response, opened: Any) -> UplinkKey | str:
    if response.vehicle_id != opened.sender or response.command_id != opened.message_id:
        return "response names another vehicle or command"
    # A v1 answer's replay state lives on the partition of its command id (agents without
    # wire v2 key it so); under another key it would meet a state that has not seen it.
    cid = response.command_id
    return UplinkKey(cid, "a v1 response must be keyed by its command id", command_id=cid)


def _identify_v2(response: Response, opened: Any) -> UplinkKey | str:
    if response.vehicle_id != opened.sender or response.command_id != opened.message_id:
        return "response names another vehicle or command"
    # The vehicle's epochs and its replay state live on the partition of its id.
    return UplinkKey(
        opened.sender,
        "a v2 response must be keyed by its vehicle id",
        command_id=response.command_id,
    )


#: The v1 records this stage reads (``admit_v1_uplink``).
RESPONSES_V1: Final = V1Uplink(
    topic=lambda topics: topics.responses,
    what="response",
    decode=Response.decode,
    identify=_identify_v1,
)
