"""Reading the status events of one command from its partition of ``commands.status``
(committed records only, no consumer group): what ``CommandHandle.wait`` and
``read_status_events`` read."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from fleetbus.bus.commands import StatusEvent
from fleetbus.bus.errors import ConfigError, FleetbusError, KafkaUnavailableError
from fleetbus.bus.settings import FleetbusSettings

__all__ = ["StatusReader", "read_status_events", "status_partition"]

_log = logging.getLogger("fleetbus.sdk.dispatch")


def kafka_error(action: str, bootstrap: str, exc: BaseException) -> KafkaUnavailableError:
    return KafkaUnavailableError(
        f"{action}: Kafka at {bootstrap} did not answer ({type(exc).__name__}: {exc})"
    )


def status_partition(command_id: str, partitions: Iterable[int]) -> int:
    """The partition of ``commands.status`` that holds ``command_id``'s events: Kafka's default
    partitioner (murmur2 of the key, as the bus's aiokafka producers use it)."""
    from kafka.partitioner.default import murmur2

    ordered = sorted(partitions)
    index: int = (murmur2(command_id.encode()) & 0x7FFFFFFF) % len(ordered)
    return ordered[index]


class StatusReader:
    """The committed status events of one command, from its partition of ``commands.status``."""

    def __init__(
        self, settings: FleetbusSettings, command_id: str, *, since_ms: int, timeout_s: float
    ) -> None:
        self._settings = settings
        self._command_id = command_id
        self._key = command_id.encode()
        self._since_ms = since_ms
        self._timeout_s = timeout_s
        self._topic = settings.topics.full(settings.topics.commands_status)
        self._deadline = time.monotonic() + timeout_s
        self._consumer: Any = None
        self._tp: Any = None

    def __enter__(self) -> StatusReader:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        bootstrap = self._settings.kafka_bootstrap
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=None,
                enable_auto_commit=False,
                # Events of aborted bus transactions never happened: they are written again.
                isolation_level="read_committed",
                client_id="fleetbus-dispatch-status",
                bootstrap_timeout_ms=max(int(self._timeout_s * 1000), 1),
                request_timeout_ms=max(int(self._timeout_s * 1000), 5000) + 1000,
                **self._settings.kafka_client_config(),
            )
        except (KafkaError, OSError) as exc:
            raise kafka_error("reading command status", bootstrap, exc) from exc
        try:
            partitions = self._consumer.partitions_for_topic(self._topic)
            if not partitions:
                # The broker answers the same for a topic that is missing and for one this
                # principal may not describe (ACLs): say both.
                raise ConfigError(
                    f"topic {self._topic} does not exist or this principal is not authorized to "
                    "read it (create the pipeline topics; a dispatcher that waits needs READ and "
                    "DESCRIBE on it, see docs/reliability.md)"
                )
            tp = TopicPartition(self._topic, status_partition(self._command_id, partitions))
            self._tp = tp
            self._consumer.assign([tp])
            # End offset first: a record appended after this call is at or beyond it, so a
            # partition without records since ``since_ms`` can safely start there.
            end = self._consumer.end_offsets([tp])[tp]
            found = self._consumer.offsets_for_times({tp: max(self._since_ms, 0)}).get(tp)
            self._consumer.seek(tp, found.offset if found is not None else end)
        except KafkaError as exc:
            self.close()
            raise kafka_error("reading command status", bootstrap, exc) from exc
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def time_left(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def poll(self) -> list[StatusEvent]:
        """The command's events of one poll (at most 500 ms or the time left)."""
        from kafka.errors import KafkaError

        left = self.time_left()
        out: list[StatusEvent] = []
        try:
            batches = self._consumer.poll(timeout_ms=max(1, min(int(left * 1000), 500)))
        except KafkaError as exc:
            raise kafka_error(
                "reading command status", self._settings.kafka_bootstrap, exc
            ) from exc
        for records in batches.values():
            for record in records:
                if record.key != self._key or record.value is None:
                    continue
                try:
                    event = StatusEvent.decode(record.value)
                except FleetbusError as exc:
                    _log.warning("skipping unreadable status record: %s", exc.reason.value)
                    continue
                if event.command_id == self._command_id:
                    out.append(event)
        return out

    def caught_up(self) -> bool:
        """Whether every committed record of the partition so far has been read."""
        from kafka.errors import KafkaError

        try:
            end = self._consumer.end_offsets([self._tp])[self._tp]
            return bool(self._consumer.position(self._tp) >= end)
        except KafkaError as exc:
            raise kafka_error(
                "reading command status", self._settings.kafka_bootstrap, exc
            ) from exc


def read_status_events(
    settings: FleetbusSettings,
    command_id: str,
    *,
    since_ms: int,
    timeout_s: float,
) -> Iterator[StatusEvent]:
    """Yield the committed status events of ``command_id`` stamped at or after ``since_ms``
    (read from the command's partition only), until ``timeout_s`` has passed (a generator;
    closing it closes the consumer)."""
    with StatusReader(settings, command_id, since_ms=since_ms, timeout_s=timeout_s) as reader:
        while reader.time_left():
            yield from reader.poll()
