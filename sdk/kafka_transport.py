"""The Kafka transport of the SDKs (kafka-python): one idempotent producer and, for a client that
reads, one consumer, made on first use. ``CommandPublisher`` and ``VehicleAgent`` build one from
their settings unless given another ``transport=`` (see ``fleetbus.sdk.transport``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.settings import FleetbusSettings

__all__ = ["KafkaTransport"]

_log = logging.getLogger(__name__)


class KafkaTransport:
    """kafka-python clients behind the ``Transport`` interface.

    - ``producer_options``: extra ``KafkaProducer`` options (the producer is always idempotent
      with ``acks=all``).
    - ``topic`` / ``group_id`` / ``consumer_options``: the topic to read, the consumer group
      that commits its offsets, extra ``KafkaConsumer`` options; no ``topic``: send only.
    - ``assign``: instead of subscribing with the group to every partition, assign the
      partitions this function returns for the topic's partition count — again whenever the
      count changes (after a repartition keys hash elsewhere, and keeping the old assignment
      would silently miss their records).

    ``connect`` and the other methods raise kafka-python's errors (``KafkaError``, ``OSError``);
    the clients translate them into ``KafkaUnavailableError`` with their own context.
    """

    def __init__(
        self,
        settings: FleetbusSettings,
        *,
        client_id: str,
        producer_options: Mapping[str, Any] | None = None,
        topic: str | None = None,
        group_id: str | None = None,
        consumer_options: Mapping[str, Any] | None = None,
        assign: Callable[[int], frozenset[int]] | None = None,
        close_timeout_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.topic = topic
        self.group_id = group_id
        self._producer_options = dict(producer_options or {})
        self._consumer_options = dict(consumer_options or {})
        self._assign = assign
        self._close_timeout_s = close_timeout_s
        self._assigned: tuple[int, frozenset[int]] | None = None  # (topic partitions, ours)
        #: The kafka-python clients; None until ``connect`` (or after ``close``).
        self.producer: Any = None
        self.consumer: Any = None

    def connect(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        if self.producer is None:
            self.producer = KafkaProducer(
                bootstrap_servers=self.settings.kafka_bootstrap,
                client_id=self.client_id,
                acks="all",
                enable_idempotence=True,
                **self._producer_options,
                **self.settings.kafka_client_config(),
            )
        if self.topic is None:
            return
        if self.consumer is None:
            self.consumer = KafkaConsumer(
                *(() if self._assign is not None else (self.topic,)),
                bootstrap_servers=self.settings.kafka_bootstrap,
                group_id=self.group_id,
                **self._consumer_options,
                **self.settings.kafka_client_config(),
            )
            self._assigned = None
        if self._assign is not None:
            self._assign_partitions(self._assign)

    def _assign_partitions(self, choose: Callable[[int], frozenset[int]]) -> None:
        from kafka import TopicPartition

        assert self.topic is not None
        count = len(self.consumer.partitions_for_topic(self.topic))
        if count == 0 and self._assigned is None:
            raise ConfigError(
                f"vehicle agent: topic {self.topic} does not exist or is not readable"
            )
        if self._assigned is not None and self._assigned[0] in (count, 0):
            return  # unchanged, or metadata briefly without the topic: keep what we read
        ours = choose(count)
        self.consumer.assign([TopicPartition(self.topic, p) for p in sorted(ours)])
        self._assigned = (count, ours)
        _log.info(
            "vehicle agent %s: reading %d of %d partitions of %s (confined to its vehicles)",
            self.group_id,
            len(ours),
            count,
            self.topic,
        )

    def send(
        self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> Any:
        if self.producer is None:
            self.connect()
        return self.producer.send(topic, key=key, value=value, headers=list(headers))

    def poll(self, timeout_s: float, max_records: int) -> Any:
        return self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)

    def seek(self, partition: Any, offset: int) -> None:
        self.consumer.seek(partition, offset)

    def committed(self, partition: Any) -> int | None:
        found = self.consumer.committed(partition)
        return None if found is None else int(found)

    def commit(self, offsets: Mapping[Any, int]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        self.consumer.commit(
            {
                TopicPartition(tp.topic, tp.partition): OffsetAndMetadata(offset, "", -1)
                for tp, offset in offsets.items()
            }
        )

    def reconnect(self) -> None:
        consumer, self.consumer = self.consumer, None
        if consumer is None:
            return
        try:
            consumer.close(autocommit=False, timeout_ms=5000)
        except Exception:  # a stuck client may fail to close; the new one joins regardless
            _log.warning("closing the stuck consumer failed", exc_info=True)

    def flush(self, timeout_s: float) -> None:
        if self.producer is not None:
            self.producer.flush(timeout=timeout_s)

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None
        if self.producer is not None:
            self.producer.flush(timeout=self._close_timeout_s)
            self.producer.close(timeout=self._close_timeout_s)
            self.producer = None
