"""One trace across every real hop: CommandPublisher → authorize → seal → VehicleAgent (handler,
signed response) → responses → track, on the real broker, with the production stage runners in
this process.

The stages are the ``TransactionalStage`` runners ``build_pipeline`` makes for ``fleetbus
worker`` (the worker runs the same objects as faust services), driven here by an asyncio loop in
a thread so that their spans reach this process's in-memory exporter. Typical runtime: 15 s
once Kafka is up.

Over 500 lines because one trace runs across every hop; the in-process stage runners and the
exporter are its fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fleetbus.bus.commands import Command, CommandState, StatusEvent, Target
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.bus.topics import ensure_topics
from fleetbus.devtools.process import WorkerProcess
from fleetbus.observability.tracing import (
    EVENT_REJECT,
    extract_context,
    get_tracer,
    inject_headers,
)
from fleetbus.observability.tracing_setup import setup_tracing
from fleetbus.processors.app import Pipeline, build_pipeline, pipeline_topics
from fleetbus.processors.eos import DeadLetter
from fleetbus.sdk.dispatch import CommandPublisher
from fleetbus.sdk.vehicle import HandlerResult, VehicleAgent
from tests.support.pipeline import DISPATCHER, make_test_fleet, seal_command, worker_env

FINAL = [CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED, CommandState.EXPIRED]
VEHICLE = "V-0001"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process finishes while the module runs.

    The global TracerProvider can be set once per process, and the VehicleAgent, the publisher
    and the stages all use the global one: install an SDK provider if nobody has, else add our
    exporter to the one that is there. The exporter is shut down afterwards, so later tests do
    not pile spans up in memory (the processor stays attached: the SDK cannot detach one).
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        setup_tracing("fleetbus-trace-e2e", environ={"OTEL_TRACES_EXPORTER": "none"})
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "another SDK owns the global TracerProvider"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


class StageRunners:
    """The pipeline's stage runners on one asyncio loop in a daemon thread."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.stages = pipeline.stages
        self.loop = asyncio.new_event_loop()
        self.results: list[Any] = []
        self.thread = threading.Thread(target=self._run, name="trace-e2e-stages", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> list[Any]:
            return await asyncio.gather(*(s.run() for s in self.stages), return_exceptions=True)

        self.results = self.loop.run_until_complete(main())

    def group(self, stage: str) -> str:
        (found,) = [s.group_id for s in self.stages if s.stage == stage]
        return str(found)

    def stop(self) -> None:
        if self.thread.is_alive():
            for stage in self.stages:
                asyncio.run_coroutine_threadsafe(stage.stop(), self.loop).result(10)
            self.thread.join(30)
        assert not self.thread.is_alive(), "stage runners did not stop"
        self.loop.close()
        errors = [r for r in self.results if isinstance(r, BaseException)]
        assert not errors, errors


@pytest.fixture(scope="module")
def pipeline(
    kafka: Any, tmp_path_factory: pytest.TempPathFactory, spans: InMemorySpanExporter
) -> Iterator[dict[str, Any]]:
    """One pipeline (stages, vehicle agent, publisher) for the tests of this module."""
    kafka_bootstrap = kafka.bootstrap
    tmp_path = tmp_path_factory.mktemp("trace-e2e")
    fleet = make_test_fleet(tmp_path, vehicles=2)
    settings = fleet.settings_for(
        kafka_bootstrap, partitions=1, tick_interval_s=0.5, audit_checkpoint_every=5
    )
    # The worker command creates the stages' compacted state topics; do as it does.
    _regular, compacted = pipeline_topics(settings)
    ensure_topics(kafka_bootstrap, compacted, partitions=1, configs={"cleanup.policy": "compact"})
    runners = StageRunners(build_pipeline(settings))
    executed: list[str] = []

    def ping(command: Command) -> HandlerResult:
        executed.append(command.id)
        return HandlerResult(200, "pong")

    agent = VehicleAgent(
        settings,
        vehicles=fleet.vehicles(),
        directory=fleet.directory,
        minimum_path="xwing",
        handlers={"ping": ping},
        store_path=tmp_path / "agent.sqlite",
    ).start()
    publisher = CommandPublisher(
        settings, principal_id=DISPATCHER, private_key_file=fleet.key_file_path(DISPATCHER)
    )
    try:
        yield {
            "fleet": fleet,
            "settings": settings,
            "runners": runners,
            "agent": agent,
            "publisher": publisher,
            "executed": executed,
        }
    finally:
        publisher.close()
        agent.close()
        runners.stop()


def full(settings: FleetbusSettings, name: str) -> str:
    return settings.topics.full(getattr(settings.topics, name))


def read_topic(
    settings: FleetbusSettings, name: str, *, want: int = 0, timeout_s: float = 3.0
) -> list[Any]:
    """Committed records of a topic: all that arrive within ``timeout_s`` of idleness, or
    as soon as ``want`` of them are there."""
    consumer = KafkaConsumer(
        full(settings, name),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
        consumer_timeout_ms=int(timeout_s * 1000),
    )
    records: list[Any] = []
    try:
        for record in consumer:
            records.append(record)
            if want and len(records) >= want:
                break
    finally:
        consumer.close()
    return records


def header_context(headers: Sequence[tuple[str, bytes]] | None) -> tuple[int, int]:
    """(trace id, span id) of a record's ``traceparent``; (0, 0) when there is none."""
    ctx = trace.get_current_span(extract_context(headers)).get_span_context()
    return ctx.trace_id, ctx.span_id


def one(found: list[ReadableSpan], what: str, all_spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert len(found) == 1, f"{what}: {len(found)} spans in {[s.name for s in all_spans]}"
    return found[0]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def kafka_spans(
    spans: Sequence[ReadableSpan], kind: SpanKind, topic: str, group: str | None = None
) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if s.kind is kind
        and attrs(s).get("messaging.destination.name") == topic
        and (group is None or attrs(s).get("messaging.consumer.group.name") == group)
    ]


def assert_child_of(child: ReadableSpan, parent: ReadableSpan) -> None:
    assert child.parent is not None, f"{child.name} has no parent"
    assert child.parent.trace_id == parent.context.trace_id
    assert child.parent.span_id == parent.context.span_id, (
        f"{child.name}'s parent is not {parent.name}"
    )


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def send_junk(settings: FleetbusSettings) -> int:
    """Bytes that are no command to ``commands.requested``, in a trace of their own; returns
    that trace's id."""
    with get_tracer().start_as_current_span("hostile client") as root:
        headers = list(inject_headers())
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        producer.send(
            full(settings, "commands_requested"),
            key=b"junk",
            value=b"\x00 not a command",
            headers=headers,
        ).get(20)
    finally:
        producer.close()
    return root.get_span_context().trace_id


def test_a_command_is_one_trace_from_publisher_to_vehicle_and_back(
    pipeline: dict[str, Any], spans: InMemorySpanExporter
) -> None:
    settings: FleetbusSettings = pipeline["settings"]
    runners: StageRunners = pipeline["runners"]
    publisher: CommandPublisher = pipeline["publisher"]

    spans.clear()
    handle = publisher.send(Target(vehicle=VEHICLE), "ping")
    event = handle.wait(45, until=FINAL)
    assert event.state is CommandState.SUCCEEDED, handle.events
    assert pipeline["executed"] == [handle.command_id]

    requested, authorized = (
        full(settings, "commands_requested"),
        full(settings, "commands_authorized"),
    )
    outbound, responses = full(settings, "commands_outbound"), full(settings, "commands_responses")
    verified = full(settings, "commands_responses_verified")
    prefix = settings.topics.prefix

    # The dispatcher's PRODUCER span starts the trace (no span was current when send ran).
    finished = spans.get_finished_spans()
    publish = one(kafka_spans(finished, SpanKind.PRODUCER, requested), "publish", finished)
    assert publish.parent is None
    trace_id = publish.context.trace_id
    assert attrs(publish) == {
        "messaging.system": "kafka",
        "messaging.destination.name": requested,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.kafka.message.key": handle.command_id,
        "messaging.destination.partition.id": str(handle.partition),
        "messaging.kafka.destination.partition": handle.partition,
        "messaging.kafka.offset": handle.offset,
        "messaging.client.id": "fleetbus-dispatch-dispatch-1",
        "server.address": "127.0.0.1",
        "server.port": int(settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1]),
    }

    # Every span about this run's topics is in that one trace: no hop lost the context.
    ours = [
        s
        for s in finished
        if str(attrs(s).get("messaging.destination.name", "")).startswith(prefix)
    ]
    assert {s.context.trace_id for s in ours} == {trace_id}, sorted(s.name for s in ours)
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    ids = {s.context.span_id for s in in_trace}
    for span in in_trace:
        if span is not publish:
            assert span.parent is not None, span.name
            assert span.parent.span_id in ids, span.name

    # Each hop, and its parent.
    authorize = one(
        kafka_spans(in_trace, SpanKind.CONSUMER, requested, runners.group("authorize")),
        "authorize",
        in_trace,
    )
    assert_child_of(authorize, publish)

    # commands.authorized carries two copies (docs/pipeline.md, "Keying of commands.authorized"):
    # the seal stage's keyed by vehicle id, the track stage's keyed by command id. Each stage's
    # group reads both and passes over the other's copy (a span of its own).
    def copy_read(stage: str, key: str) -> ReadableSpan:
        read = kafka_spans(in_trace, SpanKind.CONSUMER, authorized, runners.group(stage))
        assert len(read) == 2, [attrs(s).get("messaging.kafka.message.key") for s in read]
        keyed = [s for s in read if attrs(s).get("messaging.kafka.message.key") == key]
        return one(keyed, f"{stage} of its authorized copy", in_trace)

    seal = copy_read("seal", VEHICLE)
    assert_child_of(seal, authorize)
    track_authorized = copy_read("track", handle.command_id)
    assert_child_of(track_authorized, authorize)
    agent: VehicleAgent = pipeline["agent"]
    receive = one(
        kafka_spans(in_trace, SpanKind.CONSUMER, outbound, agent.group_id), "vehicle", in_trace
    )
    assert_child_of(receive, seal)
    assert attrs(receive)["messaging.kafka.message.key"] == VEHICLE
    handler = one(
        [s for s in in_trace if s.kind is SpanKind.INTERNAL and s.name == "execute"],
        "handler",
        in_trace,
    )
    assert_child_of(handler, receive)
    assert attrs(handler)["fleetbus.action"] == "ping"
    assert attrs(handler)["fleetbus.response.status"] == 200
    answer = one(kafka_spans(in_trace, SpanKind.PRODUCER, responses), "response", in_trace)
    assert_child_of(answer, receive)
    assert answer.start_time is not None
    assert handler.end_time is not None
    assert answer.start_time >= handler.end_time  # answered after the handler ran
    assert attrs(answer)["messaging.kafka.message.key"] == handle.command_id
    # The response stage verifies the answer, the track stage reads what it verified.
    verify_response = one(
        kafka_spans(in_trace, SpanKind.CONSUMER, responses, runners.group("responses")),
        "response stage of the response",
        in_trace,
    )
    assert_child_of(verify_response, answer)
    track_response = one(
        kafka_spans(in_trace, SpanKind.CONSUMER, verified, runners.group("track")),
        "track of the verified response",
        in_trace,
    )
    assert_child_of(track_response, verify_response)

    # Messaging semantic conventions on every consumer span, pointing at real records.
    records = {
        name: read_topic(settings, name, timeout_s=1.0)
        for name in (
            "commands_requested",
            "commands_authorized",
            "commands_outbound",
            "commands_responses",
            "commands_responses_verified",
            "commands_status",
        )
    }
    positions = {(r.topic, r.partition, r.offset) for rs in records.values() for r in rs}
    for span in (authorize, seal, track_authorized, receive, verify_response, track_response):
        a = attrs(span)
        assert span.name == f"process {a['messaging.destination.name']}"
        assert a["messaging.system"] == "kafka"
        assert a["messaging.operation.type"] == "process"
        assert a["messaging.operation.name"] == "process"
        assert a["messaging.consumer.group.name"]
        assert a["messaging.destination.partition.id"] == str(
            a["messaging.kafka.destination.partition"]
        )
        where = (
            a["messaging.destination.name"],
            a["messaging.kafka.destination.partition"],
            a["messaging.kafka.offset"],
        )
        assert where in positions, where

    # The records themselves carry the trace, each naming the span that wrote it.
    for name, rs in records.items():
        assert rs, name
        for record in rs:
            assert header_context(record.headers)[0] == trace_id, (name, record.offset)
    (sent,) = records["commands_requested"]
    assert header_context(sent.headers) == (trace_id, publish.context.span_id)
    (response_record,) = records["commands_responses"]
    assert header_context(response_record.headers) == (trace_id, answer.context.span_id)
    # The vehicle's answer span ends at the broker's acknowledgement, naming where it landed.
    assert (
        attrs(answer)["messaging.kafka.destination.partition"],
        attrs(answer)["messaging.kafka.offset"],
    ) == (response_record.partition, response_record.offset)
    for span in (publish, authorize, receive, answer, verify_response, track_response):
        assert attrs(span)["server.address"] == "127.0.0.1", span.name
        assert attrs(span)["messaging.client.id"], span.name
    succeeded = [
        r
        for r in records["commands_status"]
        if StatusEvent.decode(r.value).state is CommandState.SUCCEEDED
    ]
    assert len(succeeded) == 1
    assert header_context(succeeded[0].headers) == (trace_id, track_response.context.span_id)


