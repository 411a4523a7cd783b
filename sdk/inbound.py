"""The inbound part of the vehicle agent: open a record of ``commands.outbound``, check the
command it carries, hold wire-format-v2 messages of an unknown epoch, and decide what a
refused record is answered (or that it is not: an unauthenticated sender never makes a
vehicle talk)."""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING, Any, Final

from fleetbus.bus.commands import Command, Response, SignedCommand
from fleetbus.bus.envelope import MessageKind, decode_envelope
from fleetbus.bus.envelope_v2 import ParsedEstablishment, decode_record, record_version
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.observability.tracing import record_reject
from fleetbus.sdk.agentcore import (
    HELD_PER_VEHICLE,
    STATUS_INTERVAL_S,
    AgentCore,
    RetryLater,
    ServedVehicle,
)

if TYPE_CHECKING:
    from fleetbus.providers.sealing_v2 import EpochUnknownError

__all__ = ["InboundPart"]

_log = logging.getLogger("fleetbus.sdk.vehicle")

# Opener rejects raised *after* the signature of the sealer has verified (see the check order
# in docs/wire-format.md): the envelope is authentic, so the vehicle may answer with a 4xx/5xx.
AUTHENTICATED_REJECTS: Final = frozenset(
    {
        ReasonCode.UNKNOWN_KEY_ID,
        ReasonCode.TAMPERED,
        ReasonCode.QKD_UNAVAILABLE,
        ReasonCode.SENDER_STATE_FULL,
    }
)
STATUS_FOR_REJECT: Final = {
    ReasonCode.SENDER_STATE_FULL: 503,
    ReasonCode.UNKNOWN_KEY_ID: 400,
    ReasonCode.TAMPERED: 400,
    ReasonCode.QKD_UNAVAILABLE: 503,
    ReasonCode.MALFORMED: 400,
    ReasonCode.OVERSIZE: 413,
    ReasonCode.UNSUPPORTED_VERSION: 400,
    ReasonCode.WRONG_RECIPIENT: 400,
    ReasonCode.EXPIRED: 408,
    ReasonCode.BAD_SIGNATURE: 403,
    ReasonCode.UNKNOWN_SIGNER: 403,
    ReasonCode.SIGNER_EXPIRED: 403,
    ReasonCode.SIGNER_REVOKED: 403,
    ReasonCode.NOT_YET_VALID: 403,
    ReasonCode.INTERNAL: 500,
}


