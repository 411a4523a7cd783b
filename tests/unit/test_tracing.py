"""Tracing: W3C trace context across a simulated Kafka hop, messaging attributes, span events."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, Tracer

from fleetbus.bus.errors import ConfigError
from fleetbus.observability import tracing
from fleetbus.observability.tracing import (
    EVENT_FAILOVER,
    EVENT_REJECT,
    consume_span,
    extract_context,
    inject_headers,
    record_delivery,
    record_failover,
    record_reject,
    send_span,
    stage_span,
)
from fleetbus.observability.tracing_setup import exporter_names, setup_tracing


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    p = setup_tracing("fleetbus-test", exporter=exporter, set_global=False, environ={})
    yield p
    p.shutdown()


@pytest.fixture
def tracer(provider: TracerProvider) -> Tracer:
    return tracing.get_tracer(provider)


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    matches = [s for s in spans if s.name == name]
    assert len(matches) == 1, [s.name for s in spans]
    return matches[0]


def test_parent_child_chain_across_a_kafka_hop(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    """dispatch → (headers) → seal stage → (headers) → vehicle: one trace, each a child."""
    # Dispatcher side: publish to commands.requested.
    headers_1: list[tuple[str, bytes]] = [("content-type", b"application/cbor")]
    with (
        tracer.start_as_current_span("dispatch"),
        send_span(tracer, "fleet.commands.requested", headers_1, key="cmd-1") as span,
    ):
        record_delivery(span, partition=2, offset=41)
    assert [k for k, _ in headers_1] == ["content-type", "traceparent"]

    # Only the bytes cross the "broker": a consumer in another process sees these headers.
    wire_headers = [(k, bytes(v)) for k, v in headers_1]
    headers_2: list[tuple[str, bytes]] = []
    with (
        consume_span(
            tracer,
            "fleet.commands.requested",
            wire_headers,
            key="cmd-1",
            partition=2,
            offset=41,
            consumer_group="fleetbus",
        ),
        stage_span(tracer, "seal"),
        send_span(tracer, "fleet.commands.outbound", headers_2, key="V-17", partition=0),
    ):
        pass
    with consume_span(tracer, "fleet.commands.outbound", headers_2, key="V-17", offset=7):
        pass

    spans = exporter.get_finished_spans()
    dispatch = _by_name(spans, "dispatch")
    send_1 = _by_name(spans, "send fleet.commands.requested")
    process_1 = _by_name(spans, "process fleet.commands.requested")
    seal = _by_name(spans, "seal")
    send_2 = _by_name(spans, "send fleet.commands.outbound")
    process_2 = _by_name(spans, "process fleet.commands.outbound")

    trace_id = dispatch.context.trace_id
    assert {s.context.trace_id for s in spans} == {trace_id}
    chain = [dispatch, send_1, process_1, seal, send_2, process_2]
    for parent, child in itertools.pairwise(chain):
        assert child.parent is not None
        assert child.parent.span_id == parent.context.span_id, (parent.name, child.name)
    assert process_1.parent is not None
    assert process_1.parent.is_remote
    assert send_1.kind is SpanKind.PRODUCER
    assert process_1.kind is SpanKind.CONSUMER

    assert dict(send_1.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.destination.name": "fleet.commands.requested",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.kafka.message.key": "cmd-1",
        "messaging.destination.partition.id": "2",
        "messaging.kafka.destination.partition": 2,
        "messaging.kafka.offset": 41,
    }
    attrs = dict(process_1.attributes or {})
    assert attrs["messaging.operation.type"] == "process"
    assert attrs["messaging.consumer.group.name"] == "fleetbus"
    assert attrs["messaging.kafka.offset"] == 41


def test_missing_or_garbled_headers_start_a_new_trace(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    bad = [("traceparent", b"\xff\xfe not ascii"), ("traceparent", b"00-zz-01")]
    with consume_span(tracer, "fleet.commands.requested", bad):
        pass
    with consume_span(tracer, "fleet.commands.requested", None):
        pass
    first, second = exporter.get_finished_spans()
    assert first.parent is None
    assert second.parent is None
    assert first.context.trace_id != second.context.trace_id


def test_inject_replaces_an_upstream_traceparent(tracer: Tracer) -> None:
    headers: list[tuple[str, bytes]] = [
        ("Traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")
    ]
    with tracer.start_as_current_span("x") as span:
        inject_headers(headers)
        own = format(span.get_span_context().trace_id, "032x")
    assert len(headers) == 1
    assert headers[0][1].decode().split("-")[1] == own
    ctx = extract_context(headers)
    from opentelemetry import trace

    assert format(trace.get_current_span(ctx).get_span_context().trace_id, "032x") == own


def test_failover_and_reject_are_span_events(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("seal"):
        record_failover(
            None,
            profile="standard",
            from_path="qkd-etsi014+xwing",
            to_path="xwing",
            reason="qkd_unavailable",
        )
        record_reject(None, stage="seal", reason="key_path_exhausted", detail="no path left")
    (span,) = exporter.get_finished_spans()
    failover, reject = span.events
    assert failover.name == EVENT_FAILOVER
    assert dict(failover.attributes or {}) == {
        "fleetbus.profile": "standard",
        "fleetbus.keypath.from": "qkd-etsi014+xwing",
        "fleetbus.keypath.to": "xwing",
        "fleetbus.reason": "qkd_unavailable",
    }
    assert reject.name == EVENT_REJECT
    assert (reject.attributes or {})["fleetbus.reason"] == "key_path_exhausted"
    assert span.status.status_code is StatusCode.ERROR


def test_consume_span_rejects_send_operation(tracer: Tracer) -> None:
    with (
        pytest.raises(ValueError, match="consume operation"),
        consume_span(tracer, "t", [], operation="send"),
    ):
        pass


def test_setup_chooses_exporter_from_environment() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    none = setup_tracing("svc", set_global=False, environ={})
    try:
        assert none.resource.attributes["service.name"] == "svc"
        assert none._active_span_processor._span_processors == ()
    finally:
        none.shutdown()
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="opentelemetry-exporter-otlp-proto-http"):
            setup_tracing("svc", set_global=False, environ=env)
        return
    otlp = setup_tracing("svc", set_global=False, environ=env)
    try:
        (batch,) = otlp._active_span_processor._span_processors
        exporter = batch.span_exporter  # type: ignore[attr-defined]
        assert type(exporter).__name__ == "OTLPSpanExporter"
    finally:
        otlp.shutdown()


def test_a_dead_letter_is_a_reject_event_on_its_records_span(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    from fleetbus.bus.errors import ReasonCode
    from fleetbus.processors.engine import InputRecord, dead_letter_result, record_events

    record = InputRecord("fleet.commands.requested", 0, 7, b"cmd-1", b"\x00junk")
    with tracer.start_as_current_span("process fleet.commands.requested"):
        result = dead_letter_result(
            "authorize", "fleet.dlq", record, ReasonCode.MALFORMED, "not a command", now=0.0
        )
        record_events("authorize", result)  # what the runner does in the record's span
    assert [o.topic for o in result.outputs] == ["fleet.dlq"]
    (span,) = exporter.get_finished_spans()
    (event,) = span.events
    assert event.name == EVENT_REJECT
    assert dict(event.attributes or {}) == {
        "fleetbus.stage": "authorize",
        "fleetbus.reason": "malformed",
        "fleetbus.detail": "not a command",
    }
    assert span.status.status_code is StatusCode.ERROR


def test_otel_traces_exporter_names_exporters_by_entry_point() -> None:
    console = setup_tracing("svc", set_global=False, environ={"OTEL_TRACES_EXPORTER": "console"})
    try:
        (batch,) = console._active_span_processor._span_processors
        assert type(batch.span_exporter).__name__ == "ConsoleSpanExporter"  # type: ignore[attr-defined]
    finally:
        console.shutdown()
    with pytest.raises(ConfigError, match=r"'carrier-pigeon'.*opentelemetry_traces_exporter"):
        setup_tracing("svc", set_global=False, environ={"OTEL_TRACES_EXPORTER": "carrier-pigeon"})
    with pytest.raises(ConfigError, match="OTLP protocol 'smtp'"):
        exporter_names({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "smtp"})


def test_exporter_names_follow_the_sdk_conventions() -> None:
    assert exporter_names({}) == []
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == ["otlp_proto_http"]
    assert (
        exporter_names(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}
        )
        == []
    )
    assert exporter_names({"OTEL_TRACES_EXPORTER": "otlp, console"}) == [
        "otlp_proto_http",
        "console",
    ]
    grpc = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}
    assert exporter_names(grpc) == ["otlp_proto_grpc"]


def test_otel_service_name_overrides_the_default_service_name() -> None:
    provider = setup_tracing("svc", set_global=False, environ={"OTEL_SERVICE_NAME": "edge-7"})
    try:
        assert provider.resource.attributes["service.name"] == "edge-7"
    finally:
        provider.shutdown()
