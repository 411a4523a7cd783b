"""fleetbus.observability: metrics, tracing and logging, dashboards and alert rules.

Library code uses ``tracing`` (OpenTelemetry API only) and ``metrics``; the OpenTelemetry SDK is
set up once per process by ``tracing_setup.setup_tracing`` (the CLI calls it). It imports
nothing of the project but ``fleetbus.bus.errors`` (and ``fleetbus.bus.exports`` here).
"""

import typing as _typing

from fleetbus.bus.exports import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from fleetbus.observability.logging import LogFormat, configure_logging, setup_logging
    from fleetbus.observability.metrics import serve_metrics, set_build_info
    from fleetbus.observability.tracing import (
        consume_span,
        extract_context,
        get_tracer,
        inject_headers,
        send_span,
        stage_span,
    )
    from fleetbus.observability.tracing_setup import setup_tracing

__all__ = [
    "LogFormat",
    "configure_logging",
    "consume_span",
    "extract_context",
    "get_tracer",
    "inject_headers",
    "send_span",
    "serve_metrics",
    "set_build_info",
    "setup_logging",
    "setup_tracing",
    "stage_span",
]

#: Where each public name lives; imported on first use (PEP 562).
_MODULE_OF: dict[str, str] = {
    "LogFormat": "fleetbus.observability.logging",
    "configure_logging": "fleetbus.observability.logging",
    "setup_logging": "fleetbus.observability.logging",
    "serve_metrics": "fleetbus.observability.metrics",
    "set_build_info": "fleetbus.observability.metrics",
    "consume_span": "fleetbus.observability.tracing",
    "extract_context": "fleetbus.observability.tracing",
    "get_tracer": "fleetbus.observability.tracing",
    "inject_headers": "fleetbus.observability.tracing",
    "send_span": "fleetbus.observability.tracing",
    "stage_span": "fleetbus.observability.tracing",
    "setup_tracing": "fleetbus.observability.tracing_setup",
}

__getattr__, __dir__ = _lazy_exports(__name__, _MODULE_OF)
