"""fleetbus.processors: the command pipeline — its exactly-once stages, their runner, the
faust worker host (``create_app``), the audit chain and the worker's probes.

Business logic lives in plain functions the stages call, testable without Kafka. Loaded on first
use: importing the package starts nothing and imports neither faust nor Kafka clients.
"""

import importlib as _importlib
import typing as _typing

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


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
