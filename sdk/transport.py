"""The transport seam of the SDKs: what ``CommandPublisher`` and ``VehicleAgent`` need from a
message bus (send records, poll records, seek, commit, close), and ``MemoryTransport``, an
in-memory implementation for tests (ours and users'). The Kafka implementation is
``fleetbus.sdk.kafka_transport.KafkaTransport``, the default of both clients.

Failures are reported as ``kafka.errors.KafkaError`` (the errors the clients already retry or
translate into ``KafkaUnavailableError``), whatever the transport.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Delivery",
    "MemoryRecord",
    "MemoryTransport",
    "Partition",
    "Record",
    "Transport",
]

Headers = Sequence[tuple[str, bytes]]


class Record(Protocol):
    """A record as a transport hands it out (kafka-python's ``ConsumerRecord`` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Headers: ...


class Delivery(Protocol):
    """The future of a sent record (kafka-python's ``FutureRecordMetadata`` is one): ``get``
    waits for the broker's acknowledgement and returns the record's metadata (``partition``,
    ``offset``, ``timestamp``); callbacks run once it is acknowledged."""

    def get(self, timeout: float | None = None) -> Any: ...
    def add_callback(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...
    def add_errback(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class Transport(Protocol):
    """Send records, poll records, move and commit read positions, close.

    Positions are per partition (``Partition``: ``topic`` and ``partition``); ``poll`` returns
    the records read since the last poll grouped by partition, in offset order; ``seek`` makes
    the next poll of that partition start at ``offset``; ``commit`` records the offsets to
    resume from after a restart. ``reconnect`` drops the consumer without committing (the next
    poll starts a new one). ``connect`` opens the clients now (else on first use).
    """

    def connect(self) -> None: ...
    def send(self, topic: str, key: bytes, value: bytes, headers: Headers) -> Delivery: ...
    def poll(self, timeout_s: float, max_records: int) -> Mapping[Any, Sequence[Record]]: ...
    def seek(self, partition: Any, offset: int) -> None: ...
    def committed(self, partition: Any) -> int | None: ...
    def commit(self, offsets: Mapping[Any, int]) -> None: ...
    def reconnect(self) -> None: ...
    def flush(self, timeout_s: float) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Partition:
    """One partition of one topic (hashable; kafka-python's ``TopicPartition`` is the same)."""

    topic: str
    partition: int


@dataclass(frozen=True)
class MemoryRecord:
    """A record of ``MemoryTransport``: fed to the client, or sent by it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    timestamp: int = 0


@dataclass(frozen=True)
class _Delivered:
    """A delivery that is acknowledged at once (the memory broker never fails)."""

    metadata: MemoryRecord

    def get(self, timeout: float | None = None) -> MemoryRecord:
        return self.metadata

    def add_callback(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> _Delivered:
        f(*args, self.metadata, **kwargs)
        return self

    def add_errback(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> _Delivered:
        return self


@dataclass
class MemoryTransport:
    """An in-memory bus, like httpx's ``MockTransport``: ``feed`` puts a record where the client
    polls it; what the client sends is kept in ``sent``; commits and seeks in ``commits`` and
    ``seeks`` (``{partition number: offset}`` per commit). Give it to a client as
    ``transport=``::

        transport = MemoryTransport()
        agent = VehicleAgent(settings, ..., transport=transport)
        transport.feed(outbound_topic, b"V-0017", sealed_command)
        agent.poll_once(0)
        [answer] = transport.sent
    """

    clock: Callable[[], float] = time.time
    sent: list[MemoryRecord] = field(default_factory=list)
    commits: list[dict[int, int]] = field(default_factory=list)
    seeks: list[tuple[Partition, int]] = field(default_factory=list)
    closed: bool = False
    _logs: dict[Partition, list[MemoryRecord]] = field(default_factory=dict, init=False)
    _positions: dict[Partition, int] = field(default_factory=dict, init=False)
    _committed: dict[Partition, int] = field(default_factory=dict, init=False)
    _sent_offsets: dict[Partition, itertools.count[int]] = field(default_factory=dict, init=False)

    def feed(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        partition: int = 0,
        headers: Headers = (),
    ) -> MemoryRecord:
        """Append a record to ``topic``'s ``partition``: the next ``poll`` returns it."""
        tp = Partition(topic, partition)
        log = self._logs.setdefault(tp, [])
        record = MemoryRecord(
            topic, partition, len(log), key, value, tuple(headers), self._now_ms()
        )
        log.append(record)
        return record

    def _now_ms(self) -> int:
        return round(self.clock() * 1000)

    # -- Transport ------------------------------------------------------------------------

    def connect(self) -> None:
        pass

    def send(self, topic: str, key: bytes, value: bytes, headers: Headers) -> _Delivered:
        tp = Partition(topic, 0)
        offset = next(self._sent_offsets.setdefault(tp, itertools.count()))
        record = MemoryRecord(topic, 0, offset, key, value, tuple(headers), self._now_ms())
        self.sent.append(record)
        return _Delivered(record)

    def poll(self, timeout_s: float, max_records: int) -> dict[Partition, list[MemoryRecord]]:
        out: dict[Partition, list[MemoryRecord]] = {}
        left = max_records
        for tp, log in self._logs.items():
            start = self._positions.get(tp, 0)
            records = log[start : start + left]
            if records:
                out[tp] = records
                self._positions[tp] = start + len(records)
                left -= len(records)
        return out

    def seek(self, partition: Any, offset: int) -> None:
        tp = Partition(partition.topic, partition.partition)
        self.seeks.append((tp, offset))
        self._positions[tp] = offset

    def committed(self, partition: Any) -> int | None:
        return self._committed.get(Partition(partition.topic, partition.partition))

    def commit(self, offsets: Mapping[Any, int]) -> None:
        self.commits.append({tp.partition: offset for tp, offset in offsets.items()})
        for tp, offset in offsets.items():
            self._committed[Partition(tp.topic, tp.partition)] = offset

    def reconnect(self) -> None:
        # A new consumer of the group resumes from the committed offsets.
        self._positions = dict(self._committed)

    def flush(self, timeout_s: float) -> None:
        pass

    def close(self) -> None:
        self.closed = True
