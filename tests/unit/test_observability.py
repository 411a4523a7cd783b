"""Logging (JSON, trace ids, redaction) and metric helpers, without I/O."""

from __future__ import annotations

import io
import json
import logging
import platform
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.observability import metrics
from fleetbus.observability.logging import (
    REDACTED,
    JsonFormatter,
    LogFormat,
    RedactingFilter,
    configure_logging,
    is_secret_key,
    redact,
    resolve_log_format,
)
from fleetbus.observability.tracing import get_tracer
from fleetbus.observability.tracing_setup import setup_tracing

FAKE_PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----MC4CAQAwBQYDK2VwBCIEIFAKEFAKEFAKE-----END"
FAKE_KEY_BYTES = bytes(range(32))


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(service="test"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("fleetbus.test.observability")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_secret_extra_fields_never_reach_the_log_line(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    logger.info(
        "loaded principal %s",
        "V-17",
        extra={
            "private_key": FAKE_PRIVATE_KEY,
            "signing": {"seed": FAKE_PRIVATE_KEY, "alg": "ed25519"},
            "api_token": "tok-" + FAKE_PRIVATE_KEY,
            "material": FAKE_KEY_BYTES,
            "envelope": [FAKE_KEY_BYTES, "ok"],
            "key_id": "V-17/xwing/1",
            "vehicle_id": "V-17",
        },
    )
    raw = stream.getvalue()
    assert "FAKEFAKE" not in raw
    assert FAKE_KEY_BYTES.hex() not in raw
    assert repr(FAKE_KEY_BYTES) not in raw
    (line,) = _lines(stream)
    assert line["message"] == "loaded principal V-17"
    assert line["private_key"] == REDACTED
    assert line["api_token"] == REDACTED
    assert line["signing"] == {"seed": REDACTED, "alg": "ed25519"}
    assert line["material"] == REDACTED
    assert line["envelope"] == ["[32 bytes]", "ok"]
    # Identifiers stay readable: an operator needs them.
    assert line["key_id"] == "V-17/xwing/1"
    assert line["vehicle_id"] == "V-17"
    assert line["level"] == "info"
    assert line["service"] == "test"


def test_bytes_message_arguments_are_masked(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.warning("shared secret was %r", FAKE_KEY_BYTES)
    (line,) = _lines(stream)
    assert line["message"] == "shared secret was '[32 bytes]'"


def test_lines_carry_the_current_trace_and_span_id(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    provider = setup_tracing("t", exporter=InMemorySpanExporter(), set_global=False, environ={})
    try:
        with get_tracer(provider).start_as_current_span("seal") as span:
            logger.info("inside")
            ctx = span.get_span_context()
        logger.info("outside")
    finally:
        provider.shutdown()
    inside, outside = _lines(stream)
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert "trace_id" not in outside


def test_exceptions_are_type_message_and_reason_only(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    try:
        raise FleetbusError("signature did not verify", reason=ReasonCode.BAD_SIGNATURE)
    except FleetbusError:
        logger.exception("open failed")
    (line,) = _lines(stream)
    assert line["error"] == {
        "type": "FleetbusError",
        "message": "signature did not verify",
        "reason": "bad_signature",
    }


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger's handlers, level and warnings capture after a test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def configure_for_test(*args: Any, **kwargs: Any) -> None:
    """``configure_logging``, keeping only this thread's records on the new root handlers.

    The root logger is process-wide: a thread another test left behind (a Kafka client's IO
    loop) would otherwise write into these streams."""
    configure_logging(*args, **kwargs)
    me = threading.get_ident()
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: record.thread == me)


def test_process_logging_defaults_to_json_lines_and_reads_the_environment(
    root_logging: None,
) -> None:
    stream = io.StringIO()
    configure_for_test("fleetbus-worker", environ={}, stream=stream)
    assert logging.getLogger().level == logging.INFO
    logging.getLogger("faust.worker").info("Ready")
    logging.getLogger("fleetbus.x").debug("not at INFO")
    (line,) = _lines(stream)
    assert line["service"] == "fleetbus-worker"
    assert (line["level"], line["logger"], line["message"]) == ("info", "faust.worker", "Ready")

    # Called again (idempotent): the previous handler goes, one line per record.
    stream = io.StringIO()
    env = {"FLEETBUS_LOG_FORMAT": "TEXT", "FLEETBUS_LOG_LEVEL": "debug"}
    configure_for_test("fleetbus-worker", environ=env, stream=stream)
    logging.getLogger("fleetbus.x").debug("now %s", "shown")
    (text,) = stream.getvalue().splitlines()
    assert text.endswith(" DEBUG fleetbus.x: now shown")
    # An explicit argument (the CLI option) wins over the environment.
    assert resolve_log_format("json", environ=env) is LogFormat.JSON
    assert resolve_log_format(None, environ=env) is LogFormat.TEXT


def test_process_logging_turns_warnings_into_records(root_logging: None) -> None:
    import warnings

    stream = io.StringIO()
    configure_for_test("svc", environ={}, stream=stream)
    warnings.warn("faust setting deprecated", DeprecationWarning, stacklevel=1)
    (line,) = _lines(stream)
    assert line["logger"] == "py.warnings"
    assert "faust setting deprecated" in str(line["message"])


@pytest.mark.parametrize(("fmt", "level"), [("xml", None), ("json", "LOUD")])
def test_process_logging_refuses_unknown_formats_and_levels(
    root_logging: None, fmt: str, level: str | None
) -> None:
    with pytest.raises(ConfigError, match=r"FLEETBUS_LOG_(FORMAT|LEVEL)"):
        configure_logging("svc", log_format=fmt, level=level, environ={}, stream=io.StringIO())


def test_text_lines_are_redacted_and_carry_the_trace_id_without_tracebacks(
    root_logging: None,
) -> None:
    stream = io.StringIO()
    configure_for_test("svc", log_format="text", environ={}, stream=stream)
    log = logging.getLogger("fleetbus.test.text")
    provider = setup_tracing("t", exporter=InMemorySpanExporter(), set_global=False, environ={})
    try:
        with get_tracer(provider).start_as_current_span("execute") as span:
            log.info("derived %r", FAKE_KEY_BYTES)
            try:
                raise FleetbusError("tag mismatch", reason=ReasonCode.BAD_SIGNATURE)
            except FleetbusError:
                log.exception("open failed")
            trace_id = format(span.get_span_context().trace_id, "032x")
    finally:
        provider.shutdown()
    first, second = stream.getvalue().splitlines()
    assert first.endswith(f"INFO fleetbus.test.text: derived '[32 bytes]' trace_id={trace_id}")
    assert second.endswith(f"open failed trace_id={trace_id} [FleetbusError: tag mismatch]")
    assert "Traceback" not in stream.getvalue()


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("private_key", True),
        ("PrivateKey", True),
        ("client_secret", True),
        ("db_password", True),
        ("passwd", True),
        ("token", True),
        ("shared_secret", True),
        ("key_id", False),
        ("keypath", False),
        ("vehicle_id", False),
        ("reason", False),
    ],
)
def test_secret_key_names(name: str, secret: bool) -> None:
    assert is_secret_key(name) is secret


def test_redact_is_bounded_in_depth() -> None:
    deep: dict[str, object] = {"a": "x"}
    for _ in range(20):
        deep = {"n": deep}
    out = json.dumps(redact(deep))
    assert "[...]" in out


# -- metric helpers ------------------------------------------------------------------------


def _value(name: str, labels: dict[str, str]) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_circuit_state() -> None:
    metrics.set_circuit_state("unit-provider", "open")
    assert _value("fleetbus_provider_circuit_state", {"provider": "unit-provider"}) == 2
    metrics.set_circuit_state("unit-provider", "half_open")
    assert _value("fleetbus_provider_circuit_state", {"provider": "unit-provider"}) == 1
    with pytest.raises(KeyError):
        metrics.set_circuit_state("unit-provider", "ajar")


def test_build_info_names_versions_and_the_crypto_backend() -> None:
    """fleetbus_build_info is set, in the process registry and in a server's own registry."""
    info = metrics.build_info()
    assert set(info) == {"version", "version_python", "version_crypto"}
    assert info["version_python"] == platform.python_version()
    assert "OpenSSL" in info["version_crypto"]
    metrics.set_build_info()
    assert _value("fleetbus_build_info", info) == 1
    own = CollectorRegistry()
    metrics.set_build_info(own)
    assert own.get_sample_value("fleetbus_build_info", info) == 1
    exposition = generate_latest(own).decode()
    assert 'fleetbus_build_info{version="' in exposition  # what scrapers and tests match on


def test_metric_names_are_stable() -> None:
    """Other code and the dashboard use these names; renaming one is a breaking change."""
    names = {
        m.describe()[0].name
        for m in vars(metrics).values()
        if hasattr(m, "describe") and hasattr(m, "_name")
    }
    assert {
        "fleetbus_stage_duration_seconds",
        "fleetbus_command_e2e_latency_seconds",
        "fleetbus_records",
        "fleetbus_kafka_produce_retries",
        "fleetbus_kafka_produce_errors",
        "fleetbus_keypath_selected",
        "fleetbus_keypath_failover",
        "fleetbus_provider_up",
        "fleetbus_provider_circuit_state",
        "fleetbus_qkd_stored_keys",
        "fleetbus_policy_decisions",
        "fleetbus_dlq_records",
        "fleetbus_envelope_rejects",
        "fleetbus_key_expiry_seconds",
        "fleetbus_consumer_lag_records",
        "fleetbus_audit_records",
        "fleetbus_internal_errors",
        "fleetbus_build",
    } <= names
