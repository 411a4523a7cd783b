"""fleetbus.processors: the command pipeline — its exactly-once stages, their runner, the
faust worker host (``create_app``), the audit chain and the worker's probes.

The stages' logic (``stages``) is plain functions over records, testable without Kafka
(``engine`` computes what a batch produces); ``eos`` runs each stage exactly once against Kafka;
``app`` builds the pipeline and hosts it in the worker's faust app. Loaded on first use:
importing the package starts nothing and imports neither faust nor Kafka clients.
"""

import typing as _typing

from fleetbus.bus.exports import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from fleetbus.processors.app import Pipeline, build_pipeline, create_app, ensure_pipeline_topics
    from fleetbus.processors.audit import AuditChain, AuditEvent, verify_entries
    from fleetbus.processors.eos import DeadLetter
    from fleetbus.processors.probes import WorkerProbes, serve_probes

__all__ = [
    "AuditChain",
    "AuditEvent",
    "DeadLetter",
    "Pipeline",
    "WorkerProbes",
    "build_pipeline",
    "create_app",
    "ensure_pipeline_topics",
    "serve_probes",
    "verify_entries",
]

#: Where each public name lives; imported on first use (PEP 562).
_MODULE_OF: dict[str, str] = {
    "Pipeline": "fleetbus.processors.app",
    "build_pipeline": "fleetbus.processors.app",
    "create_app": "fleetbus.processors.app",
    "ensure_pipeline_topics": "fleetbus.processors.app",
    "AuditChain": "fleetbus.processors.audit",
    "AuditEvent": "fleetbus.processors.audit",
    "verify_entries": "fleetbus.processors.audit",
    "DeadLetter": "fleetbus.processors.eos",
    "WorkerProbes": "fleetbus.processors.probes",
    "serve_probes": "fleetbus.processors.probes",
}

__getattr__, __dir__ = _lazy_exports(__name__, _MODULE_OF)
