"""The compacted key topic, live: publish a directory change (its records, then its head) and
follow the topic into a ``KeyDirectory`` — never going back, never stopping on bad input.

Every item is written to partition 0, so a reader sees a change's records before the head that
covers them whatever the topic's partition count (a head read before its records would make
their set unusable until they arrive). Readers still read every partition: anything anyone
wrote there is checked. See docs/key-management.md ("Live updates").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from fleetbus.bus.directory import (
    HEAD_KAFKA_KEY,
    DirectoryHead,
    KeyDirectory,
    SignedDirectoryHead,
    SignedKeyRecord,
    head_to_kafka,
    to_kafka,
)
from fleetbus.bus.errors import FleetbusError, KafkaUnavailableError, ReasonCode
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.observability.metrics import KEY_DIRECTORY_HEAD, KEY_TOPIC_ITEMS

_log = logging.getLogger(__name__)

_AGAIN = "the folder is written: run `fleetbus keys publish` to publish it again"
#: The partition every key-topic item is written to (one total order of records and heads).
KEY_TOPIC_PARTITION: Final = 0


@dataclass(frozen=True)
class KeyTopicItem:
    """One record of the key topic as a reader got it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class KeyTopicRefusal:
    """An item the directory refused, and why (for the DLQ, the audit trail and the logs)."""

    item: KeyTopicItem
    reason: ReasonCode
    detail: str


class KeyTopicFollower:
    """Applies key-topic items to ``directory``: every refusal is counted, logged and handed to
    ``on_refused`` (the worker dead-letters and audits it); nothing raises.

    While catching up (reading the topic from its start), a head is held back until the next
    head under the same Kafka key or the end of the catch-up: a superseded head is what
    compaction deletes, so an uncompacted log is read as its compacted form would be, and a
    process that already has head N (its file or its ``HeadStore``) does not refuse heads
    1..N-1 on every start. A head older than the directory's *after* that is refused
    (``directory_rollback``).
    """

    def __init__(
        self,
        directory: KeyDirectory,
        *,
        role: str,
        on_refused: Callable[[KeyTopicRefusal], None] | None = None,
    ) -> None:
        self.directory = directory
        self.role = role
        self.on_refused = on_refused
        self.catching_up = True
        self._held_head: KeyTopicItem | None = None
        head = directory.head
        if head is not None:
            KEY_DIRECTORY_HEAD.labels(role=role).set(head.seq)

    def apply(self, item: KeyTopicItem) -> str:
        """Apply one item; returns its outcome: applied, skipped, held or refused."""
        if self.catching_up and item.key == HEAD_KAFKA_KEY:
            self._held_head = item
            return "held"
        return self._apply(item)

    def finish_catch_up(self) -> None:
        """The reader reached the end offsets it saw at start: apply the last head it held."""
        self.catching_up = False
        held, self._held_head = self._held_head, None
        if held is not None:
            self._apply(held)

    def _apply(self, item: KeyTopicItem) -> str:
        try:
            result = self.directory.ingest_kafka(item.value, item.key)
        except FleetbusError as exc:
            return self._refuse(item, exc.reason, str(exc))
        except Exception as exc:  # a bug must not stop the follower (nor un-revoke anything)
            _log.exception("key topic: unexpected error on %s", _where(item))
            return self._refuse(item, ReasonCode.MALFORMED, f"unexpected {type(exc).__name__}")
        if result is None:
            KEY_TOPIC_ITEMS.labels(role=self.role, outcome="skipped", reason="").inc()
            return "skipped"
        KEY_TOPIC_ITEMS.labels(role=self.role, outcome="applied", reason="").inc()
        if isinstance(result, DirectoryHead):
            KEY_DIRECTORY_HEAD.labels(role=self.role).set(result.seq)
            _log.info("key topic: directory head %d accepted (%s)", result.seq, _where(item))
        elif result.revoked:
            _log.info(
                "key topic: revocation of %s key %s in force (%s)",
                result.principal_id,
                result.key_id,
                _where(item),
            )
        return "applied"

    def _refuse(self, item: KeyTopicItem, reason: ReasonCode, detail: str) -> str:
        KEY_TOPIC_ITEMS.labels(role=self.role, outcome="refused", reason=reason.value).inc()
        _log.warning("key topic: refused %s: %s (%s)", _where(item), reason.value, detail)
        if self.on_refused is not None:
            try:
                self.on_refused(KeyTopicRefusal(item, reason, detail))
            except Exception:
                _log.exception("key topic: reporting a refusal failed")
        return "refused"


def _where(item: KeyTopicItem) -> str:
    return f"{item.topic}[{item.partition}]@{item.offset}"


# --- publishing ----------------------------------------------------------------------------


