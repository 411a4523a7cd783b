"""What the demo reads back from the running system: ``commands.status`` as it is written, whole
topics (read_committed) and the worker's failover metrics."""

from __future__ import annotations

import re
import threading
import urllib.request
from typing import Any

from fleetbus.bus.commands import StatusEvent
from fleetbus.bus.errors import ConfigError, FleetbusError
from fleetbus.bus.settings import FleetbusSettings


class StatusFollower:
    """Reads ``commands.status`` (read_committed) from the beginning in a thread and keeps every
    event by command id, with the time it was read."""

    def __init__(self, settings: FleetbusSettings) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.topic = settings.topics.full(settings.topics.commands_status)
        self._consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            client_id="fleetbus-demo-status",
        )
        partitions = self._consumer.partitions_for_topic(self.topic) or set()
        if not partitions:
            raise ConfigError(f"topic {self.topic} does not exist")
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)
        self._lock = threading.Lock()
        self._events: dict[str, list[StatusEvent]] = {}
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batches = self._consumer.poll(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    try:
                        event = StatusEvent.decode(record.value)
                    except FleetbusError:
                        continue
                    with self._lock:
                        self._events.setdefault(event.command_id, []).append(event)
                        self.count += 1

    def events(self, command_id: str) -> list[StatusEvent]:
        with self._lock:
            return list(self._events.get(command_id, ()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


def read_topic(bootstrap: str, topic: str, *, idle_s: float = 2.0) -> list[Any]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
        consumer_timeout_ms=int(idle_s * 1000),
    )
    try:
        return list(consumer)
    finally:
        consumer.close()


def scrape_failovers(metrics_url: str) -> list[dict[str, Any]]:
    """``fleetbus_keypath_failover_total`` samples from the worker's /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    rows = []
    for line in text.splitlines():
        if not line.startswith("fleetbus_keypath_failover_total{"):
            continue
        labels_text, value = line.rsplit(" ", 1)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
        if float(value) > 0:
            rows.append({**labels, "count": int(float(value))})
    return sorted(rows, key=lambda r: (-r["count"], r.get("profile", "")))
