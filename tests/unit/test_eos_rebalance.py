"""The runner's batch lifecycle against rebalances and broken producers, without Kafka.

A revocation must wait for the transaction in flight (not stop its producer under it), a batch
fetched before a rebalance must not be processed, and a producer failing with something other
than a ``KafkaError`` must cost a retry, not the runner. The same on the real broker:
``tests/integration/test_rebalance.py``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from aiokafka.structs import TopicPartition

from fleetbus.processors.audit import AuditChain, AuditEvent
from fleetbus.processors.eos import (
    InputRecord,
    Output,
    PartitionState,
    StageResult,
    TransactionalStage,
    _Partition,
)
from tests.support.envelope import unconnected

TP = TopicPartition("in", 0)


class Forward:
    """Forwards each record; remembers it in state; can hold a batch mid-compute."""

    name = "forward"

    def __init__(self) -> None:
        self.hold = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()

    def input_topics(self) -> Sequence[str]:
        return ["in"]

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if self.hold.is_set():
            self.held.set()
            self.release.wait(timeout=30)
        state.put(f"seen/{record.offset}", b"1")
        return StageResult(
            outputs=[Output("out", record.key, record.value)],
            audit=[AuditEvent("test", "forwarded")],
        )

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        return StageResult()


class Producer:
    """Records what the runner does with it; ``fail`` is raised when a transaction begins."""

    def __init__(self, log: list[str], fail: Exception | None = None) -> None:
        self.log, self.fail = log, fail

    def transaction(self) -> Producer:
        return self

    async def __aenter__(self) -> Producer:
        if self.fail is not None:
            raise self.fail
        self.log.append("begin")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.log.append("abort" if kind else "commit")

    async def send(self, topic: str, **_: Any) -> None:
        self.log.append(f"send {topic}")

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        self.log.append("offsets")

    async def stop(self) -> None:
        self.log.append("stop")


class Consumer:
    def __init__(self) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def runner(logic: Forward, producer: Producer) -> TransactionalStage:
    """A runner that owns partition 0 of ``in`` with ``producer`` (never connected)."""
    stage = unconnected(logic, max_backoff_s=0.0)
    stage._consumer = Consumer()  # type: ignore[assignment]
    stage._assigned = {TP}
    stage._parts[0] = _Partition(0, producer, PartitionState(), AuditChain("forward-0"))  # type: ignore[arg-type]
    return stage


def raw(offset: int) -> Any:
    return type(
        "Raw",
        (),
        {"topic": "in", "partition": 0, "offset": offset, "key": b"k", "value": b"v",
         "timestamp": 0, "headers": None},
    )()  # fmt: skip


def test_a_revocation_waits_for_the_transaction_in_flight() -> None:
    async def scenario() -> list[str]:
        log: list[str] = []
        logic = Forward()
        stage = runner(logic, Producer(log))
        logic.hold.set()
        batch = asyncio.create_task(stage._process_batch(TP, [raw(0), raw(1)], 0))
        await asyncio.to_thread(logic.held.wait, 30)  # mid-compute
        revoke = asyncio.create_task(stage._on_revoked([TP]))
        await asyncio.sleep(0.05)  # give the revocation every chance to run first
        log.append("released")
        logic.release.set()
        await batch
        await revoke
        assert stage._parts == {}
        return log

    log = asyncio.run(scenario())
    assert log.index("commit") < log.index("stop"), log
    assert log[0] == "released", log  # nothing happened to the producer while computing


def test_a_batch_fetched_before_a_rebalance_is_dropped() -> None:
    async def scenario() -> tuple[list[str], TransactionalStage]:
        log: list[str] = []
        stage = runner(Forward(), Producer(log))
        stage._generation = 1  # a rebalance since the fetch (generation 0)
        await stage._process_batch(TP, [raw(0)], 0)
        return log, stage

    log, stage = asyncio.run(scenario())
    assert log == []
    assert stage._parts[0].state.changes() == {}


def test_a_producer_failing_outside_kafka_errors_costs_a_retry_not_the_runner() -> None:
    # aiokafka raises AssertionError ("Invalid state transition") from begin_transaction after
    # a fatal error; the runner used to let it end the stage.
    async def scenario() -> tuple[list[str], TransactionalStage]:
        log: list[str] = []
        stage = runner(Forward(), Producer(log, fail=AssertionError("Invalid state transition")))
        await stage._process_batch(TP, [raw(5), raw(6)], 0)
        return log, stage

    log, stage = asyncio.run(scenario())
    assert log == ["stop"]  # the broken producer is dropped; the partition is opened anew
    assert 0 not in stage._parts
    assert stage._consumer.seeks == [(TP, 5)]  # type: ignore[union-attr]
