"""The track stage: lifecycle, expiry and end-to-end latency of each command from its
authorized record, status events and the vehicles' responses the response stage verified.
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
    VerifiedResponse,
    uuid7_timestamp_ms,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.observability.metrics import BUS_LATENCY, COMMAND_LATENCY, ENVELOPE_REJECTS, on_commit
from fleetbus.processors.audit import AuditEvent
from fleetbus.processors.engine import (
    InputRecord,
    PartitionState,
    StageResult,
    dead_letter_result,
)
from fleetbus.processors.stages.common import (
    FOR_SEAL,
    FOR_TRACK,
    AuthorizedCommand,
    PipelineTopics,
    encode_cbor,
    status_output,
    to_ms,
)
from fleetbus.processors.uplink import (
    UplinkLimits,
    add_to_count,
    read_count,
    sender_key,
    stored_until,
)

# --- track ---------------------------------------------------------------------------------

ACTIVE_STATES: Final = frozenset({"authorized", "sealed", "delivered"})
_FINAL: Final = frozenset({"succeeded", "failed", "rejected", "expired"})
#: ``hold/<command id>/<vehicle key>``: a response from a vehicle no authorized record names yet.
_HOLD: Final = "hold/"
#: ``up/h/<vehicle key>``: held responses of that vehicle in this partition.
_HELD_COUNT: Final = "up/h/"
#: What releases before the response stage kept here (uplink replay ids and their counts, kept
#: establishments and their re-delivery times): that stage keeps them now, in its own state,
#: so an upgraded worker's track stage drops them at its first tick.
_MOVED: Final = ("up/id/", "up/n/", "est/", "est-sent/")


class TrackStage:
    """authorized + status + verified responses → delivered / succeeded / failed / expired.

    State ``cmd/<id>``: issued/expiry times, each target vehicle's state and ``single`` (the
    command names one vehicle, so the target set is complete with its authorized record).

    A response counts only from a vehicle the command was sealed to — one that an authorized
    record or a ``sealed`` status event names. The three topics race, so a response from any
    other vehicle is held (``hold/<id>/<vehicle>``, at most ``held_per_sender`` per vehicle)
    until that vehicle's authorized record or sealed event arrives (then it counts) or the
    response expires (then it goes to the DLQ as ``policy_denied``); once the target set is
    known to be complete it is refused at once. The responses come from the response stage
    (``commands.responses.verified``, keyed by command id), which opened and verified them and
    refused replays; this stage opens no envelope. The tick marks vehicles still active after
    expiry + skew as expired and judges expired held responses.
    """

    name = "track"

    def __init__(
        self,
        *,
        topics: PipelineTopics,
        clock_skew_s: float,
        max_message_bytes: int,
        retention_s: float = 300.0,
        limits: UplinkLimits | None = None,
    ) -> None:
        self.topics = topics
        self.skew_s = clock_skew_s
        self.max_bytes = max_message_bytes
        self.retention_s = retention_s
        self.limits = limits or UplinkLimits()

    def input_topics(self) -> Sequence[str]:
        return [self.topics.authorized, self.topics.status, self.topics.responses_verified]

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
        if auth.reader == FOR_SEAL:
            return StageResult()  # the seal stage's copy (keyed by vehicle id); ours has the id
        if auth.reader == FOR_TRACK:  # v2: a group's one record names the group, no vehicle
            single = not auth.group
        else:  # a v1 record, one per vehicle: the signed command says whether it was a group's
            signed = SignedCommand.decode(auth.signed_command, max_size=self.max_bytes)
            single = signed.command.target.vehicle is not None
        entry = self._load(state, auth.command_id)
        entry["issued_at"] = to_ms(auth.issued_at)
        entry["expires_at"] = to_ms(auth.expires_at)
        # Where the bus's own latency starts: after any approval wait (docs/observability.md).
        entry.setdefault("authorized_at", to_ms(now))
        if not auth.vehicle_id:
            # A group's one record: its vehicles become targets as their seal-stage partitions
            # name them (``sealed`` or ``rejected`` events with the vehicle).
            self._store(state, auth.command_id, entry)
            return StageResult()
        entry["vehicles"].setdefault(auth.vehicle_id, "authorized")
        if single:
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

        try:
            verified = VerifiedResponse.decode(record.value or b"", max_size=self.max_bytes)
        except FleetbusError as exc:
            return dlq(exc.reason, f"verified response: {exc}")
        response = verified.response
        cid, vid = response.command_id, response.vehicle_id
        if record.key != cid.encode():
            # The command's state lives on the partition of its id.
            return dlq(ReasonCode.MALFORMED, "a verified response must be keyed by its command id")
        entry = self._load(state, cid)
        if vid in entry["vehicles"]:
            return self._apply(state, entry, response, verified.key_path, now)
        if entry.get("single") or "" in entry["vehicles"]:
            # The target set is complete (one vehicle, or rejected before any was named).
            return dlq(
                ReasonCode.POLICY_DENIED,
                f"{vid} was not a target of this command",
                actor=vid,
                command_id=cid,
            )
        return self._hold(record, state, verified, now)

    def _hold(
        self,
        record: InputRecord,
        state: PartitionState,
        verified: VerifiedResponse,
        now: float,
    ) -> StageResult:
        cid, vid = verified.command_id, verified.vehicle_id
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
            on_commit(ENVELOPE_REJECTS.labels(role="bus", reason="sender_state_full").inc)
            result.extend(full)
            result.outcome = full.outcome
            return result
        add_to_count(state, count_key, 1)
        until = to_ms(verified.expires_at + self.skew_s)
        held = {
            "until": until,
            "command_id": cid,
            "vehicle": vid,
            "payload": verified.response.encode(),
            "key_path": verified.key_path,
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
        held response when it ends; what an earlier release kept here at once."""
        if key.startswith(_MOVED):
            return 0.0
        if key.startswith(_HOLD):
            return stored_until(value) / 1000
        if not key.startswith("cmd/"):
            return None
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
            if key.startswith(_MOVED):
                state.delete(key)
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