def test_a_dead_lettered_record_shows_as_a_reject_event_in_its_trace(
    pipeline: dict[str, Any], spans: InMemorySpanExporter
) -> None:
    settings: FleetbusSettings = pipeline["settings"]
    runners: StageRunners = pipeline["runners"]
    requested = full(settings, "commands_requested")
    spans.clear()
    trace_id = send_junk(settings)
    (letter_record,) = read_topic(settings, "dlq", want=1, timeout_s=30)
    letter = DeadLetter.decode(letter_record.value)
    assert letter.stage == "authorize"
    assert header_context(letter_record.headers)[0] == trace_id

    group = runners.group("authorize")

    def junk_spans() -> list[ReadableSpan]:
        return [
            s
            for s in kafka_spans(spans.get_finished_spans(), SpanKind.CONSUMER, requested, group)
            if s.context.trace_id == trace_id
        ]

    wait_for(lambda: bool(junk_spans()), 10, "the authorize span")
    span = one(junk_spans(), "authorize", spans.get_finished_spans())
    assert span.status.status_code is StatusCode.ERROR
    (reject,) = [e for e in span.events if e.name == EVENT_REJECT]
    assert reject.attributes is not None
    assert reject.attributes["fleetbus.stage"] == "authorize"
    assert reject.attributes["fleetbus.reason"] == str(letter.reason.value)
    assert span.status.description == str(letter.reason.value)


