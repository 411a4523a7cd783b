"""``fleetbus worker``: the stream processors of the command pipeline in a faust worker."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.bus.settings_env import load_settings, settings_rows


def settings_epilog() -> str:
    """The help epilog of ``fleetbus worker``: the names of every FLEETBUS_* setting."""
    # Click rewraps epilog paragraphs; \b keeps this one's lines as they are.
    names = [row[0] for row in settings_rows()]
    return (
        "Settings (environment; `fleetbus settings` or docs/settings.md say what each means):"
        "\n\n\b\n" + "\n".join(names)
    )


LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format", help="json or text on stderr [default: $FLEETBUS_LOG_FORMAT, else json]"
    ),
]
LogLevelOpt = Annotated[
    str | None, typer.Option("--log-level", help="[default: $FLEETBUS_LOG_LEVEL, else INFO]")
]


def worker(log_format: LogFormatOpt = None, log_level: LogLevelOpt = None) -> None:
    """Run the stream processors (settings from FLEETBUS_* environment variables)."""
    import faust

    from fleetbus.bus.topics import ensure_topics
    from fleetbus.observability.logging import LogFormat, configure_logging, resolve_log_format
    from fleetbus.observability.tracing_setup import setup_tracing
    from fleetbus.processors.app import (
        Pipeline,
        build_pipeline,
        create_app,
        ensure_pipeline_topics,
    )
    from fleetbus.processors.probes import WorkerProbes, serve_probes

    # First, so that every record of this process — ours, faust's, aiokafka's, warnings — goes
    # through the one redacting handler on stderr (JSON lines unless text is asked for).
    fmt = resolve_log_format(log_format)
    configure_logging("fleetbus-worker", log_format=fmt, level=log_level)
    # strict: a misspelt FLEETBUS_* variable stops the worker instead of being ignored.
    settings = load_settings(strict=True)
    # Spans get real ids (and go to OTLP or the console when OTEL_* asks for it), so the trace
    # context each stage writes into its outputs names the worker's own spans.
    setup_tracing("fleetbus-worker")
    # Build everything that reads local configuration (keys, registry, Cedar policies) before
    # the first connection to Kafka: a bad file is reported at once, not after a broker wait.
    pipelines: list[Pipeline] = []

    def build(pipeline_settings: FleetbusSettings) -> Pipeline:
        pipelines.append(build_pipeline(pipeline_settings))
        return pipelines[-1]

    faust_app = create_app(settings, pipeline_factory=build)
    not_ready = None
    if settings.pipeline == "auto" and not pipelines:
        not_ready = (
            f"pipeline=auto found no key directory ({KeyFolder(settings.keys_dir).root_pub}): "
            "this worker runs no command pipeline; mount the keys or set FLEETBUS_PIPELINE=off"
        )
        logging.getLogger("fleetbus.worker").warning("not ready: %s", not_ready)
    if settings.metrics_port:
        # Before Kafka is reached: a worker waiting for its brokers is live but not ready.
        probes = WorkerProbes(
            stages=[stage for p in pipelines for stage in p.stages], not_ready_reason=not_ready
        )
        serve_probes(probes, settings.metrics_port, settings.metrics_bind)
    ensure_topics(
        settings.kafka_bootstrap,
        [settings.smoke_source, settings.smoke_sink],
        partitions=settings.partitions,
        client_config=settings.kafka_client_config(),
    )
    if pipelines:
        ensure_pipeline_topics(settings)
        for pipeline in pipelines:
            pipeline.catch_up()  # revocations already published are in force before any record
    # faust's Worker would replace the root handlers with its own colour text handler and
    # redirect stdout into the log: keep ours (override_logging=False). Without its spinner it
    # logs "Ready" as a record; quiet keeps its few plain prints off stdout in JSON mode.
    faust_worker = faust.Worker(
        faust_app,
        loglevel=logging.getLevelName(logging.getLogger().level),
        override_logging=False,
        quiet=fmt is LogFormat.JSON,
    )
    faust_worker.spinner = None
    faust_worker.execute_from_commandline()
