"""Rebalances during a batch, on the real broker: nothing lost, nothing doubled, runner alive.

Two ``TransactionalStage`` runners of one consumer group share a four-partition input topic
while records keep arriving. The stage logic parks one batch of the first runner mid-compute
until the group revokes that runner's partitions — once when a second runner joins, once when it
leaves — so each revocation lands inside a batch, not between batches. Every input must then
appear exactly once on the output topic (read_committed), the audit chains must verify, the
DLQ must stay empty and the first runner must still be running.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from fleetbus.bus.directory import FleetRoot, KeyDirectory, issue_key
from fleetbus.processors.audit import AuditEvent, verify_entries
from fleetbus.processors.eos import (
    InputRecord,
    Output,
    PartitionState,
    StageResult,
    TransactionalStage,
)
from tests.support.pipeline import read_topic

PARTITIONS = 4
PER_PHASE = 120
WAIT_S = 90.0  # a bound for each step, not a measurement: steps end when their condition holds


class ParkedStage:
    """Forwards each input to ``out`` and remembers it in state; when ``park`` is armed, the
    next record it computes waits (in the runner's compute thread) until ``revoking`` is set."""

    name = "parked"

    def __init__(self, source: str, out: str) -> None:
        self.source, self.out = source, out
        self.park = threading.Event()
        self.parked = threading.Event()
        self.revoking = threading.Event()
        self.revoked_while_parked = 0

    def input_topics(self) -> Sequence[str]:
        return [self.source]

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if self.park.is_set():
            self.park.clear()
            self.revoking.clear()
            self.parked.set()
            if self.revoking.wait(timeout=WAIT_S):
                self.revoked_while_parked += 1
        value = record.value or b""
        state.put(f"seen/{value.decode()}", b"1")
        return StageResult(
            outputs=[Output(self.out, record.key, value)],
            audit=[AuditEvent("test", "forwarded", value.decode())],
        )

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        return StageResult()


class ObservedStage(TransactionalStage):
    """A runner that tells its logic when the group starts revoking its partitions."""

    logic: ParkedStage

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        self.logic.revoking.set()
        await super()._on_revoked(revoked)


async def _settled(task: asyncio.Future[Any]) -> bool:
    """Whether ``task`` ends within the step bound (cancelled if not)."""
    try:
        await asyncio.wait_for(asyncio.shield(task), WAIT_S)
    except TimeoutError:
        task.cancel()
        return False
    return True


async def _finish(task: asyncio.Future[Any], what: str) -> None:
    assert await _settled(task), f"{what} hangs"


async def _until(what: str, condition: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        assert loop.time() < deadline, f"still waiting for: {what}"
        await asyncio.sleep(0.05)


def test_revocations_mid_batch_lose_and_double_nothing(
    kafka_bootstrap: str, make_topics: Callable[..., list[str]]
) -> None:
    source, out, state, dlq = make_topics("in", "out", "state", "dlq", partitions=PARTITIONS)
    (audit,) = make_topics("audit")
    sent: list[bytes] = []
    # The chains are signed as the worker signs them, so that the verifier can require it.
    root = FleetRoot.generate("ed25519")
    now = time.time()
    sealer = issue_key(
        root,
        principal_id="bus-sealer",
        kind="sealer",
        signature_suite="ed25519",
        not_before=now - 3600,
        not_after=now + 86400,
    )
    directory = KeyDirectory(root.public)
    directory.ingest_all([sealer.signed])

    def runner(logic: ParkedStage) -> ObservedStage:
        return ObservedStage(
            logic,
            bootstrap=kafka_bootstrap,
            app_id="rebalance-test",
            state_topic=state,
            audit_topic=audit,
            dlq_topic=dlq,
            batch_size=10,
            checkpoint_every=100,
            audit_signer=sealer.key_file.signer(),
            audit_signer_principal="bus-sealer",
            consumer_options={"heartbeat_interval_ms": 300, "session_timeout_ms": 10_000},
        )

    async def scenario() -> dict[str, Any]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()

        async def send(n: int) -> None:
            for _ in range(n):
                value = f"r{len(sent):05d}".encode()
                sent.append(value)
                await producer.send(source, key=value, value=value)
                await asyncio.sleep(0.002)
            await producer.flush()

        first_logic = ParkedStage(source, out)
        first, second = runner(first_logic), runner(ParkedStage(source, out))
        first_task = asyncio.create_task(first.run())
        try:
            # Join: the second runner joins while the first is parked mid-batch.
            first_logic.park.set()
            await send(PER_PHASE)
            await _until("the first runner parked mid-batch", first_logic.parked.is_set)
            second_task = asyncio.create_task(second.run())
            loading = asyncio.create_task(send(PER_PHASE))
            await _until("a revocation while parked", lambda: first_logic.revoked_while_parked == 1)
            await _finish(loading, "sending")
            await _until("the second runner committing", lambda: second.transactions > 0)

            # Leave: the second runner leaves while the first is parked mid-batch again.
            first_logic.parked.clear()
            first_logic.park.set()
            loading = asyncio.create_task(send(PER_PHASE))
            await _until("the first runner parked again", first_logic.parked.is_set)
            await second.stop()
            await _finish(second_task, "the second runner's stop")
            await _finish(loading, "sending")
            await _until(
                "a second revocation while parked", lambda: first_logic.revoked_while_parked == 2
            )

            # Everything drains through the first runner, which is still alive.
            await send(PER_PHASE)
            seen: set[bytes] = set()

            def drained() -> bool:
                seen.update(r.value for r in read_topic(kafka_bootstrap, out, idle_s=0.5))
                return seen >= set(sent)

            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_S
            while not await loop.run_in_executor(None, drained):
                assert not first_task.done(), "the first runner stopped"
                assert loop.time() < deadline, f"{len(set(sent) - seen)} records never arrived"
            alive = not first_task.done()
        finally:
            await first.stop()
            stopped = await _settled(first_task)
            await producer.stop()
        return {"alive": alive, "stopped": stopped}

    outcome = asyncio.run(scenario())
    assert outcome["alive"], "the first runner died during the rebalances"
    assert outcome["stopped"], "the first runner's stop hangs"

    outputs = Counter(r.value for r in read_topic(kafka_bootstrap, out))
    assert set(outputs) == set(sent), "lost records"
    doubled = {v: n for v, n in outputs.items() if n > 1}
    assert not doubled, f"{len(doubled)} records forwarded more than once"
    assert read_topic(kafka_bootstrap, dlq) == []
    entries = [(r.offset, r.key, r.value) for r in read_topic(kafka_bootstrap, audit)]
    report = verify_entries(
        entries, directory, checkpoint_signer="bus-sealer", max_checkpoint_every=100
    )
    assert report.ok, report.breaks
    assert sum(report.records.values()) == len(sent)
