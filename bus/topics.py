"""Explicit topic creation: the broker never auto-creates, so every process declares its own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from fleetbus.bus.errors import KafkaUnavailableError


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
