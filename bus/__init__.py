"""fleetbus.bus: the API layer — message models, settings, errors, SDKs and the CLI.

It imports no provider implementation; those are found by entry point at start-up.
"""

from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.settings import FleetbusSettings, TopicNames

__all__ = [
    "FleetbusError",
    "FleetbusSettings",
    "ReasonCode",
    "TopicNames",
]
