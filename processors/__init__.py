"""fleetbus.processors: the command pipeline's stream processors.

The stages' logic (``stages``) is plain functions over records, testable without Kafka
(``engine`` computes what a batch produces); ``eos`` runs each stage exactly once against Kafka;
``app`` builds the pipeline and hosts it in the worker's faust app (``create_app``).
"""

from fleetbus.processors.app import create_app

__all__ = ["create_app"]
