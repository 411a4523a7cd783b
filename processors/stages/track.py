"""The track stage: lifecycle, expiry and end-to-end latency of each command from its
authorized record, status events and the vehicles' responses.

Over 500 lines because the track stage is one state machine over three racing topics
(authorized, status, responses) whose held responses, kept establishments and command entries
share one partition-state layout and one tick.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Final

import cbor2

from fleetbus.bus.commands import (
    CommandState,
    Response,
    SignedCommand,
    StatusEvent,
    uuid7_timestamp_ms,
)
from fleetbus.bus.envelope import EnvelopeError
from fleetbus.bus.envelope_v2 import (
    Direction,
    Message,
    ParsedEstablishment,
    ParsedStatus,
    decode_record,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.observability.metrics import BUS_LATENCY, COMMAND_LATENCY, ENVELOPE_REJECTS, on_commit
from fleetbus.processors.audit import AuditEvent
from fleetbus.processors.engine import (
    InputRecord,
    Output,
    PartitionState,
    StageResult,
    dead_letter_result,
)
from fleetbus.processors.stages.common import (
    AuthorizedCommand,
    PipelineTopics,
    encode_cbor,
    status_output,
    to_ms,
)
from fleetbus.processors.stages.opening import (
    UPLINK_KINDS,
    UplinkKey,
    V1Uplink,
    admit_v1_uplink,
    check_stage_owns_replay,
)
from fleetbus.processors.uplink import (
    UplinkLimits,
    UplinkReplay,
    add_to_count,
    read_count,
    sender_key,
    stored_until,
)
from fleetbus.providers.sealing import VerifiedRoots
from fleetbus.providers.sealing_v2 import directory_verifier, open_status, verify_signed_record

# --- track ---------------------------------------------------------------------------------

ACTIVE_STATES: Final = frozenset({"authorized", "sealed", "delivered"})
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
        check_stage_owns_replay(self.name, opener)
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
        state.put(f"cmd/{cid}", encode_cbor(dict(entry)))

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
        entry["issued_at"] = to_ms(auth.issued_at)
        entry["expires_at"] = to_ms(auth.expires_at)
        # Where the bus's own latency starts: after any approval wait (docs/observability.md).
        entry.setdefault("authorized_at", to_ms(now))
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
            entry["expires_at"] = to_ms(now + self.retention_s)
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

        admitted = admit_v1_uplink(self, record, state, now, RESPONSES, self._v2)
        if isinstance(admitted, StageResult):
            return admitted
        opened, response = admitted
        cid, vid = response.command_id, response.vehicle_id
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
                until = est.not_after_ms + to_ms(self.skew_s)
                state.put(key, encode_cbor({"until": until, "record": value}))
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
            if directory.current(status.sender, at=now).kind not in UPLINK_KINDS:
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
        state.put(sent_key, encode_cbor(now))
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
        until = to_ms(opened.expires_at + self.skew_s)
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
        state.put(key, encode_cbor(held))
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
                status_output(
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
        if any(state in ACTIVE_STATES for state in entry["vehicles"].values()):
            return expires + self.skew_s
        return expires + self.skew_s + self.retention_s

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        result = StageResult()
        now_ms = to_ms(now)
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
                if current in ACTIVE_STATES:
                    vehicles[vid] = "expired"
                    changed = True
                    self._observe(cid, entry, "expired", now)
                    result.outputs.append(
                        status_output(
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


def _identify_responses(response: Response, opened: Any) -> UplinkKey | str:
    if response.vehicle_id != opened.sender or response.command_id != opened.message_id:
        return "response names another vehicle or command"
    # The command's state and the response's replay state live on the partition of the
    # command id: under another key the response would meet neither.
    cid = response.command_id
    return UplinkKey(cid, "record key must be the command id", command_id=cid)


#: The v1 records this stage reads (``admit_v1_uplink``).
RESPONSES: Final = V1Uplink(
    topic=lambda topics: topics.responses,
    what="response",
    decode=Response.decode,
    identify=_identify_responses,
)