def test_the_worker_writes_json_lines_with_the_trace_id_of_the_record_it_processed(
    kafka_bootstrap: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    fleet = make_test_fleet(tmp_path, vehicles=1)
    settings = fleet.settings_for(kafka_bootstrap, partitions=1)
    worker = WorkerProcess(worker_env(settings, tmp_path), tmp_path / "worker.log")
    try:
        trace_id = send_junk(settings)
        (letter,) = read_topic(settings, "dlq", want=1, timeout_s=60)
        assert header_context(letter.headers)[0] == trace_id
        wait_for(lambda: "dead-lettered" in worker.output(), 10, "the dead-letter log line")
        assert worker.running(), worker.output()[-3000:]
    finally:
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]

    lines = [line for line in worker.output().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line in the worker's output: {line!r}")
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        assert record["service"] == "fleetbus-worker"
        records.append(record)
    loggers = {r["logger"] for r in records}
    # faust's and aiokafka's own records come through the same handler.
    assert any(name.startswith("faust") for name in loggers), loggers
    assert any(name.startswith("aiokafka") for name in loggers), loggers
    assert any(str(r["message"]).endswith("Ready") for r in records)
    (dead,) = [r for r in records if "dead-lettered" in str(r["message"])]
    assert dead["logger"] == "fleetbus.processors.eos"
    assert dead["level"] == "info"
    assert dead["trace_id"] == format(trace_id, "032x")
    assert len(dead["span_id"]) == 16


def test_fleet_simulate_writes_json_lines_with_the_trace_id_of_the_command(
    kafka_bootstrap: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """The vehicle process: its handler's failure is a JSON line in the command's trace."""
    fleet = make_test_fleet(tmp_path, vehicles=1)
    settings = fleet.settings_for(kafka_bootstrap, partitions=1)
    outbound = full(settings, "commands_outbound")
    _, envelope = seal_command(fleet, settings, VEHICLE, action="fail")
    # This test plays the seal stage: its span's context goes with the envelope.
    with get_tracer().start_as_current_span("seal (test)") as seal:
        headers = list(inject_headers())
    trace_id = format(seal.get_span_context().trace_id, "032x")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        producer.send(outbound, key=VEHICLE.encode(), value=envelope, headers=headers).get(20)
    finally:
        producer.close()

    env = {
        **os.environ,
        "FLEETBUS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "FLEETBUS_TOPICS__PREFIX": settings.topics.prefix,
        "FLEETBUS_APP_ID": settings.app_id,
    }
    env.pop("FLEETBUS_LOG_FORMAT", None)  # the default is what is tested
    process = subprocess.Popen(
        [
            sys.executable, "-m", "fleetbus.cli.fleet", "fleet", "simulate",
            "--keys-dir", str(fleet.keys_dir), "--vehicles", "1",
            "--store", str(tmp_path / "sim.sqlite"), "--summary-every", "60",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        (answer,) = read_topic(settings, "commands_responses", want=1, timeout_s=60)
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-3000:]
    assert format(header_context(answer.headers)[0], "032x") == trace_id
    assert "executed=1" in out.strip().splitlines()[-1]

    records = []
    for line in err.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line on the simulator's stderr: {line!r}")
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        assert record["service"] == "fleetbus-fleet-sim"
        records.append(record)
    assert any(str(r["message"]).startswith("simulating 1 vehicles") for r in records)
    (failed,) = [r for r in records if str(r["message"]).startswith("handler for fail failed")]
    assert failed["level"] == "error"
    assert failed["logger"] == "fleetbus.sdk.vehicle"
    assert failed["trace_id"] == trace_id
    assert failed["error"] == {"type": "RuntimeError", "message": "simulated failure of fail"}
    assert "Traceback" not in err
