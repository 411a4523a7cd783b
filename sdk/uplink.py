"""The uplink part of the vehicle agent: answers (``Response``) and telemetry sealed to the bus
sealer; when the bus announces wire format v2, both go in v2 keyed by vehicle id (telemetry
batched), else in v1 (answers keyed by command id)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from fleetbus.bus.commands import (
    ParamValue,
    Response,
    SignedTelemetryBatch,
    Telemetry,
    TelemetryBatch,
    new_command_id,
)
from fleetbus.bus.envelope import MessageKind
from fleetbus.bus.errors import ConfigError, FleetbusError, KafkaUnavailableError
from fleetbus.observability.tracing import get_tracer, send_span
from fleetbus.sdk.agentcore import (
    ANSWER_EPOCHS,
    ANSWER_ID_BYTES,
    UPLINK_TTL_S,
    WIRE2_CAPABILITY,
    AgentCore,
    RetryLater,
    ServedVehicle,
    _end_delivered,
    _end_failed,
    trace_headers,
)

if TYPE_CHECKING:
    from fleetbus.providers.sealing_v2 import EpochSealer

__all__ = ["UplinkPart"]


class UplinkPart(AgentCore):
    """Answers and telemetry (a part of ``VehicleAgent``)."""

    def _publish_response(self, vehicle: ServedVehicle, response: Response) -> list[Any]:
        self.stats.answered += 1
        self.stats.by_status[response.status] = self.stats.by_status.get(response.status, 0) + 1
        if self.codec is not None:
            # No envelope (a plaintext baseline, a test): the codec gives the record.
            value = self.codec.encode_response(vehicle.identity.vehicle_id, response)
            return [self._send(self._responses, response.command_id, value, trace_headers())]
        # The envelope's message id is the command id (the bus checks that they match), so the
        # bus's replay check drops a re-sent answer it already has and takes one it missed.
        now = self._clock()
        recipient = self._uplink_v2(now)
        if recipient is not None:
            # v2, keyed by vehicle id: the bus verifies it where the vehicle's epochs live.
            key = vehicle.identity.vehicle_id
            try:
                records, announce = self._seal_v2(
                    vehicle, MessageKind.RESPONSE, self._responses, response.command_id,
                    response.encode(), recipient, now,
                )  # fmt: skip
            except FleetbusError as exc:
                raise RetryLater(f"sealing to {self.sealer_principal}: {exc.reason.value}") from exc
        else:
            # v1 stays keyed by command id, where its replay state lives (wire-format.md V2.10).
            key = response.command_id
            records = [
                self._seal(
                    vehicle,
                    MessageKind.RESPONSE,
                    self._responses,
                    response.command_id,
                    "response",
                    response.encode(),
                )
            ]
            announce = None
        futures = [self._send(self._responses, key, value, []) for value in records[:-1]]
        headers: list[tuple[str, bytes]] = []
        # The span ends when the broker acknowledged the answer, with its partition and offset.
        with send_span(
            get_tracer(),
            self._responses,
            headers,
            key=key,
            bootstrap=self.settings.kafka_bootstrap,
            client_id=self._client_id,
            end_on_exit=False,
        ) as span:
            try:
                future = self._send(self._responses, key, records[-1], headers)
            except BaseException:
                span.end()
                raise
        if hasattr(future, "add_callback"):
            future.add_callback(_end_delivered, span).add_errback(_end_failed, span)
        else:
            span.end()  # a stand-in producer without delivery reports: nothing to wait for
        futures.append(future)
        if announce is not None:
            _after_ack(futures[0], announce)
        return futures

    def _seal_v2(
        self,
        vehicle: ServedVehicle,
        kind: MessageKind,
        topic: str,
        message_id: str,
        payload: bytes,
        recipient: Any,
        now: float,
    ) -> tuple[list[bytes], Callable[[object], None] | None]:
        """One v2 message to the bus sealer in the vehicle's uplink epoch for ``topic``,
        preceded by the epoch's establishment until the broker acknowledged one: the records,
        and what to call once the first is acknowledged (None: no establishment sent)."""
        from fleetbus.providers.sealing import SealRequest

        prepared = vehicle.uplink_v2.prepare(
            SealRequest(
                kind, topic, recipient, message_id, "", payload, now, now + UPLINK_TTL_S,
                vehicle.profile,
            )
        )  # fmt: skip
        [records] = vehicle.uplink_v2.records_for([prepared])
        if kind is MessageKind.RESPONSE:
            # Remembered, in the store, to be sent again if the bus reports this epoch unknown.
            self._answered.append((vehicle.identity.vehicle_id, prepared.epoch_id, message_id))
        if len(records) == 1:
            return records, None
        # Messages go without the establishment only once the broker acknowledged it; until
        # then every message carries it again.
        return records, partial(_announce, vehicle.uplink_v2, prepared.epoch_id)

    def _record_answered(self) -> None:
        """Write the uplink epochs of the answers sent since the last call to the store, in one
        durable transaction (raises ``sqlite3.Error``; then they stay to be written again). A
        restarted agent then still sends them again when the bus reports their epoch unknown
        (docs/wire-format.md V2.7.1)."""
        if self._answered:
            self.store.record_answers(
                self._answered, epochs=ANSWER_EPOCHS, id_bytes=ANSWER_ID_BYTES
            )
            self._answered = []

    def _seal(
        self,
        vehicle: ServedVehicle,
        kind: MessageKind,
        topic: str,
        message_id: str,
        action: str,
        payload: bytes,
    ) -> bytes:
        now = self._clock()
        try:
            recipient = self.directory.recipient_keys(self.sealer_principal, at=now)
            return vehicle.sealer.seal(
                kind,
                topic,
                recipient,
                message_id,
                action,
                payload,
                now,
                now + UPLINK_TTL_S,
                vehicle.profile,
            )
        except FleetbusError as exc:
            raise RetryLater(f"sealing to {self.sealer_principal}: {exc.reason.value}") from exc

    # -- telemetry ------------------------------------------------------------------------

    def publish_telemetry(
        self, vehicle_id: str, fields: Mapping[str, ParamValue], *, at: float | None = None
    ) -> Any:
        """Seal ``fields`` as a ``tel`` envelope to the bus sealer on ``telemetry.raw`` (key:
        vehicle id). Returns the Kafka future; raises ``FleetbusError`` on bad input."""
        vehicle = self._vehicles.get(vehicle_id)
        if vehicle is None:
            raise ConfigError(f"vehicle {vehicle_id!r} is not served by this agent")
        telemetry = Telemetry(
            vehicle_id=vehicle_id, at=self._clock() if at is None else at, fields=dict(fields)
        )
        if self._uplink_v2(self._clock()) is not None:
            # v2: this reading and any queued ones go now, as one batch.
            vehicle.readings.append((telemetry.at, dict(telemetry.fields)))
            return self._flush_readings(vehicle)
        return self._publish_v1(vehicle, telemetry)

    def _publish_v1(self, vehicle: ServedVehicle, telemetry: Telemetry) -> Any:
        vehicle_id = vehicle.identity.vehicle_id
        try:
            envelope = self._seal(
                vehicle,
                MessageKind.TELEMETRY,
                self._telemetry,
                new_command_id(),
                "telemetry",
                telemetry.encode(),
            )
            future = self._send(self._telemetry, vehicle_id, envelope, trace_headers())
        except RetryLater as exc:
            raise KafkaUnavailableError(f"telemetry of {vehicle_id}: {exc}") from exc
        self.stats.telemetry += 1
        return future

    def add_reading(
        self, vehicle_id: str, fields: Mapping[str, ParamValue], *, at: float | None = None
    ) -> Any:
        """Queue one reading of ``vehicle_id``. With wire format v2 (the bus sealer's record
        announces ``wire2``) readings are batched — flushed as one v2 message when the batch
        reaches ``telemetry_batch_readings`` readings or ``telemetry_batch_bytes`` bytes, or its
        oldest reading ``telemetry_batch_age_s`` (``poll_once`` and ``flush_telemetry`` check
        the age) — and the future of the batch that this reading completed is returned, else
        None. Without v2 every reading is sent at once (``publish_telemetry``)."""
        vehicle = self._vehicles.get(vehicle_id)
        if vehicle is None:
            raise ConfigError(f"vehicle {vehicle_id!r} is not served by this agent")
        now = self._clock()
        when = now if at is None else at
        # Validated here, so that one bad reading is refused alone and never sinks its batch.
        reading = Telemetry(vehicle_id=vehicle_id, at=when, fields=dict(fields))
        if self._uplink_v2(now) is None:
            return self.publish_telemetry(vehicle_id, fields, at=when)
        if not vehicle.readings:
            vehicle.batch_started = now
        vehicle.readings.append((reading.at, dict(reading.fields)))
        vehicle.batch_bytes += len(reading.encode()) - len(vehicle_id)
        settings = self.settings
        if (
            len(vehicle.readings) >= settings.telemetry_batch_readings
            or vehicle.batch_bytes >= settings.telemetry_batch_bytes
        ):
            return self._flush_readings(vehicle)
        return None

    def flush_telemetry(self, *, older_than_s: float | None = None) -> list[Any]:
        """Send every queued batch (or only those whose oldest reading is older than
        ``older_than_s``); returns the futures of the batches sent."""
        now = self._clock()
        futures = []
        for vehicle in self._vehicles.values():
            if vehicle.readings and (
                older_than_s is None or now - vehicle.batch_started >= older_than_s
            ):
                futures.append(self._flush_readings(vehicle))
        return futures

    def _uplink_v2(self, now: float) -> Any:
        """The bus sealer's keys when it announces wire format v2, else None."""
        try:
            keys = self.directory.recipient_keys(self.sealer_principal, at=now)
        except FleetbusError:
            return None
        return keys if WIRE2_CAPABILITY in keys.capabilities else None

    def _flush_readings(self, vehicle: ServedVehicle) -> Any:
        """Send the queued readings of ``vehicle`` as one v2 batch; on a sealing failure they
        stay queued (``KafkaUnavailableError``), so none is lost."""
        vid = vehicle.identity.vehicle_id
        readings = vehicle.readings
        now = self._clock()
        recipient = self._uplink_v2(now)
        if recipient is None:
            # The bus stopped announcing wire2 (its record was re-issued): v1, one by one.
            vehicle.readings, vehicle.batch_bytes = [], 0
            future = None
            for at, fields in readings:
                future = self._publish_v1(vehicle, Telemetry(vid, at, fields))
            return future
        batch = TelemetryBatch(vid, tuple(readings))
        try:
            # Signed inside the encrypted message: the bus keeps the signed bytes as evidence,
            # and the topic shows no more than without a signature (docs/sdk.md).
            payload = (
                SignedTelemetryBatch.sign(batch, vehicle.identity.signer).encode()
                if self.sign_telemetry
                else batch.encode()
            )
            records, announce = self._seal_v2(
                vehicle, MessageKind.TELEMETRY, self._telemetry, new_command_id(), payload,
                recipient, now,
            )  # fmt: skip
        except FleetbusError as exc:
            raise KafkaUnavailableError(f"telemetry of {vid}: {exc.reason.value}") from exc
        vehicle.readings, vehicle.batch_bytes = [], 0
        futures = [self._send(self._telemetry, vid, value, trace_headers()) for value in records]
        if announce is not None:
            _after_ack(futures[0], announce)
        self.stats.telemetry += len(readings)
        return futures[-1]

    def flush(self, timeout_s: float = 30.0) -> None:
        self.flush_telemetry()
        self.transport.flush(timeout_s)


def _announce(sealer: EpochSealer, epoch_id: bytes, _metadata: object) -> None:
    sealer.announced([epoch_id])


def _after_ack(future: Any, then: Callable[[object], None]) -> None:
    """``then`` once the broker acknowledged ``future`` (at once for a transport without
    delivery reports)."""
    if future is None or not hasattr(future, "add_callback"):
        then(None)
    else:
        future.add_callback(then)
