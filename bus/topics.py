"""The topic catalogue, and explicit topic creation: the broker never auto-creates, so every
process declares its own. Topic *names* are settings (``TopicNames``); which topics exist and how
each is created is said here, once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any, Final

from fleetbus.bus.errors import ConfigError, KafkaUnavailableError

__all__ = [
    "COMPACTED_TOPICS",
    "FLEET_TOPICS",
    "SINGLE_PARTITION_TOPICS",
    "check_copartitioned",
    "ensure_topics",
]

# The catalogue, by ``TopicNames`` field; every field but ``prefix`` is in exactly one group
# (tests/unit/test_topics.py).
#: Regular topics with the fleet's partition count (``FleetbusSettings.partitions``), in the
#: order the worker creates them. One count for all: a stage joins its inputs and its state by
#: partition number (``check_copartitioned``). Keys: ``commands_outbound`` and
#: ``telemetry_*`` by vehicle id; ``commands_responses`` by vehicle id (wire v2) or, from agents
#: without v2, by command id (v1, docs/wire-format.md V2.10), read by the response stage; every
#: other command topic, ``commands_responses_verified`` included, by command id — the track
#: stage joins ``commands_authorized``, ``commands_status`` and ``commands_responses_verified``.
FLEET_TOPICS: Final = (
    "commands_requested",
    "commands_authorized",
    "commands_rejected",
    "commands_outbound",
    "commands_responses",
    "commands_responses_verified",
    "commands_approvals",
    "commands_status",
    "telemetry_raw",
    "telemetry_verified",
    "dlq",
)
#: Compacted (``cleanup.policy=compact``): the key directory, read whole by every process.
COMPACTED_TOPICS: Final = ("keys",)
#: One partition, so each audit chain's order is the log's (docs/audit.md).
SINGLE_PARTITION_TOPICS: Final = ("audit",)


def ensure_topics(
    bootstrap: str,
    names: Iterable[str],
    *,
    partitions: int,
    replication_factor: int = 1,
    configs: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    client_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    An existing topic is left alone, even when its partition count differs: changing it would
    re-key vehicles onto other partitions, which is an operator's decision, not a start-up side
    effect. ``client_config`` adds kafka-python security settings
    (``FleetbusSettings.kafka_client_config()``).
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    wanted = list(dict.fromkeys(names))
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=int(timeout_s * 1000),
            client_id="fleetbus-admin",
            **dict(client_config or {}),
        )
    except (KafkaError, OSError) as exc:
        raise KafkaUnavailableError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    try:
        existing = set(admin.list_topics())
        missing = [n for n in wanted if n not in existing]
        if missing:
            new = [
                NewTopic(
                    name=n,
                    num_partitions=partitions,
                    replication_factor=replication_factor,
                    topic_configs=dict(configs or {}),
                )
                for n in missing
            ]
            # Another process may create the same topic at the same moment; that is fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
            admin.wait_for_topics(missing, timeout_ms=int(timeout_s * 1000))
        return missing
    finally:
        admin.close()


def check_copartitioned(what: str, counts: Mapping[str, int | None]) -> None:
    """Refuse to run ``what`` when the topics it joins by partition number (``counts``: topic ->
    partition count from the broker, None when the topic does not exist) differ in count.

    Range assignment gives one worker partition p of every input, and the stage's state for p
    lives in partition p of its changelog: with unequal counts a command's records would meet
    different state on different workers, or none. ``ensure_topics`` does not repartition an
    existing topic, so this is checked at start against the broker's metadata. A missing topic
    is not a mismatch (the worker waits for it, as for any input)."""
    present = {topic: n for topic, n in counts.items() if n is not None}
    if len(set(present.values())) > 1:
        listed = ", ".join(f"{topic} has {n}" for topic, n in present.items())
        raise ConfigError(
            f"{what}: co-partitioned topics must have equal partition counts, but {listed}; "
            "repartition them to one count (docs/kafka.md) before starting"
        )
