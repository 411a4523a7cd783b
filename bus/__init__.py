"""fleetbus.bus: the contract processors, providers and clients meet on — errors, settings,
plugin loading, message and record formats, the envelope codecs, the key directory, topics.

It imports nothing of the project but itself; provider implementations are found by entry point
at start-up.
"""

from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.settings import FleetbusSettings, TopicNames

__all__ = [
    "FleetbusError",
    "FleetbusSettings",
    "ReasonCode",
    "TopicNames",
]
