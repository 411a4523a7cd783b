"""The three-node mode: replication factor 3, min.insync.replicas=2, survives losing a node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from fleetbus.bus.dev.kafka import LocalKafka, find_free_base_port
from fleetbus.bus.topics import ensure_topics


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    cluster = LocalKafka(
        home=Path(tmp_path_factory.mktemp("kafka3")),
        brokers=3,
        base_port=find_free_base_port(6, start=39092),
        heap_mb=384,
    )
    try:
        cluster.up(timeout_s=180)
        yield cluster
    finally:
        cluster.down()
    assert not any(node["pid"] for node in cluster.status()["nodes"])  # type: ignore[index]


def test_topics_are_replicated_three_ways_and_survive_a_node_loss(cluster3: LocalKafka) -> None:
    topic = "fleet.replicated"
    ensure_topics(cluster3.bootstrap, [topic], partitions=3, replication_factor=3)
    admin = KafkaAdminClient(bootstrap_servers=cluster3.bootstrap)
    try:
        (desc,) = admin.describe_topics([topic])
        assert len(desc["partitions"]) == 3
        for partition in desc["partitions"]:
            assert len(partition["replica_nodes"]) == 3, partition
    finally:
        admin.close()

    producer = KafkaProducer(
        bootstrap_servers=cluster3.bootstrap, acks="all", enable_idempotence=True, retries=10
    )
    for i in range(30):
        producer.send(topic, key=f"V-{i}".encode(), value=b"before")
    producer.flush()

    cluster3.kill_node(2)  # two of three remain: acks=all with min ISR 2 still succeeds
    for i in range(30):
        producer.send(topic, key=f"V-{i}".encode(), value=b"during").get(timeout=60)
    producer.close()
    cluster3.up(timeout_s=120)

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=cluster3.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10000,
    )
    values = [record.value for record in consumer]
    consumer.close()
    assert values.count(b"before") == 30
    assert values.count(b"during") == 30