class InboundPart(AgentCore):
    """Opening and checking commands (a part of ``VehicleAgent``)."""

    def _reject(self, reason: ReasonCode, detail: str) -> None:
        from fleetbus.observability.metrics import ENVELOPE_REJECTS

        self.stats.rejected += 1
        ENVELOPE_REJECTS.labels(role="vehicle", reason=reason.value).inc()
        record_reject(None, stage="vehicle", reason=reason.value, detail=detail)
        _log.warning("vehicle rejected an envelope: %s (%s)", reason.value, detail)

    def _handle(self, vehicle: ServedVehicle, value: object, topic: str) -> list[Any]:
        from fleetbus.providers.sealing_v2 import AcceptedEpoch

        vid = vehicle.identity.vehicle_id
        if type(value) is not bytes:
            self._reject(ReasonCode.MALFORMED, "record without a value")
            return []
        if self.codec is not None:
            # No envelope (a plaintext baseline, a test): the codec gives the command.
            command = self.codec.open_command(vid, value, topic)
            return self._execute(vehicle, command, command.expires_at)
        try:
            opened = vehicle.opener.open(value, topic=topic)
        except FleetbusError as exc:
            return self._rejected_envelope(vehicle, value, exc, topic)
        if isinstance(opened, AcceptedEpoch):
            if opened.sender != self.sealer_principal:
                # Verified, but only the bus sealer sends commands: its epochs are the only
                # ones that can ever carry one.
                self._forget_epoch(vehicle, opened.epoch_id)
                self._reject(ReasonCode.WRONG_RECIPIENT, "an epoch not from the bus sealer")
                return []
            if opened.new:
                self.stats.epochs += 1
            return self._release_held(vehicle, opened.epoch_id)
        if opened.sender != self.sealer_principal or opened.kind is not MessageKind.COMMAND:
            self._reject(ReasonCode.WRONG_RECIPIENT, "not a command from the bus sealer")
            return self._answer(vehicle, opened.message_id, None, 400, "not a command envelope")
        try:
            signed = SignedCommand.decode(opened.payload, max_size=self._max_size)
            command = signed.verify(self.directory, at=self._clock())
            self._check_binding(vid, opened.message_id, opened.action, command)
        except FleetbusError as exc:
            self._reject(exc.reason, str(exc))
            status = STATUS_FOR_REJECT.get(exc.reason, 400)
            return self._answer(vehicle, opened.message_id, None, status, exc.reason.value)
        return self._execute(vehicle, command, opened.expires_at)

    def _check_binding(self, vid: str, message_id: str, action: str, command: Command) -> None:
        if command.id != message_id or command.action != action:
            raise FleetbusError(
                "inner command does not match the envelope's id or action",
                reason=ReasonCode.TAMPERED,
            )
        target = command.target
        if target.vehicle is not None:
            if target.vehicle != vid:
                raise FleetbusError(
                    f"command is for {target.vehicle!r}", reason=ReasonCode.WRONG_RECIPIENT
                )
        else:
            record = self.directory.current(vid, at=self._clock())
            if target.group not in record.groups:
                raise FleetbusError(
                    f"vehicle is not in group {target.group!r}", reason=ReasonCode.WRONG_RECIPIENT
                )
        if command.is_expired(self._clock() - self._skew_s):
            raise FleetbusError("command has expired", reason=ReasonCode.EXPIRED)

    def _forget_epoch(self, vehicle: ServedVehicle, epoch_id: bytes) -> None:
        self.epochs.erase(vehicle.identity.vehicle_id, epoch_id)

    def _hold_for_epoch(
        self, vehicle: ServedVehicle, value: bytes, topic: str, exc: EpochUnknownError
    ) -> list[Any]:
        """Keep a v2 message whose epoch is unknown and ask the bus for the establishment
        (docs/wire-format.md V2.7). Nothing of it is trusted yet: it is bounded in number,
        kept only until its clear expiry, and executed only once its epoch is verified."""
        vid = vehicle.identity.vehicle_id
        now = self._clock()
        # Durable before the record's offset is committed (after this poll's answers): a
        # restart before the establishment comes again does not lose it.
        try:
            kept = self.store.hold(
                vid,
                exc.epoch_id,
                exc.sequence,
                exc.expires_at,
                value,
                topic,
                expired_before=now - self._skew_s,
                limit=HELD_PER_VEHICLE,
            )
        except sqlite3.Error as error:
            # Not held, so its offset must not be committed: read it again after a back-off.
            raise RetryLater(f"holding a message: {type(error).__name__}") from error
        if not kept:
            self._reject(ReasonCode.EPOCH_UNKNOWN, f"{vid}: held messages full; dropped")
            return []
        self._reject(ReasonCode.EPOCH_UNKNOWN, f"{vid}: held until its epoch is delivered again")
        _log.info("%s: message of unknown epoch %s held", vid, exc.epoch_id.hex())
        return self._ask_for_epoch(vehicle)

    def _ask_for_epoch(self, vehicle: ServedVehicle) -> list[Any]:
        """Send one signed ``epoch_unknown`` status for the held epoch of ``vehicle`` asked about
        least recently, at most one per ``STATUS_INTERVAL_S``; a status the interval holds back
        is owed, and ``poll_once`` sends it once the interval has passed.

        Per vehicle, not per epoch: unauthenticated records never make a vehicle talk faster.
        Least recently asked first: a held record repeated (a redelivery, or one forged with a
        made-up epoch) cannot take every status and starve the other held epochs."""
        from fleetbus.providers.sealing_v2 import make_status, sign_status

        vid = vehicle.identity.vehicle_id
        now = self._clock()
        if now - self._status_at.get(vid, float("-inf")) < STATUS_INTERVAL_S:
            self._status_owed.add(vid)
            return []
        self._status_owed.discard(vid)
        held = self.store.held_epochs(vid, expired_before=now - self._skew_s)
        if not held:
            self._asked.pop(vid, None)
            return []
        # Only the epochs still held are remembered (at most HELD_PER_VEHICLE of them).
        before = self._asked.get(vid, {})
        asked = {epoch_id: before.get(epoch_id, float("-inf")) for epoch_id, _ in held}
        epoch_id, sequence = min(held, key=lambda item: asked[item[0]])
        asked[epoch_id] = now
        self._asked[vid] = asked
        self._status_at[vid] = now
        status = make_status(
            topic=self._responses,
            recipient=self.sealer_principal,
            epoch_id=epoch_id,
            sequence=sequence,
            at=now,
        )
        record = sign_status(vehicle.identity.signer, vid, status)
        self.stats.epoch_statuses += 1
        return [self._send(self._responses, vid, record, [])]

    def _ask_owed(self) -> list[Any]:
        """The statuses held back by the interval whose time has come (``_ask_for_epoch``)."""
        out: list[Any] = []
        for vid in sorted(self._status_owed):
            try:
                out.extend(self._ask_for_epoch(self._vehicles[vid]))
            except RetryLater as exc:
                _log.warning("%s: epoch status not sent (%s); owed", vid, exc)
                self._status_owed.add(vid)
        return out

    def _renew_uplink(self, vehicle: ServedVehicle, value: bytes, topic: str) -> list[Any]:
        """The bus's ``uplink_epoch_unknown`` (docs/wire-format.md V2.7, "Uplink recovery"):
        verified (the bus sealer's signature, addressed to this vehicle on this topic, fresh),
        and acted on only for an uplink epoch this vehicle has open or whose answers its store
        remembers (also those of an earlier process). That epoch ends — the next message opens
        a new one with a new establishment, never the old epoch again, whose replay window the
        bus lost — and the answers sent in it go again from the executed-command store
        (answered, never executed again). Telemetry sent in it is not sent again (docs/sdk.md)."""
        from fleetbus.bus.envelope_v2 import StatusCode
        from fleetbus.providers.sealing_v2 import open_status

        vid = vehicle.identity.vehicle_id
        try:
            status = open_status(
                value,
                topic=topic,
                own_id=vid,
                directory=self.directory,
                clock=self._clock,
                skew_s=self._skew_s,
                max_size=self._max_size,
                roots=self._roots,
                code=StatusCode.UPLINK_EPOCH_UNKNOWN,
                sender=self.sealer_principal,
            )
        except FleetbusError as exc:
            self._reject(exc.reason, f"{vid}: uplink epoch status refused: {exc}")
            return []
        epoch = status.epoch_id
        ended = vehicle.uplink_v2.end(epoch)
        try:
            self._record_answered()  # answers of this poll batch may be in that epoch too
            answers = self.store.answers(vid, epoch)
        except sqlite3.Error as error:
            # The status is read again after a back-off; the epoch, though ended, is still
            # remembered in the store then.
            raise RetryLater(f"reading the answers of an uplink epoch: {error}") from error
        if ended is None and not answers.command_ids and not answers.unreadable:
            # Already renewed (a second status, or one replayed inside its freshness window),
            # or an epoch this vehicle never answered in: nothing to do, and nothing is sent.
            self._reject(ReasonCode.REPLAYED, f"{vid}: status for an epoch not open here")
            return []
        self.stats.uplink_renewed += 1
        _log.info("%s: bus lacks uplink epoch %s; renewed", vid, epoch.hex())
        for why in answers.unreadable:
            # Its command's outcome is reported expired by the track stage, as for a lost answer.
            self.stats.errors += 1
            _log.error("%s: %s; refused, that answer is not sent again", vid, why)
        out: list[Any] = []
        for command_id in answers.command_ids:
            out.extend(self._republish(vehicle, command_id))
        # Forgotten only once all went: a failure (RetryLater) reads the status again and
        # finds them still there; forgotten, a replayed status finds nothing and sends nothing.
        try:
            self.store.forget_answers(vid, epoch)
        except sqlite3.Error as error:
            raise RetryLater(f"forgetting the answers of an uplink epoch: {error}") from error
        return out

    def _release_held(self, vehicle: ServedVehicle, epoch_id: bytes) -> list[Any]:
        vid = vehicle.identity.vehicle_id
        ready = self.store.held(vid, epoch_id, expired_before=self._clock() - self._skew_s)
        if not ready:
            return []
        self._status_at.pop(vid, None)
        out: list[Any] = []
        handled: list[bytes] = []
        try:
            for message in ready:
                out.extend(self._handle(vehicle, message.record, message.topic))
                handled.append(message.digest)
        finally:
            # Those not handled (a retry of the establishment's record) stay held; a handled
            # one that came again would be a replay of its epoch, answered from the store.
            self.store.release(vid, handled)
        return out

    def _version_of(self, value: bytes) -> int:
        """The record's format version; 0 for a record that has none we read."""
        try:
            return record_version(value, max_size=self._max_size)
        except FleetbusError:
            return 0

    def _authenticated_id(self, value: bytes, exc: FleetbusError) -> str | None:
        """The message id of a refused record whose sender is authenticated, else None."""
        from fleetbus.providers.sealing_v2 import AuthenticatedRejectError

        if isinstance(exc, AuthenticatedRejectError):
            return exc.message_id
        if self._version_of(value) != 1:
            return None  # v2: only a message that passed the AEAD names its sender's id
        if exc.reason is not ReasonCode.REPLAYED and exc.reason not in AUTHENTICATED_REJECTS:
            return None
        return decode_envelope(value, max_size=self._max_size).header.message_id

    def _rejected_envelope(
        self, vehicle: ServedVehicle, value: bytes, exc: FleetbusError, topic: str
    ) -> list[Any]:
        from fleetbus.providers.sealing_v2 import EpochUnknownError, StatusRecordError

        vid = vehicle.identity.vehicle_id
        if isinstance(exc, EpochUnknownError):
            return self._hold_for_epoch(vehicle, value, topic, exc)
        if isinstance(exc, StatusRecordError):
            return self._renew_uplink(vehicle, value, topic)
        if exc.reason is ReasonCode.QKD_UNAVAILABLE and self._version_of(value) == 2:
            parsed = decode_record(value, max_size=self._max_size)
            if (
                isinstance(parsed, ParsedEstablishment)
                and self._clock() * 1000 < parsed.establishment.not_after_ms
            ):
                raise RetryLater("QKD key of an epoch establishment unavailable; retrying")
        if exc.reason is ReasonCode.REPLAYED:
            replayed_id = self._authenticated_id(value, exc)
            if replayed_id is None:
                self._reject(exc.reason, str(exc))
                return []
            # Authentic (the replay check follows the signature check, or the AEAD in v2) and
            # seen before: a redelivery. Answer it again if we have an answer.
            return self._answer_again(vehicle, replayed_id)
        if exc.reason is ReasonCode.QKD_UNAVAILABLE and self._version_of(value) == 1:
            # The key exists at our KME but cannot be fetched now (link or KME down): the
            # command is authentic and still valid, so wait for the KME rather than fail it.
            header = decode_envelope(value, max_size=self._max_size).header
            if self._clock() * 1000 < header.expires_at_ms:
                raise RetryLater(f"QKD key for {header.message_id} unavailable; retrying")
        self._reject(exc.reason, str(exc))
        message_id = self._authenticated_id(value, exc)
        if message_id is None:
            # An unauthenticated sender must not be able to make vehicles talk.
            return []
        status = STATUS_FOR_REJECT.get(exc.reason, 400)
        _log.info("answering %s for %s: %s", status, vid, exc.reason.value)
        return self._answer(vehicle, message_id, None, status, exc.reason.value)

    def _answer_again(self, vehicle: ServedVehicle, command_id: str) -> list[Any]:
        self.stats.duplicates += 1
        if self._batch is not None:
            # After the batch's results are recorded: its first copy may be in this batch.
            self._batch.append(self._pending(vehicle, command_id, None, 0.0))
            return []
        return self._republish(vehicle, command_id)

    def _republish(self, vehicle: ServedVehicle, command_id: str) -> list[Any]:
        found = self.store.lookup(vehicle.identity.vehicle_id, command_id)
        if found is None or found[1] is None:
            return []
        return self._publish_response(vehicle, Response.decode(found[1]))

    def _answer(
        self,
        vehicle: ServedVehicle,
        command_id: str,
        correlation_id: str | None,
        status: int,
        detail: str,
    ) -> list[Any]:
        response = Response(
            command_id=command_id,
            correlation_id=correlation_id,
            vehicle_id=vehicle.identity.vehicle_id,
            status=status,
            detail=detail,
            executed_at=self._clock(),
        )
        return self._publish_response(vehicle, response)
