"""kafka-python against the real broker: produce, consume in a group, resume from commits."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError


def _consume(topic: str, bootstrap: str, group: str, want: int) -> list[bytes]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=15000,
    )
    got: list[bytes] = []
    try:
        for record in consumer:
            got.append(record.value)
            if len(got) == want:
                break
        consumer.commit()
    finally:
        consumer.close()
    return got


def test_produce_and_consume_with_a_group_resumes_from_committed_offsets(
    kafka_bootstrap: str, make_topics: Callable[..., list[str]]
) -> None:
    (topic,) = make_topics("smoke", partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    for i in range(10):
        producer.send(topic, key=b"V-1", value=f"m{i}".encode())
    producer.flush()

    first = _consume(topic, kafka_bootstrap, "g1", want=4)
    assert first == [b"m0", b"m1", b"m2", b"m3"]
    # Same group: continues after the committed offset instead of starting over.
    rest = _consume(topic, kafka_bootstrap, "g1", want=6)
    assert rest == [f"m{i}".encode() for i in range(4, 10)]
    # Another group sees everything from the start.
    assert len(_consume(topic, kafka_bootstrap, "g2", want=10)) == 10
    producer.close()


def test_broker_does_not_auto_create_topics(kafka_bootstrap: str) -> None:
    from kafka import KafkaAdminClient

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_block_ms=3000)
    try:
        # Metadata for an unknown topic never arrives, because the broker refuses to create it.
        with pytest.raises(KafkaError):
            producer.send("test.never.created", value=b"x").get(timeout=5)
    finally:
        producer.close(timeout=1)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        assert "test.never.created" not in admin.list_topics()
    finally:
        admin.close()
