"""fleetbus.sdk: the client libraries — the dispatch SDK (publish commands, follow their
outcomes) and the vehicle agent (verify, open, execute, answer), over a transport (Kafka, or
in memory for tests). What docs/sdk.md uses is importable from here; the two key-provider
names an agent may need (``QKDProvider`` for an edge unit on a QKD link, ``EpochPolicy`` for
uplink key epochs) are loaded on first use, so that importing the SDK loads no provider."""

from importlib import import_module
from typing import Any

from fleetbus.bus.commands import Command, Decision, Target
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.sdk.codec import PlaintextCodec, RecordCodec
from fleetbus.sdk.dispatch import (
    CommandHandle,
    CommandOutcome,
    CommandPublisher,
    StatusTimeoutError,
    read_status_events,
    status_partition,
)
from fleetbus.sdk.executed import ExecutedStore
from fleetbus.sdk.handlers import Handler, HandlerResult, VehicleHandler
from fleetbus.sdk.identity import VehicleIdentity, load_key_directory
from fleetbus.sdk.kafka_transport import KafkaTransport
from fleetbus.sdk.transport import MemoryRecord, MemoryTransport, Transport
from fleetbus.sdk.vehicle import AgentStats, VehicleAgent, outbound_partition

__all__ = [
    "AgentStats",
    "Command",
    "CommandHandle",
    "CommandOutcome",
    "CommandPublisher",
    "Decision",
    "EpochPolicy",
    "ExecutedStore",
    "FleetbusSettings",
    "Handler",
    "HandlerResult",
    "KafkaTransport",
    "MemoryRecord",
    "MemoryTransport",
    "PlaintextCodec",
    "QKDProvider",
    "RecordCodec",
    "StatusTimeoutError",
    "Target",
    "Transport",
    "VehicleAgent",
    "VehicleHandler",
    "VehicleIdentity",
    "load_key_directory",
    "outbound_partition",
    "read_status_events",
    "status_partition",
]

#: Public names that live in ``fleetbus.providers``, imported on first access.
_FROM_PROVIDERS = {
    "EpochPolicy": "fleetbus.providers.sealing",
    "QKDProvider": "fleetbus.providers.qkd",
}


def __getattr__(name: str) -> Any:
    module = _FROM_PROVIDERS.get(name)
    if module is None:
        raise AttributeError(f"module 'fleetbus.sdk' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
