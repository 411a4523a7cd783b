"""fleetbus.sdk: the client libraries — the dispatch SDK (publish commands, follow their
outcomes) and the vehicle agent (verify, open, execute, answer), over a transport (Kafka, or
in memory for tests). What docs/sdk.md uses is importable from here."""

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
    "ExecutedStore",
    "FleetbusSettings",
    "Handler",
    "HandlerResult",
    "KafkaTransport",
    "MemoryRecord",
    "MemoryTransport",
    "PlaintextCodec",
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
