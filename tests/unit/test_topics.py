"""The topic catalogue (fleetbus.bus.topics) names every topic of TopicNames exactly once, and
the worker creates exactly the catalogue's topics."""

from __future__ import annotations

from fleetbus.bus import topics
from fleetbus.bus.settings import FleetbusSettings, TopicNames
from fleetbus.processors.app import pipeline_topics


def test_every_topic_name_is_in_exactly_one_group_of_the_catalogue() -> None:
    groups = [topics.FLEET_TOPICS, topics.COMPACTED_TOPICS, topics.SINGLE_PARTITION_TOPICS]
    catalogued = [name for group in groups for name in group]
    assert len(catalogued) == len(set(catalogued))
    assert set(catalogued) == set(TopicNames.model_fields) - {"prefix"}


def test_the_worker_creates_the_catalogue_topics() -> None:
    settings = FleetbusSettings(topics=TopicNames(prefix="acme."))
    t = settings.topics
    regular, compacted = pipeline_topics(settings)
    assert regular == [t.full(getattr(t, name)) for name in topics.FLEET_TOPICS]
    assert t.full(t.keys) in compacted
    assert regular[0] == "acme.commands.requested"


def test_only_the_worker_writes_the_verified_responses() -> None:
    """The track stage trusts commands.responses.verified as verified by the response stage:
    a vehicle (or any principal but the worker) must not be able to write it."""
    from fleetbus.devtools.kafka.acls import fleet_acls

    t = TopicNames(prefix="acme.")
    grants = fleet_acls(
        t, app_id="fleetbus", worker="worker", dispatchers=["d"], vehicles=["v"],
        status_readers=["s"], key_publishers=["k"],
    )  # fmt: skip
    verified = t.full(t.commands_responses_verified)
    writers = {
        g.principal
        for g in grants
        if g.operation == "WRITE"
        and (g.name == verified or (g.pattern == "PREFIXED" and verified.startswith(g.name)))
    }
    assert writers == {"worker"}
    assert any(
        g.principal == "v" and g.operation == "WRITE" and g.name == t.full(t.commands_responses)
        for g in grants
    )


# --- the partitioner the key directory buckets vehicles by (issue 12) ------------------------


def test_murmur2_is_kafkas_default_partitioner() -> None:
    """The contract's murmur2 gives every key the partition the Kafka clients give it (key
    lengths 0-40 cover every tail length), so a vehicle's directory bucket is its partition."""
    from aiokafka.partitioner import murmur2 as aiokafka_murmur2
    from kafka.partitioner.default import murmur2 as kafka_murmur2

    from fleetbus.bus.topics import kafka_partition, murmur2

    keys = [bytes(range(n)) for n in range(41)]
    keys += [f"vehicle-{i}".encode() for i in range(2000)] + ["V-ÄÖ-17".encode()]
    for key in keys:
        assert murmur2(key) == kafka_murmur2(key) & 0xFFFFFFFF
        assert (murmur2(key) & 0x7FFFFFFF) == (aiokafka_murmur2(key) & 0x7FFFFFFF)
        for partitions in (1, 2, 3, 16, 48):
            expected = (kafka_murmur2(key) & 0x7FFFFFFF) % partitions
            assert kafka_partition(key, partitions) == expected


def test_a_vehicles_bucket_is_its_partition() -> None:
    """With as many buckets as partitions, vehicle bucket i holds exactly the vehicles whose
    records Kafka puts on partition i of a topic keyed by vehicle id (commands.outbound)."""
    from fleetbus.bus.directory import principal_set
    from fleetbus.sdk.vehicle import outbound_partition

    for i in range(3000):
        vid = f"V-{i}"
        for partitions in (2, 16):
            assert principal_set(vid, "vehicle", partitions) == 1 + outbound_partition(
                vid, partitions
            )
    assert principal_set("dispatch-1", "dispatcher", 16) == 0
