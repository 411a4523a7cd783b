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
