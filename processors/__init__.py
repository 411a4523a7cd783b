"""fleetbus.processors: the faust app factory and its agents.

Business logic lives in plain functions the agents call, testable without Kafka.
"""

from fleetbus.processors.app import create_app

__all__ = ["create_app"]
