"""The worker's smoke forwarder: the one faust agent of the worker, forwarding every record of
``smoke_source`` to ``smoke_sink`` (key and value unchanged) exactly once.

It carries no command and holds no key; the pipeline does not use it. It proves that the faust
host of a deployed worker runs against its brokers with transactions: the shipped image is
checked with it (``tests/integration/test_containers.py``), which is why it stays in the
package rather than in tests; ``tests/integration/test_faust_smoke.py`` drives it.
"""

from __future__ import annotations

import faust

from fleetbus.bus.settings import FleetbusSettings

__all__ = ["add_smoke_forwarder"]


def add_smoke_forwarder(app: faust.App, settings: FleetbusSettings) -> None:
    """Register the forwarder's agents on ``app``."""
    source = app.topic(settings.smoke_source, value_type=bytes, value_serializer="raw")
    sink = app.topic(settings.smoke_sink, value_type=bytes, value_serializer="raw")

    @app.agent(source)
    async def forward(stream: faust.StreamT[bytes]) -> None:
        """Forward every record, key and value unchanged."""
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
