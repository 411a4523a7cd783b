"""The three-node mode: replication factor 3, min.insync.replicas=2, survives losing a node.

The cluster runs with mutual TLS everywhere (clients, brokers, the controller quorum) and ACLs:
the test's clients are the worker principal with only its ``fleet_acls`` grants."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import TopicAuthorizationFailedError

from fleetbus.bus.settings import TopicNames
from fleetbus.bus.topics import ensure_topics
from fleetbus.devtools.kafka import LocalKafka, find_free_base_port, fleet_acls

WORKER = "fleetbus-worker"


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    cluster = LocalKafka(
        home=Path(tmp_path_factory.mktemp("kafka3")),
        brokers=3,
        base_port=find_free_base_port(6, start=23092),
        heap_mb=384,
        security="mtls",
    )
    try:
        cluster.up(timeout_s=180)
        cluster.create_acls(fleet_acls(TopicNames(), app_id="fleetbus", worker=WORKER))
        yield cluster
    finally:
        cluster.down()
    assert not any(node["pid"] for node in cluster.status()["nodes"])  # type: ignore[index]


def test_topics_are_replicated_three_ways_and_survive_a_node_loss(cluster3: LocalKafka) -> None:
    topic = "fleet.replicated"
    tls = cluster3.client_config(WORKER)
    ensure_topics(
        cluster3.bootstrap, [topic], partitions=3, replication_factor=3, client_config=tls
    )
    admin = KafkaAdminClient(bootstrap_servers=cluster3.bootstrap, **cluster3.client_config())
    try:
        (desc,) = admin.describe_topics([topic])
        assert len(desc["partitions"]) == 3
        for partition in desc["partitions"]:
            assert len(partition["replica_nodes"]) == 3, partition
    finally:
        admin.close()

    producer = KafkaProducer(
        bootstrap_servers=cluster3.bootstrap, acks="all", enable_idempotence=True, retries=10, **tls
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
        **tls,
    )
    values = [record.value for record in consumer]
    consumer.close()
    assert values.count(b"before") == 30
    assert values.count(b"during") == 30

    # Outside its grants the same principal is refused by the (restarted) cluster.
    outsider = KafkaProducer(bootstrap_servers=cluster3.bootstrap, max_block_ms=10_000, **tls)
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            outsider.send("other.topic", b"v").get(timeout=15)
    finally:
        outsider.close(timeout=5)
