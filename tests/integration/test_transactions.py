"""Kafka transactions on the real broker: aborted records never reach read_committed readers."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from kafka import KafkaConsumer, KafkaProducer


def _values(topic: str, bootstrap: str, isolation: str) -> list[bytes]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation,
        consumer_timeout_ms=5000,
    )
    try:
        return [record.value for record in consumer]
    finally:
        consumer.close()


def test_aborted_transaction_is_invisible_to_read_committed(
    kafka_bootstrap: str, make_topics: Callable[..., list[str]]
) -> None:
    (topic,) = make_topics("txn")
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"txn-{uuid.uuid4().hex}"
    )
    producer.init_transactions()

    producer.begin_transaction()
    producer.send(topic, value=b"aborted-1")
    producer.send(topic, value=b"aborted-2")
    producer.flush()
    producer.abort_transaction()

    producer.begin_transaction()
    producer.send(topic, value=b"committed")
    producer.commit_transaction()
    producer.close()

    assert _values(topic, kafka_bootstrap, "read_committed") == [b"committed"]
    # The aborted records are physically in the log; only isolation hides them.
    assert _values(topic, kafka_bootstrap, "read_uncommitted") == [
        b"aborted-1",
        b"aborted-2",
        b"committed",
    ]