def key_topic_items(
    records: Iterable[SignedKeyRecord], head: SignedDirectoryHead
) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` of a change in publication order: its records, then its head."""
    return [*(to_kafka(signed) for signed in records), head_to_kafka(head)]


def publish_key_change(
    settings: FleetbusSettings,
    records: Iterable[SignedKeyRecord],
    head: SignedDirectoryHead,
    *,
    timeout_s: float = 30.0,
) -> None:
    """Publish ``records`` then ``head`` to the key topic and wait until all are acknowledged.

    The records' send is confirmed before the head is sent, so no reader can get the head
    without them (one partition: offsets order them too).
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    topic = settings.topics.full(settings.topics.keys)
    items = key_topic_items(records, head)
    try:
        producer = KafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id="fleetbus-keys",
            acks="all",
            enable_idempotence=True,
            max_block_ms=int(timeout_s * 1000),
            bootstrap_timeout_ms=int(timeout_s * 1000),
            **settings.kafka_client_config(),
        )
    except (KafkaError, OSError) as exc:
        raise KafkaUnavailableError(
            f"key topic: Kafka at {settings.kafka_bootstrap} did not answer "
            f"({type(exc).__name__}); {_AGAIN}"
        ) from exc
    try:
        *body, last = items
        futures = [
            producer.send(topic, key=k, value=v, partition=KEY_TOPIC_PARTITION) for k, v in body
        ]
        for future in futures:
            future.get(timeout=timeout_s)
        producer.send(topic, key=last[0], value=last[1], partition=KEY_TOPIC_PARTITION).get(
            timeout=timeout_s
        )
    except (KafkaError, OSError) as exc:
        raise KafkaUnavailableError(
            f"key topic {topic}: publishing failed ({type(exc).__name__}); {_AGAIN}"
        ) from exc
    finally:
        producer.close(timeout=timeout_s)


# --- a blocking reader (vehicle agents, tools) ---------------------------------------------


def read_from(
    head: DirectoryHead | None, margin_s: float, *, now: float | None = None
) -> float | None:
    """Where a reader of the key topic starts (a Unix time): ``margin_s`` before the time of
    ``head``, the head of the directory file whose records the reader already has, or before
    ``now`` if that head is dated later (a root holder's clock ahead must not make a reader skip
    what was published until now); None (the topic's start) without a head or with a negative
    margin (docs/key-management.md, "Reading the topic from the file's head")."""
    if head is None or margin_s < 0:
        return None
    return min(head.issued_at, time.time() if now is None else now) - margin_s


class KeyTopicReader:
    """Reads the whole key topic with kafka-python (no consumer group: every process reads
    every item) and applies it through a ``KeyTopicFollower``. Not thread-safe: call ``poll``
    from one thread (a ``VehicleAgent`` calls it from its own loop)."""

    def __init__(self, settings: FleetbusSettings, follower: KeyTopicFollower) -> None:
        self.settings = settings
        self.follower = follower
        self.topic = settings.topics.full(settings.topics.keys)
        self._consumer: Any = None
        self._end: dict[Any, int] = {}

    def since(self) -> float | None:
        """Where to start reading by default: ``key_topic_read_margin_s`` before the head of the
        follower's directory (the head of the file it loaded), None (the topic's start) without
        a head or with a negative margin."""
        return read_from(self.follower.directory.head, self.settings.key_topic_read_margin_s)

    def start(self, timeout_s: float = 30.0, *, since: float | None = None) -> None:
        """Assign every partition, read from ``since`` (a Unix time: the first item whose
        Kafka timestamp is not older; by default ``self.since()``, which may be the topic's
        start) up to the current end (catch-up).

        Reading from the directory's head is what keeps a large fleet's start-up short when
        every record is on the topic: the root holder publishes a change only after signing
        the head that covers it, so every item a directory file lacks carries a later
        timestamp than the file's head (docs/key-management.md, "Reading the topic from the
        file's head")."""
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        try:
            consumer = KafkaConsumer(
                bootstrap_servers=self.settings.kafka_bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                client_id="fleetbus-key-topic",
                **self.settings.kafka_client_config(),
            )
        except (KafkaError, OSError) as exc:
            raise KafkaUnavailableError(
                f"key topic: Kafka at {self.settings.kafka_bootstrap} did not answer "
                f"({type(exc).__name__})"
            ) from exc
        try:
            deadline = time.monotonic() + timeout_s
            partitions = consumer.partitions_for_topic(self.topic)
            while not partitions and time.monotonic() < deadline:
                time.sleep(0.1)
                partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                raise KafkaUnavailableError(f"key topic {self.topic} does not exist")
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            start = self.since() if since is None else since
            if start is None:
                consumer.seek_to_beginning(*tps)
            else:
                found = consumer.offsets_for_times({tp: max(0, int(start * 1000)) for tp in tps})
                for tp in tps:
                    at = found.get(tp)
                    if at is None:  # nothing as recent: only what arrives from now on
                        consumer.seek_to_end(tp)
                    else:
                        consumer.seek(tp, at.offset)
            self._consumer = consumer
            self._end = {tp: off for tp, off in consumer.end_offsets(tps).items() if off > 0}
            while not self._caught_up() and time.monotonic() < deadline:
                self.poll(0.2)
            if not self._caught_up():
                raise KafkaUnavailableError(f"key topic {self.topic}: catch-up did not finish")
        except BaseException:
            # A caller retries start(): never leave a consumer behind.
            self._consumer = None
            consumer.close(autocommit=False)
            raise

    def _caught_up(self) -> bool:
        if not self.follower.catching_up:
            return True
        if all(self._consumer.position(tp) >= end for tp, end in self._end.items()):
            self.follower.finish_catch_up()
            return True
        return False

    def poll(self, timeout_s: float = 0.0) -> int:
        """Apply what arrived (waiting up to ``timeout_s``); returns how many items were read."""
        if self._consumer is None:
            return 0
        from kafka.errors import KafkaError

        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=1000)
        except KafkaError as exc:
            _log.warning("key topic: poll failed (%s); retrying", type(exc).__name__)
            return 0
        count = 0
        for tp, records in batches.items():
            for record in records:
                count += 1
                self.follower.apply(
                    KeyTopicItem(tp.topic, tp.partition, record.offset, record.key, record.value)
                )
        if self.follower.catching_up:
            self._caught_up()
        return count

    def positions(self) -> dict[int, int]:
        """Partition -> next offset to read (where a follower taking over continues)."""
        if self._consumer is None:
            return {}
        return {tp.partition: self._consumer.position(tp) for tp in self._consumer.assignment()}

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
