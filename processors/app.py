"""The faust application factory. There is no module-level app: every process builds its own."""

from __future__ import annotations

import os
from typing import Any

import faust

from fleetbus.bus.settings import FleetbusSettings


def faust_config(settings: FleetbusSettings) -> dict[str, Any]:
    """faust settings derived from ours; kept in one place so tests and workers agree."""
    return {
        "broker": [f"kafka://{hp.strip()}" for hp in settings.kafka_bootstrap.split(",")],
        "store": "memory://",
        "processing_guarantee": settings.processing_guarantee,
        "datadir": os.path.expanduser(settings.data_dir),
        "web_enabled": settings.web_port != 0,
        "web_port": settings.web_port or 6066,
        "web_bind": "127.0.0.1",
        "broker_session_timeout": settings.broker_session_timeout_s,
        "broker_heartbeat_interval": settings.broker_heartbeat_interval_s,
        "consumer_auto_offset_reset": "earliest",
        "topic_partitions": settings.partitions,
        # The leader topic is one more auto-declared topic we do not use.
        "topic_disable_leader": True,
        "producer_acks": -1,
    }


def create_app(settings: FleetbusSettings | None = None) -> faust.App:
    """Build the faust app with its agents wired to the configured topics."""
    settings = settings or FleetbusSettings()
    app = faust.App(settings.app_id, **faust_config(settings))

    source = app.topic(settings.smoke_source, value_type=bytes, value_serializer="raw")
    sink = app.topic(settings.smoke_sink, value_type=bytes, value_serializer="raw")

    @app.agent(source)
    async def forward(stream: faust.StreamT[bytes]) -> None:
        """Smoke pipeline: forward every record, key and value unchanged."""
        async for event in stream.events():
            await sink.send(key=event.key, value=event.value)

    # faust only sends inside a transaction to topics that the worker subscribes to and that
    # are co-partitioned with the source (it needs their partition metadata and assignor group
    # to pick the transactional producer); to any other topic it silently sends without one.
    # Subscribing to the sink makes the forward exactly-once. See docs/kafka.md.
    @app.agent(sink)
    async def observe_forwarded(stream: faust.StreamT[bytes]) -> None:
        async for _ in stream:
            pass

    return app
