"""OpenTelemetry SDK set-up: the process's ``TracerProvider`` and its exporters, once per process.

Only entry points call this (the CLI's long-running commands, tests); library code uses the API
helpers of ``fleetbus.observability.tracing`` and never imports ``opentelemetry.sdk``. The
``OTEL_*`` variables are read the way the OpenTelemetry SDK reads them: exporters by name from
the ``opentelemetry_traces_exporter`` entry-point group, the sampler (``OTEL_TRACES_SAMPLER``),
span limits and resource attributes (``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``) by the
SDK itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Final

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)

from fleetbus.bus.errors import ConfigError

#: The entry-point group the OpenTelemetry SDK looks span exporters up in, by name.
EXPORTER_GROUP: Final = "opentelemetry_traces_exporter"
#: Entry-point name of each OTLP protocol (``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``).
_OTLP_BY_PROTOCOL: Final = {
    "http/protobuf": "otlp_proto_http",
    "grpc": "otlp_proto_grpc",
}
#: The package that provides each exporter name fleetbus documents.
_PACKAGE_OF: Final = {
    "otlp_proto_http": "opentelemetry-exporter-otlp-proto-http",
    "otlp_proto_grpc": "opentelemetry-exporter-otlp-proto-grpc",
    "console": "opentelemetry-sdk",
}


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The entry-point names of the span exporters ``environ`` asks for.

    ``OTEL_TRACES_EXPORTER`` (comma-separated; ``none`` for none) as the SDK reads it, ``otlp``
    resolved by ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``
    (default ``http/protobuf``, the protocol the OTLP specification recommends). Unset, OTLP is
    chosen when an OTLP endpoint is configured, else nothing: a process without a collector
    exports nowhere, and its spans still get ids for the logs.
    """
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
        raw = "otlp" if endpoint else "none"
    names: list[str] = []
    for part in raw.split(","):
        name = part.strip().lower()
        if not name or name == "none":
            continue
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            ).strip()
            if protocol not in _OTLP_BY_PROTOCOL:
                raise ConfigError(
                    f"OTLP protocol {protocol!r} (OTEL_EXPORTER_OTLP_PROTOCOL) is not one of "
                    + ", ".join(sorted(_OTLP_BY_PROTOCOL))
                )
            name = _OTLP_BY_PROTOCOL[protocol]
        if name not in names:
            names.append(name)
    return names


def load_exporter(name: str) -> SpanExporter:
    """A new span exporter of entry point ``name`` in ``opentelemetry_traces_exporter``."""
    found = entry_points(group=EXPORTER_GROUP, name=name)
    if not found:
        package = _PACKAGE_OF.get(name)
        hint = f": pip install {package}" if package else ""
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER names span exporter {name!r}, which no installed package "
            f"provides (entry-point group {EXPORTER_GROUP}){hint}"
        )
    exporter_class = next(iter(found)).load()
    exporter = exporter_class()
    if not isinstance(exporter, SpanExporter):
        raise ConfigError(f"entry point {name!r} of {EXPORTER_GROUP} is not a span exporter")
    return exporter


def setup_tracing(
    service_name: str,
    *,
    exporter: SpanExporter | None = None,
    set_global: bool = True,
    environ: Mapping[str, str] | None = None,
) -> TracerProvider:
    """Create the process's TracerProvider.

    Export goes to ``exporter`` if one is given (synchronously: meant for tests); otherwise to
    the exporters :func:`exporter_names` reads from the environment (batched; OTLP/HTTP reads
    the remaining ``OTEL_EXPORTER_OTLP_*`` variables itself). ``service_name`` is the
    ``service.name`` unless ``OTEL_SERVICE_NAME`` sets one.
    """
    env = os.environ if environ is None else environ
    name = (env.get("OTEL_SERVICE_NAME") or "").strip() or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        for name in exporter_names(env):
            provider.add_span_processor(BatchSpanProcessor(load_exporter(name)))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider
