"""What a stage's batch of input records produces, without Kafka: the records and results a
stage computes with (``InputRecord``, ``Output``, ``StageResult``, ``DeadLetter``), its
changelogged ``PartitionState``, and ``compute``: the outputs, audit events, DLQ records and
state changes of one batch, each record in its span. ``fleetbus.processors.eos`` commits what
this computes in one Kafka transaction per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cbor2

from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.observability.metrics import (
    DLQ_RECORDS,
    INTERNAL_ERRORS,
    RECORDS,
    STAGE_LATENCY,
    held_until_commit,
    on_commit,
)
from fleetbus.observability.tracing import inject_headers, record_failover, record_reject
from fleetbus.processors.audit import AuditChain, AuditEvent
from fleetbus.processors.state import DeadlineOf, PartitionState

__all__ = [
    "AUDIT_HEAD_KEY",
    "BatchStageLogic",
    "DeadLetter",
    "DeadlineOf",
    "InputRecord",
    "Output",
    "PartitionState",
    "RecordSpan",
    "StageLogic",
    "StageResult",
    "audit_outputs",
    "changelog_outputs",
    "compute",
    "dead_letter_for",
    "dead_letter_result",
    "input_record",
    "record_events",
    "with_trace_context",
]

# The runner's logger: what is logged here is logged for the runner, whose name operators and
# the log tests filter on.
_log = logging.getLogger("fleetbus.processors.eos")

#: The state key under which a partition's audit chain head is kept.
AUDIT_HEAD_KEY = "__audit_head__"


@dataclass(frozen=True)
class InputRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Output:
    """One record to produce. ``partition`` None: the producer's default partitioner."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None


@dataclass
class StageResult:
    outputs: list[Output] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)
    outcome: str = "ok"  # ok | rejected | dlq | pending (metrics label)

    def extend(self, other: StageResult) -> None:
        self.outputs.extend(other.outputs)
        self.audit.extend(other.audit)


def record_events(stage: str, result: StageResult) -> None:
    """Failovers and the reject (if any) of one record's result as events of the current span
    (the record's CONSUMER span), read from its audit events so that the batch path, which
    computes results before the record spans exist, gets them too."""
    rejected = False
    for event in result.audit:
        if event.event == "keypath_failover":
            to_path = event.detail.get("to_path")
            record_failover(
                None,
                profile=str(event.detail.get("profile", "")),
                from_path=str(event.detail.get("from_path", "")),
                to_path=str(to_path) if to_path else None,
                reason=event.reason or "",
            )
        elif event.event in ("rejected", "dead_lettered") and not rejected:
            rejected = True
            detail = event.detail.get("detail")
            record_reject(
                None,
                stage=stage,
                reason=event.reason or "",
                detail=str(detail) if detail else None,
            )


def with_trace_context(result: StageResult) -> StageResult:
    """Carry the current span's W3C trace context in the headers of every output of a record,
    so that dispatcher → authorize → seal → vehicle → track is one trace."""
    carrier = tuple(inject_headers())
    if not carrier:
        return result
    names = {name for name, _ in carrier}
    result.outputs = [
        dataclasses.replace(
            out, headers=tuple(h for h in out.headers if h[0] not in names) + carrier
        )
        for out in result.outputs
    ]
    return result


@dataclass(frozen=True)
class DeadLetter:
    """A DLQ record: where the input came from, why it was refused, and its original bytes."""

    stage: str
    source_topic: str
    partition: int
    offset: int
    reason: ReasonCode
    detail: str
    key: bytes | None
    value: bytes | None
    at: float

    def encode(self) -> bytes:
        return cbor2.dumps(
            {
                "stage": self.stage,
                "source_topic": self.source_topic,
                "partition": self.partition,
                "offset": self.offset,
                "reason": str(self.reason),
                "detail": self.detail[:1024],
                "key": self.key,
                "value": self.value,
                "at": round(self.at * 1000),
            },
            canonical=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> DeadLetter:
        m = cbor2.loads(data)
        return cls(
            stage=m["stage"],
            source_topic=m["source_topic"],
            partition=m["partition"],
            offset=m["offset"],
            reason=ReasonCode(m["reason"]),
            detail=m["detail"],
            key=m["key"],
            value=m["value"],
            at=m["at"] / 1000,
        )


def dead_letter_result(
    stage: str,
    dlq_topic: str,
    record: InputRecord,
    reason: ReasonCode,
    detail: str,
    *,
    now: float,
    actor: str = "bus",
    command_id: str | None = None,
) -> StageResult:
    """The DLQ record plus its audit event for an input that cannot be processed."""
    on_commit(DLQ_RECORDS.labels(stage=stage, reason=reason.value).inc)
    # The runner turns the audit event below into the span's reject event (record_events).
    # Logged inside the record's span on the one-by-one path, so the line carries its trace id.
    _log.info(
        "stage %s: %s[%d]@%d dead-lettered (%s)",
        stage,
        record.topic,
        record.partition,
        record.offset,
        reason.value,
    )
    letter = DeadLetter(
        stage,
        record.topic,
        record.partition,
        record.offset,
        reason,
        detail,
        record.key,
        record.value,
        now,
    )
    return StageResult(
        outputs=[Output(dlq_topic, record.key, letter.encode())],
        audit=[
            AuditEvent(
                actor=actor,
                event="dead_lettered",
                command_id=command_id,
                reason=reason.value,
                detail={
                    "stage": stage,
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "detail": detail[:256],
                },
            )
        ],
        outcome="dlq",
    )


class StageLogic(Protocol):
    """A stage's business logic: plain functions over records and partition state."""

    name: str

    def input_topics(self) -> Sequence[str]: ...

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        """Outputs for one input record. Raising sends the record to the DLQ."""
        ...

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        """Timer work (expiry, approval windows); called every tick interval per partition."""
        ...


class BatchStageLogic(StageLogic, Protocol):
    """A stage that can also process a whole batch at once (the runner prefers this for
    batches of more than one record): one result per record, in order — a ``StageResult``, or
    the exception that sends that record to the DLQ. Raising fails the whole batch: the runner
    rolls its state back and processes the records one by one with ``process``. Used by the
    seal stage to sign all envelopes of one transaction with one batch signature."""

    def process_batch(
        self, records: Sequence[InputRecord], state: PartitionState, now: float
    ) -> Sequence[StageResult | Exception]: ...


#: A span around one input record's processing (the runner's CONSUMER span).
RecordSpan = Callable[[InputRecord], contextlib.AbstractContextManager[Any]]


def input_record(raw: Any) -> InputRecord:
    """The ``InputRecord`` of a consumer record (aiokafka's ``ConsumerRecord`` or alike)."""
    return InputRecord(
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
        key=raw.key,
        value=raw.value,
        timestamp_ms=raw.timestamp,
        headers=tuple((k, v) for k, v in (raw.headers or ())),
    )


def dead_letter_for(
    stage: str, dlq_topic: str, record: InputRecord, exc: Exception, now: float
) -> StageResult:
    """The DLQ result of a record whose logic raised. Stages turn bad input into typed
    rejects themselves; an exception that is not a ``FleetbusError`` (or one without a
    reason) is a fault of ours, filed as ``internal``, never as ``malformed``."""
    reason = exc.reason if isinstance(exc, FleetbusError) else ReasonCode.INTERNAL
    detail = str(exc) if isinstance(exc, FleetbusError) else type(exc).__name__
    if reason is ReasonCode.INTERNAL:
        # Counted as it happens, not on commit: the fault occurred whether or not the
        # transaction commits.
        INTERNAL_ERRORS.labels(stage=stage).inc()
        _log.error(
            "stage %s: internal error on %s[%d]@%d",
            stage,
            record.topic,
            record.partition,
            record.offset,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
    return dead_letter_result(stage, dlq_topic, record, reason, detail, now=now)


def compute(
    logic: StageLogic,
    state: PartitionState,
    records: Sequence[Any],
    *,
    dlq_topic: str,
    clock: Callable[[], float],
    record_span: RecordSpan,
) -> StageResult:
    """What one batch of a partition's consumer ``records`` produces: every record's outputs
    (each carrying its record's trace context), audit events and DLQ records, in order, with
    the state changes left in ``state``'s open transaction and the outcome metrics held for
    the commit. A stage with ``process_batch`` gets a batch of more than one record at once;
    if that fails as a whole, its state is rolled back and the records go one by one."""
    stage = logic.name
    inputs = [input_record(raw) for raw in records]
    total = StageResult()
    process_batch = getattr(logic, "process_batch", None)
    if process_batch is not None and len(inputs) > 1:
        started = time.perf_counter()
        now = clock()
        try:
            with held_until_commit() as batch_metrics:
                results: Sequence[StageResult | Exception] = process_batch(inputs, state, now)
            if len(results) != len(inputs):
                raise RuntimeError("process_batch returned the wrong number of results")
        except Exception:
            # The batch as a whole failed: nothing of it counts (its outcome metrics are
            # dropped too); redo it record by record. process_batch must return an
            # exception per bad record, so this is our bug.
            _log.exception("stage %s: batch processing failed; one by one", stage)
            INTERNAL_ERRORS.labels(stage=stage).inc()
            state.rollback()
        else:
            for update in batch_metrics:
                on_commit(update)
            each = (time.perf_counter() - started) / len(inputs)
            for record, outcome in zip(inputs, results, strict=True):
                with record_span(record):
                    if isinstance(outcome, Exception):
                        outcome = dead_letter_for(stage, dlq_topic, record, outcome, now)
                    record_events(stage, outcome)
                    outcome = with_trace_context(outcome)
                STAGE_LATENCY.labels(stage=stage).observe(each)
                on_commit(RECORDS.labels(stage=stage, outcome=outcome.outcome).inc)
                total.extend(outcome)
            return total
    for record in inputs:
        started = time.perf_counter()
        now = clock()
        with record_span(record):
            try:
                result = logic.process(record, state, now)
            except Exception as exc:
                result = dead_letter_for(stage, dlq_topic, record, exc, now)
            record_events(stage, result)
            result = with_trace_context(result)
        STAGE_LATENCY.labels(stage=stage).observe(time.perf_counter() - started)
        on_commit(RECORDS.labels(stage=stage, outcome=result.outcome).inc)
        total.extend(result)
    return total


def audit_outputs(
    chain: AuditChain,
    state: PartitionState,
    events: Sequence[AuditEvent],
    audit_topic: str,
    *,
    seal: bool = False,
) -> list[Output]:
    """The audit records of ``events`` appended to a partition's ``chain`` (its head kept in
    ``state``); with ``seal``, then a checkpoint over any unsigned records (ticks and the end
    of a run: the chain's tail is signed while the writer lives, not only every
    ``checkpoint_every`` records)."""
    values = [value for event in events for value in chain.append(event)]
    if seal:
        values += chain.seal()
    if values:
        state.put(AUDIT_HEAD_KEY, chain.head.to_cbor())
    key = chain.chain.encode()
    return [Output(audit_topic, key, value, partition=0) for value in values]


def changelog_outputs(state: PartitionState, state_topic: str, partition: int) -> list[Output]:
    """The changelog records of the state changes of the open transaction."""
    return [
        Output(state_topic, key.encode(), value, partition=partition)
        for key, value in state.changes().items()
    ]
