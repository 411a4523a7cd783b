"""The pure part of the exactly-once runner (``fleetbus.processors.engine``): what a batch of
input records produces — outputs, DLQ records, audit records, changelog — without Kafka."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.processors.audit import AuditChain, AuditEvent
from fleetbus.processors.engine import (
    AUDIT_HEAD_KEY,
    DeadLetter,
    InputRecord,
    Output,
    PartitionState,
    StageResult,
    audit_outputs,
    changelog_outputs,
    compute,
    dead_letter_for,
    input_record,
)


def raw(offset: int, value: bytes, key: bytes = b"k") -> Any:
    """A consumer record as aiokafka hands it over."""
    return type(
        "Raw",
        (),
        {"topic": "in", "partition": 0, "offset": offset, "key": key, "value": value,
         "timestamp": 7, "headers": [("h", b"v")]},
    )()  # fmt: skip


class Counter:
    """Counts records in its state; ``bad`` is malformed, ``bug`` raises a plain error."""

    name = "counter"

    def input_topics(self) -> Sequence[str]:
        return ["in"]

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if record.value == b"bad":
            raise FleetbusError("bad record", reason=ReasonCode.MALFORMED)
        if record.value == b"bug":
            raise KeyError("bug")
        seen = int(state.get("seen") or b"0") + 1
        state.put("seen", str(seen).encode())
        return StageResult(
            outputs=[Output("out", record.key, record.value)],
            audit=[AuditEvent("bus", "counted", None, detail={"seen": seen})],
        )

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        return StageResult()


class FailingBatch(Counter):
    """A batch path that fails as a whole after writing state: the runner redoes it one by one."""

    def process_batch(
        self, records: Sequence[InputRecord], state: PartitionState, now: float
    ) -> Sequence[StageResult | Exception]:
        state.put("partial", b"1")
        raise RuntimeError("batch bug")


@contextlib.contextmanager
def no_span(record: InputRecord) -> Iterator[None]:
    yield


def run(logic: Any, state: PartitionState, values: list[bytes]) -> StageResult:
    records = [raw(i, v) for i, v in enumerate(values)]
    return compute(logic, state, records, dlq_topic="dlq", clock=lambda: 100.0, record_span=no_span)


def test_input_record_keeps_every_field_of_the_consumer_record() -> None:
    record = input_record(raw(3, b"x"))
    assert record == InputRecord("in", 0, 3, b"k", b"x", timestamp_ms=7, headers=(("h", b"v"),))


def test_a_batch_produces_outputs_dead_letters_audit_and_state_in_record_order() -> None:
    state = PartitionState()
    result = run(Counter(), state, [b"a", b"bad", b"b"])
    assert [(o.topic, o.value) for o in result.outputs if o.topic == "out"] == [
        ("out", b"a"),
        ("out", b"b"),
    ]
    assert [o.topic for o in result.outputs] == ["out", "dlq", "out"]
    letter = DeadLetter.decode(result.outputs[1].value or b"")
    assert (letter.reason, letter.offset, letter.value) == (ReasonCode.MALFORMED, 1, b"bad")
    assert [e.event for e in result.audit] == ["counted", "dead_lettered", "counted"]
    assert state.changes() == {"seen": b"2"}


def test_an_error_that_is_not_ours_to_type_is_filed_as_internal() -> None:
    result = dead_letter_for("counter", "dlq", input_record(raw(0, b"bug")), KeyError("x"), 1.0)
    assert DeadLetter.decode(result.outputs[0].value or b"").reason is ReasonCode.INTERNAL
    assert DeadLetter.decode(result.outputs[0].value or b"").detail == "KeyError"


def test_a_failed_batch_rolls_its_state_back_and_goes_record_by_record() -> None:
    state = PartitionState()
    result = run(FailingBatch(), state, [b"a", b"bug", b"b"])
    assert [o.topic for o in result.outputs] == ["out", "dlq", "out"]
    assert state.changes() == {"seen": b"2"}  # "partial" was rolled back


def test_audit_outputs_append_to_the_chain_and_keep_its_head_in_the_state() -> None:
    state, chain = PartitionState(), AuditChain("counter-0")
    outputs = audit_outputs(chain, state, [AuditEvent("bus", "counted", None)], "audit")
    assert [(o.topic, o.key, o.partition) for o in outputs] == [("audit", b"counter-0", 0)]
    assert state.get(AUDIT_HEAD_KEY) == chain.head.to_cbor()
    assert audit_outputs(chain, PartitionState(), [], "audit") == []


def test_changelog_outputs_carry_writes_and_deletes_to_the_state_partition() -> None:
    state = PartitionState({"gone": b"x"})
    state.put("new", b"1")
    state.delete("gone")
    outputs = changelog_outputs(state, "state.counter", 3)
    assert sorted((o.key, o.value, o.partition) for o in outputs) == [
        (b"gone", None, 3),
        (b"new", b"1", 3),
    ]
