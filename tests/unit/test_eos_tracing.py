"""Trace context crosses the transactional stages: each output continues its input's trace."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from fleetbus.observability.tracing import extract_context, inject_headers
from fleetbus.processors import eos
from fleetbus.processors.eos import InputRecord, Output, PartitionState, StageResult


class Forward:
    """A stage that turns each input into one output (and junk into an error)."""

    name = "forward"

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if record.value == b"junk":
            raise ValueError("junk")
        return StageResult(outputs=[Output("out", record.key, record.value)])

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        return StageResult()


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(eos, "get_tracer", lambda: provider.get_tracer("test"))
    monkeypatch.setattr(eos, "_test_provider", provider, raising=False)
    return spans


def test_every_output_and_dead_letter_carries_the_inputs_trace(
    exporter: InMemorySpanExporter,
) -> None:
    tracer: Any = eos._test_provider.get_tracer("dispatcher")  # type: ignore[attr-defined]
    with tracer.start_as_current_span("send commands.requested", kind=SpanKind.PRODUCER) as root:
        headers = tuple(inject_headers())
    trace_id = root.get_span_context().trace_id

    stage = eos.TransactionalStage(
        Forward(),  # type: ignore[arg-type]
        bootstrap="127.0.0.1:1",
        app_id="t",
        state_topic="state",
        audit_topic="audit",
        dlq_topic="dlq",
    )
    part: Any = type("Part", (), {"state": PartitionState()})()
    records = [
        type("Raw", (), {"topic": "in", "partition": 0, "offset": i, "key": b"k",
                         "value": value, "timestamp": 0, "headers": headers})()
        for i, value in enumerate([b"a", b"junk", b"b"])
    ]  # fmt: skip
    result = stage._compute(part, records)

    assert [o.topic for o in result.outputs] == ["out", "dlq", "out"]
    consumer_spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert len(consumer_spans) == 3
    for span in consumer_spans:
        assert span.context.trace_id == trace_id
        assert span.parent is not None
        assert span.parent.span_id == root.get_span_context().span_id
        assert span.attributes is not None
        assert span.attributes["messaging.destination.name"] == "in"
    for out, span in zip(result.outputs, consumer_spans, strict=True):
        ctx = extract_context(out.headers)
        carried = trace.get_current_span(ctx).get_span_context()
        assert carried.trace_id == trace_id
        assert carried.span_id == span.context.span_id  # the child of the stage's own span


def test_records_without_trace_context_start_a_trace_of_their_own(
    exporter: InMemorySpanExporter,
) -> None:
    stage = eos.TransactionalStage(
        Forward(),  # type: ignore[arg-type]
        bootstrap="127.0.0.1:1",
        app_id="t",
        state_topic="state",
        audit_topic="audit",
        dlq_topic="dlq",
    )
    part: Any = type("Part", (), {"state": PartitionState()})()
    raw = type("Raw", (), {"topic": "in", "partition": 0, "offset": 0, "key": b"k",
                           "value": b"a", "timestamp": 0, "headers": None})()  # fmt: skip
    (out,) = stage._compute(part, [raw]).outputs
    assert any(name == "traceparent" for name, _ in out.headers)
