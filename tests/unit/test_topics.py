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
