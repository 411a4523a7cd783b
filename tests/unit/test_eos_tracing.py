"""Trace context crosses the transactional stages: each output continues its input's trace."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.observability.tracing import (
    EVENT_FAILOVER,
    EVENT_REJECT,
    extract_context,
    inject_headers,
)
from fleetbus.processors import eos
from fleetbus.processors.audit import AuditEvent
from fleetbus.processors.eos import InputRecord, Output, PartitionState, StageResult
from tests.support.envelope import unconnected


class Forward:
    """A stage that turns each input into one output (and junk into an error)."""

    name = "forward"

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if record.value == b"junk":
            raise ValueError("junk")
        return StageResult(outputs=[Output("out", record.key, record.value)])

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        return StageResult()


def runner(logic: Any) -> tuple[eos.TransactionalStage, Any]:
    """A stage runner for ``logic`` (never connected: the tests call ``_compute``) and a
    partition with empty state."""
    stage = unconnected(logic)
    return stage, type("Part", (), {"state": PartitionState()})()


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

    stage, part = runner(Forward())
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
    stage, part = runner(Forward())
    raw = type("Raw", (), {"topic": "in", "partition": 0, "offset": 0, "key": b"k",
                           "value": b"a", "timestamp": 0, "headers": None})()  # fmt: skip
    (out,) = stage._compute(part, [raw]).outputs
    assert any(name == "traceparent" for name, _ in out.headers)


class BatchSeal:
    """A batch stage like the seal stage: results computed before any record span exists."""

    name = "seal"

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        raise AssertionError("the runner must prefer process_batch")

    def process_batch(
        self, records: list[InputRecord], state: PartitionState, now: float
    ) -> list[StageResult | Exception]:
        failover = AuditEvent(
            actor="bus",
            event="keypath_failover",
            command_id="c1",
            reason="qkd_unavailable",
            detail={"profile": "standard", "from_path": "qkd-etsi014+xwing", "to_path": "xwing"},
        )
        refused = eos.dead_letter_result(
            "seal", "dlq", records[1], ReasonCode.KEY_PATH_EXHAUSTED, "no path left", now=now
        )
        refused.audit.insert(
            0, AuditEvent(actor="bus", event="rejected", reason="key_path_exhausted")
        )
        return [
            StageResult(outputs=[Output("out", b"c1", b"sealed")], audit=[failover]),
            refused,
            FleetbusError("undecodable", reason=ReasonCode.MALFORMED),
        ]

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        return StageResult()


def test_failovers_and_rejects_are_events_of_their_records_span_in_batches(
    exporter: InMemorySpanExporter,
) -> None:
    stage, part = runner(BatchSeal())
    records = [
        type("Raw", (), {"topic": "in", "partition": 0, "offset": i, "key": b"k",
                         "value": b"v", "timestamp": 0, "headers": None})()
        for i in range(3)
    ]  # fmt: skip
    stage._compute(part, records)

    spans = sorted(
        (s for s in exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER),
        key=lambda s: (s.attributes or {}).get("messaging.kafka.offset", 0),  # type: ignore[arg-type, return-value]
    )
    assert len(spans) == 3
    events = [[(e.name, dict(e.attributes or {})) for e in s.events] for s in spans]
    assert events[0] == [
        (
            EVENT_FAILOVER,
            {
                "fleetbus.profile": "standard",
                "fleetbus.keypath.from": "qkd-etsi014+xwing",
                "fleetbus.keypath.to": "xwing",
                "fleetbus.reason": "qkd_unavailable",
            },
        )
    ]
    assert spans[0].status.status_code is StatusCode.UNSET
    for span, reason in [(spans[1], "key_path_exhausted"), (spans[2], "malformed")]:
        (event,) = span.events  # one reject event, though rejected + dead-lettered
        assert event.name == EVENT_REJECT
        assert event.attributes is not None
        assert event.attributes["fleetbus.reason"] == reason
        assert event.attributes["fleetbus.stage"] == "seal"
        assert span.status.status_code is StatusCode.ERROR
