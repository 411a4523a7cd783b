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
    "kafka_partition",
    "murmur2",
]

_M: Final = 0x5BD1E995
_MASK: Final = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (seed 0x9747b28c) as the Java client, kafka-python and aiokafka compute
    it for a record key; unsigned 32 bits. Here so that the contract (the key directory's
    vehicle buckets) needs no Kafka client library."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & ~3
    extra = length % 4
    if extra >= 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a record with ``key``: the positive part
    of murmur2 of the key bytes, modulo the partition count."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# The catalogue, by ``TopicNames`` field; every field but ``prefix`` is in exactly one group
# (tests/unit/test_topics.py).
#: Regular topics with the fleet's partition count (``FleetbusSettings.partitions``), in the
#: order the worker creates them. One count for all: a stage joins its inputs and its state by
#: partition number (``check_copartitioned``). Keys: ``commands_outbound`` and
#: ``telemetry_*`` by vehicle id; ``commands_responses`` by vehicle id (wire v2) or, from agents
#: without v2, by command id (v1, docs/wire-format.md V2.10), read by the response stage; every
#: other command topic, ``commands_responses_verified`` included, by command id — the track
#: stage joins ``commands_authorized``, ``commands_status`` and ``commands_responses_verified`` —
#: except that ``commands_authorized`` also carries the seal stage's copies, keyed by vehicle id
#: (a group command's: one per partition), docs/pipeline.md.
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
