"""OpenTelemetry tracing for library code: W3C trace context in Kafka headers, Kafka span helpers.

API only (``opentelemetry.trace``, ``opentelemetry.propagate``): the SDK clients, the processors
and the runner import this module; which ``TracerProvider`` and exporters stand behind it is
set once per process by ``fleetbus.observability.tracing_setup`` (the CLI does that).

Spans follow the OpenTelemetry messaging semantic conventions for Kafka. The trace context
travels in Kafka headers (``traceparent``/``tracestate``, plus ``baggage`` if the global
propagator carries it); headers are routing hints only, so a missing or garbled one starts a new
trace and never fails a record.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableSequence, Sequence
from contextlib import contextmanager
from typing import Final

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

#: Instrumentation scope name of every fleetbus tracer.
TRACER_NAME: Final = "fleetbus"

# Attribute names of the messaging semantic conventions (kept here as strings: the semconv
# package only ships them from a private ``_incubating`` module).
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_DESTINATION_NAME: Final = "messaging.destination.name"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_CONSUMER_GROUP_NAME: Final = "messaging.consumer.group.name"
MESSAGING_DESTINATION_PARTITION_ID: Final = "messaging.destination.partition.id"
MESSAGING_KAFKA_MESSAGE_KEY: Final = "messaging.kafka.message.key"
#: Older name of the partition attribute; still set because many backends index it.
MESSAGING_KAFKA_DESTINATION_PARTITION: Final = "messaging.kafka.destination.partition"
MESSAGING_KAFKA_OFFSET: Final = "messaging.kafka.offset"
MESSAGING_KAFKA_TOMBSTONE: Final = "messaging.kafka.message.tombstone"
MESSAGING_CLIENT_ID: Final = "messaging.client.id"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"

#: Operation types. The conventions renamed ``publish`` to ``send`` (semconv 1.27); we follow
#: the current name.
OP_SEND: Final = "send"
OP_RECEIVE: Final = "receive"
OP_PROCESS: Final = "process"

#: Span event names for the cross-cutting decisions an SRE looks for in a trace.
EVENT_FAILOVER: Final = "fleetbus.keypath.failover"
EVENT_REJECT: Final = "fleetbus.reject"

KafkaHeaders = list[tuple[str, bytes]]


class _HeaderSetter(Setter[MutableSequence[tuple[str, bytes]]]):
    def set(self, carrier: MutableSequence[tuple[str, bytes]], key: str, value: str) -> None:
        # One value per propagation header: drop what an upstream hop left before adding ours.
        carrier[:] = [(k, v) for k, v in carrier if k.lower() != key.lower()]
        carrier.append((key, value.encode("ascii", "replace")))


class _HeaderGetter(Getter[Sequence[tuple[str, bytes]]]):
    def get(self, carrier: Sequence[tuple[str, bytes]], key: str) -> list[str] | None:
        values: list[str] = []
        for k, v in carrier:
            if not isinstance(k, str) or k.lower() != key.lower():
                continue
            if isinstance(v, bytes | bytearray):
                try:
                    values.append(bytes(v).decode("ascii"))
                except UnicodeDecodeError:
                    continue  # garbled header: ignore it, the record still flows
        return values or None

    def keys(self, carrier: Sequence[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier if isinstance(k, str)]


_SETTER: Final = _HeaderSetter()
_GETTER: Final = _HeaderGetter()


def get_tracer(provider: trace.TracerProvider | None = None) -> Tracer:
    """The fleetbus tracer of ``provider`` (default: the global provider)."""
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)


# --------------------------------------------------------------------------------------------
# W3C trace context in Kafka headers


def inject_headers(
    headers: MutableSequence[tuple[str, bytes]] | None = None, *, context: Context | None = None
) -> MutableSequence[tuple[str, bytes]]:
    """Write the current (or given) trace context into Kafka headers; returns the headers."""
    carrier: MutableSequence[tuple[str, bytes]] = [] if headers is None else headers
    propagate.inject(carrier, context=context, setter=_SETTER)
    return carrier


def extract_context(headers: Sequence[tuple[str, bytes]] | None) -> Context:
    """The trace context carried by Kafka headers (an empty context if there is none)."""
    return propagate.extract(list(headers or ()), getter=_GETTER)


# --------------------------------------------------------------------------------------------
# Kafka spans


def _kafka_attributes(
    operation_type: str,
    operation_name: str,
    topic: str,
    *,
    key: str | None,
    partition: int | None,
    offset: int | None,
    consumer_group: str | None,
    bootstrap: str | None = None,
    client_id: str | None = None,
) -> dict[str, str | int | bool]:
    attrs: dict[str, str | int | bool] = {
        MESSAGING_SYSTEM: "kafka",
        MESSAGING_DESTINATION_NAME: topic,
        MESSAGING_OPERATION_TYPE: operation_type,
        MESSAGING_OPERATION_NAME: operation_name,
    }
    if bootstrap:
        # The semantic conventions want the broker the client talks to; a client knows its
        # bootstrap list, not which broker leads the partition: the first entry is named.
        host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
        attrs[SERVER_ADDRESS] = host.strip("[]") or port
        if host and port.isdigit():
            attrs[SERVER_PORT] = int(port)
    if client_id:
        attrs[MESSAGING_CLIENT_ID] = client_id
    if key is not None:
        attrs[MESSAGING_KAFKA_MESSAGE_KEY] = key
    if partition is not None:
        attrs[MESSAGING_DESTINATION_PARTITION_ID] = str(partition)
        attrs[MESSAGING_KAFKA_DESTINATION_PARTITION] = partition
    if offset is not None:
        attrs[MESSAGING_KAFKA_OFFSET] = offset
    if consumer_group is not None:
        attrs[MESSAGING_CONSUMER_GROUP_NAME] = consumer_group
    return attrs


@contextmanager
def send_span(
    tracer: Tracer,
    topic: str,
    headers: MutableSequence[tuple[str, bytes]],
    *,
    key: str | None = None,
    partition: int | None = None,
    bootstrap: str | None = None,
    client_id: str | None = None,
    end_on_exit: bool = True,
) -> Iterator[Span]:
    """A PRODUCER span ``send <topic>`` whose context is injected into ``headers``.

    ``key`` is the record key (vehicle or command ids are fine in spans; never pass secrets).
    ``bootstrap`` and ``client_id`` give ``server.address``/``server.port`` and
    ``messaging.client.id``. Set the partition and offset later with :func:`record_delivery`
    once the broker answered; with ``end_on_exit=False`` the caller ends the span then (a send
    acknowledged asynchronously).
    """
    attrs = _kafka_attributes(
        OP_SEND,
        "send",
        topic,
        key=key,
        partition=partition,
        offset=None,
        consumer_group=None,
        bootstrap=bootstrap,
        client_id=client_id,
    )
    with tracer.start_as_current_span(
        f"send {topic}", kind=SpanKind.PRODUCER, attributes=attrs, end_on_exit=end_on_exit
    ) as span:
        inject_headers(headers)
        yield span


def record_delivery(span: Span, *, partition: int, offset: int) -> None:
    """Add the partition and offset the broker assigned to a send span."""
    span.set_attribute(MESSAGING_DESTINATION_PARTITION_ID, str(partition))
    span.set_attribute(MESSAGING_KAFKA_DESTINATION_PARTITION, partition)
    span.set_attribute(MESSAGING_KAFKA_OFFSET, offset)


@contextmanager
def consume_span(
    tracer: Tracer,
    topic: str,
    headers: Sequence[tuple[str, bytes]] | None,
    *,
    operation: str = OP_PROCESS,
    key: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    consumer_group: str | None = None,
    bootstrap: str | None = None,
    client_id: str | None = None,
) -> Iterator[Span]:
    """A CONSUMER span ``process <topic>`` (or ``receive``), child of the producer's context.

    The parent comes from the record's headers, so dispatcher → bus → vehicle ack is one trace.
    """
    if operation not in (OP_PROCESS, OP_RECEIVE):
        raise ValueError(f"consume operation must be {OP_PROCESS!r} or {OP_RECEIVE!r}")
    attrs = _kafka_attributes(
        operation,
        operation,
        topic,
        key=key,
        partition=partition,
        offset=offset,
        consumer_group=consumer_group,
        bootstrap=bootstrap,
        client_id=client_id,
    )
    parent = extract_context(headers)
    with tracer.start_as_current_span(
        f"{operation} {topic}", context=parent, kind=SpanKind.CONSUMER, attributes=attrs
    ) as span:
        yield span


@contextmanager
def stage_span(tracer: Tracer, stage: str, **attributes: str | int | bool) -> Iterator[Span]:
    """An INTERNAL span for one pipeline stage (authorize, seal, ...) under the current span."""
    attrs: dict[str, str | int | bool] = {"fleetbus.stage": stage, **attributes}
    with tracer.start_as_current_span(stage, kind=SpanKind.INTERNAL, attributes=attrs) as span:
        yield span


def record_failover(
    span: Span | None,
    *,
    profile: str,
    from_path: str,
    to_path: str | None,
    reason: str,
) -> None:
    """A key-path failover as a span event (``to_path`` None: no path left)."""
    target = span if span is not None else trace.get_current_span()
    target.add_event(
        EVENT_FAILOVER,
        {
            "fleetbus.profile": profile,
            "fleetbus.keypath.from": from_path,
            "fleetbus.keypath.to": to_path or "none",
            "fleetbus.reason": reason,
        },
    )


def record_reject(span: Span | None, *, stage: str, reason: str, detail: str | None = None) -> None:
    """A rejected record (DLQ, envelope reject, policy deny) as a span event plus error status.

    ``detail`` must be secret-free, like an exception message of the bus.
    """
    target = span if span is not None else trace.get_current_span()
    attrs: dict[str, str] = {"fleetbus.stage": stage, "fleetbus.reason": reason}
    if detail:
        attrs["fleetbus.detail"] = detail[:256]
    target.add_event(EVENT_REJECT, attrs)
    target.set_status(Status(StatusCode.ERROR, reason))


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span as lowercase hex, or None outside a span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
