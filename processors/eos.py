"""Exactly-once consume-transform-produce for the stages that re-key their records.

Over 500 lines because ``TransactionalStage`` is one object whose rebalance, restore and commit
paths share its assignment lock and partition table; what a batch produces is in ``engine``.

``TransactionalStage`` reads its input topics with a read_committed consumer (manual commits,
range assignment so that co-partitioned inputs land together) and keeps one transactional
producer per assigned input partition number (``transactional.id = {app_id}-{stage}-{p}``):
starting it fences any zombie of an earlier worker. Each batch of a partition's records —
their outputs, DLQ and audit records, state-changelog writes and the input offsets — is
committed in one Kafka transaction, and a revocation waits for the transaction in flight. See
docs/pipeline.md ("Delivery guarantees", "Rebalances"). What a batch produces is computed
without Kafka in ``fleetbus.processors.engine`` (re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from fleetbus.bus.keys import Signer
from fleetbus.bus.topics import check_copartitioned
from fleetbus.observability.metrics import (
    CONSUMER_LAG,
    PRODUCE_ERRORS,
    PRODUCE_RETRIES,
    held_until_commit,
)
from fleetbus.observability.tracing import consume_span, get_tracer
from fleetbus.processors.audit import AuditChain, AuditEvent, ChainHead
from fleetbus.processors.engine import (
    AUDIT_HEAD_KEY,
    BatchStageLogic,
    DeadLetter,
    DeadlineOf,
    InputRecord,
    Output,
    PartitionState,
    StageLogic,
    StageResult,
    audit_outputs,
    changelog_outputs,
    compute,
    dead_letter_result,
    record_events,
)

__all__ = [
    "AUDIT_HEAD_KEY",
    "AssignmentListener",
    "BatchStageLogic",
    "DeadLetter",
    "DeadlineOf",
    "InputRecord",
    "Output",
    "PartitionState",
    "StageHealth",
    "StageLogic",
    "StageResult",
    "TransactionalStage",
    "dead_letter_result",
    "record_events",
]

_log = logging.getLogger(__name__)


@dataclass
class StageHealth:
    """What a probe needs to know about one stage (``TransactionalStage.health``)."""

    stage: str
    running: bool  # the group consumer is started
    in_group: bool  # at least one assignment arrived (it may be empty: more workers than
    # partitions), so the consumer is a member of its group
    assigned: list[int]  # input partition numbers
    producers: list[int]  # partition numbers with a started transactional producer
    since_poll_s: float  # seconds since the stage loop last came round

    @property
    def ready(self) -> bool:
        return self.running and self.in_group and self.assigned == self.producers


@dataclass
class _Partition:
    number: int
    producer: AIOKafkaProducer
    state: PartitionState
    chain: AuditChain


_T = TypeVar("_T")


def _holding_metrics(fn: Callable[..., _T], *args: Any) -> tuple[_T, list[Callable[[], None]]]:
    """``fn(*args)`` with its outcome metrics held for the commit (run in the worker thread:
    a context variable set there is not seen by the event loop's context)."""
    with held_until_commit() as held:
        return fn(*args), held


class AssignmentListener(Protocol):
    """Told a stage's input partition numbers after each change, from its rebalance callbacks,
    under its assignment lock: ``assigned`` returns before the stage reads a record of them."""

    async def revoked(self, stage: str, partitions: frozenset[int]) -> None: ...

    async def assigned(self, stage: str, partitions: frozenset[int]) -> None: ...


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, stage: TransactionalStage) -> None:
        self._stage = stage

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._stage._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._stage._on_assigned(assigned)


class TransactionalStage:
    """Runs one ``StageLogic`` exactly once against Kafka (see the module docstring)."""

    def __init__(
        self,
        logic: StageLogic,
        *,
        bootstrap: str,
        app_id: str,
        state_topic: str,
        audit_topic: str,
        dlq_topic: str,
        audit_signer: Signer | None = None,
        audit_signer_principal: str = "",
        checkpoint_every: int = 100,
        batch_size: int = 50,
        tick_interval_s: float = 1.0,
        max_backoff_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        consumer_options: Mapping[str, Any] | None = None,
        producer_options: Mapping[str, Any] | None = None,
        client_options: Mapping[str, Any] | None = None,
        assignment_listener: AssignmentListener | None = None,
        worker_id: str = "",
    ) -> None:
        self.logic = logic
        self._listener = assignment_listener
        self.stage = logic.name
        self.group_id = f"{app_id}-{self.stage}"
        # The range assignor orders a group's members by member id, which starts with the
        # client id: one worker id in every stage's client id orders the workers alike in every
        # group, so a worker gets the same partition numbers in each stage.
        self.client_id = f"{self.group_id}-consumer" + (f"-{worker_id}" if worker_id else "")
        self._app_id = app_id
        self._bootstrap = bootstrap
        self._state_topic = state_topic
        self._audit_topic = audit_topic
        self._dlq_topic = dlq_topic
        self._signer = audit_signer
        self._signer_principal = audit_signer_principal
        self._checkpoint_every = checkpoint_every
        self._batch_size = batch_size
        self._tick_s = tick_interval_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        # Security settings (TLS) for every client: group consumer, producers, state reader.
        self._client_options = dict(client_options or {})
        self._consumer_options = {**self._client_options, **(consumer_options or {})}
        # A transaction's first requests often meet CONCURRENT_TRANSACTIONS while the broker
        # still writes the previous one's markers; aiokafka then retries after
        # retry_backoff_ms (100 ms by default) — per transaction, i.e. per batch. 20 ms, as
        # aiokafka already uses for AddPartitionsToTxn, halves end-to-end latency here.
        self._producer_options = {
            "retry_backoff_ms": 20,
            **self._client_options,
            **(producer_options or {}),
        }
        self._parts: dict[int, _Partition] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        # Held by every batch and tick from its first read of partition state to the end of its
        # transaction, and by the rebalance callbacks: a revocation waits for the transaction
        # in flight instead of stopping its producer under it. See docs/pipeline.md.
        self._assign_lock = asyncio.Lock()
        # The input partitions the group gives this runner (kept by the rebalance callbacks).
        self._assigned: set[TopicPartition] = set()
        # Changes at every revocation and at the end of every assignment. A batch fetched under
        # an earlier generation is dropped: the positions of its partitions were reset with the
        # assignment (to the committed offsets), so whoever owns them reads it again.
        self._generation = 0
        self._failures = 0
        self.transactions = 0
        self._in_group = False
        self._last_poll = time.monotonic()

    def transactional_id(self, partition: int) -> str:
        return f"{self._app_id}-{self.stage}-{partition}"

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until ``stop``; Kafka errors are retried, never fatal."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=self.group_id,
            client_id=self.client_id,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            **self._consumer_options,
        )
        self._consumer = consumer
        await consumer.start()
        try:
            await self._check_copartitioned(consumer)
        except BaseException:
            await self._shutdown()
            raise
        consumer.subscribe(list(self.logic.input_topics()), listener=_Rebalance(self))
        next_tick = self._clock() + self._tick_s
        try:
            while not self._stopping.is_set():
                try:
                    batches = await consumer.getmany(
                        timeout_ms=int(min(self._tick_s, 0.5) * 1000),
                        max_records=self._batch_size,
                    )
                    self._last_poll = time.monotonic()
                    generation = self._generation
                    for tp, records in batches.items():
                        if records:
                            await self._process_batch(tp, records, generation)
                    if self._clock() >= next_tick:
                        next_tick = self._clock() + self._tick_s
                        await self._reopen_closed()
                        for number in sorted(self._parts):
                            await self._tick(number)
                        await self._observe_lag()
                except KafkaError as exc:
                    _log.warning("stage %s: Kafka error %s; retrying", self.stage, exc)
                    await self._backoff()
                except Exception:
                    # Batches and ticks handle their own failures; this is the last line that
                    # keeps one unexpected fault from ending the stage for good.
                    _log.exception("stage %s: unexpected error in the runner; retrying", self.stage)
                    await self._backoff()
        finally:
            await self._shutdown()

    async def stop(self) -> None:
        self._stopping.set()

    async def _check_copartitioned(self, consumer: AIOKafkaConsumer) -> None:
        """Refuse to start (``ConfigError``) unless the inputs and the state changelog have
        equal partition counts on the broker (``check_copartitioned``)."""
        topics = [*self.logic.input_topics(), self._state_topic]
        # The consumer only knows the metadata of what it subscribed to so far: ask for all.
        cluster = await consumer._client.fetch_all_metadata()
        counts: dict[str, int | None] = {}
        for topic in topics:
            partitions = cluster.partitions_for_topic(topic)
            counts[topic] = None if partitions is None else len(partitions)
        check_copartitioned(f"stage {self.stage}", counts)

    def health(self) -> StageHealth:
        """A snapshot for the worker's probes (read from the probe server's thread: only
        copies of plain attributes are taken)."""
        consumer = self._consumer
        assigned = sorted({tp.partition for tp in consumer.assignment()}) if consumer else []
        return StageHealth(
            stage=self.stage,
            running=consumer is not None,
            in_group=self._in_group,
            assigned=assigned,
            producers=sorted(list(self._parts)),
            since_poll_s=time.monotonic() - self._last_poll,
        )

    async def _shutdown(self) -> None:
        for part in list(self._parts.values()):
            with contextlib.suppress(Exception):
                await self._seal_audit(part)
            with contextlib.suppress(Exception):
                await part.producer.stop()
        self._parts.clear()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None

    async def _backoff(self) -> None:
        self._failures += 1
        delay = min(self._max_backoff_s, 0.1 * (2 ** min(self._failures, 10)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    # -- rebalances -----------------------------------------------------------------------

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        # Waits for the batch or tick in flight (it holds the lock) to commit or abort.
        async with self._assign_lock:
            self._generation += 1
            self._assigned.difference_update(revoked)
            kept = {tp.partition for tp in self._assigned}
            for number in sorted({tp.partition for tp in revoked} - kept):
                await self._close(number)
            if self._listener is not None:
                await self._listener.revoked(self.stage, frozenset(kept))

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        # One producer per transactional id in this process: two would fence each other.
        async with self._assign_lock:
            self._assigned.update(assigned)
            if self._listener is not None:
                # What the partitions' records need (their vehicles' keys) first.
                try:
                    await self._listener.assigned(
                        self.stage, frozenset(tp.partition for tp in self._assigned)
                    )
                except Exception:
                    _log.exception("stage %s: assignment listener failed", self.stage)
            for number in sorted({tp.partition for tp in assigned}):
                if number not in self._parts:
                    await self._open(number, rewind=False)
            # Positions from the offsets committed once every producer has started, i.e. after
            # every earlier transaction of these partitions (ours or an evicted owner's) has
            # completed; aiokafka may have fetched them while one was still in flight. The
            # seeks and the new generation take effect together, with no await in between.
            numbers = sorted({tp.partition for tp in assigned})
            try:
                positions = await self._committed_positions(sorted(assigned, key=str))
            except Exception as exc:
                _log.warning("stage %s: committed offsets not read (%r)", self.stage, exc)
                for number in numbers:  # opened again, with their positions, by _open
                    await self._close(number)
            else:
                self._seek(positions)
            self._generation += 1
        self._in_group = True

    async def _committed_positions(
        self, tps: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Where each of ``tps`` resumes: its committed offset, or the log start when nothing
        was committed yet (``auto_offset_reset`` is earliest)."""
        assert self._consumer is not None
        positions: dict[TopicPartition, int] = {}
        for tp in tps:
            offset = await self._consumer.committed(tp)
            if offset is not None:
                positions[tp] = offset
        missing = [tp for tp in tps if tp not in positions]
        if missing:
            positions.update(await self._consumer.beginning_offsets(missing))
        return positions

    def _seek(self, positions: Mapping[TopicPartition, int]) -> None:
        assert self._consumer is not None
        assignment = self._consumer.assignment()
        for tp, offset in positions.items():
            if tp in assignment:
                self._consumer.seek(tp, offset)

    async def _open(self, number: int, *, rewind: bool = True) -> bool:
        """Start partition ``number``'s producer (fencing any other holder of its transactional
        id and completing or aborting that one's open transaction), restore its state and audit
        head from the committed changelog and, with ``rewind``, move its input partitions back
        to their committed offsets. False (after a back-off) if that failed; a later batch or
        tick of the partition tries again."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            transactional_id=self.transactional_id(number),
            client_id=self.transactional_id(number),
            acks="all",
            **self._producer_options,
        )
        try:
            # init_transactions: fences an older producer with this id and aborts its open
            # transaction, so the state read below holds only committed writes.
            await producer.start()
            committed = await self._restore(number)
            if rewind:
                tps = sorted((tp for tp in self._assigned if tp.partition == number), key=str)
                self._seek(await self._committed_positions(tps))
        except Exception as exc:
            _log.warning(
                "stage %s: partition %d not opened (%r); will retry", self.stage, number, exc
            )
            with contextlib.suppress(Exception):
                await producer.stop()
            await self._backoff()
            return False
        state = PartitionState(committed)
        head_bytes = state.get(AUDIT_HEAD_KEY)
        head = ChainHead.from_cbor(head_bytes) if head_bytes else ChainHead()
        chain = AuditChain(
            f"{self.stage}-{number}",
            head=head,
            signer=self._signer,
            signer_principal=self._signer_principal,
            checkpoint_every=self._checkpoint_every,
            clock=self._clock,
        )
        self._parts[number] = _Partition(number, producer, state, chain)
        _log.info(
            "stage %s: partition %d assigned, %d state entries restored",
            self.stage,
            number,
            len(committed),
        )
        return True

    async def _close(self, number: int) -> None:
        part = self._parts.pop(number, None)
        if part is not None:
            with contextlib.suppress(Exception):
                await part.producer.stop()

    async def _reopen_closed(self) -> None:
        """Open the assigned partitions whose producer was fenced or failed, so that their
        ticks run even while no input arrives."""
        async with self._assign_lock:
            for number in sorted({tp.partition for tp in self._assigned} - set(self._parts)):
                await self._open(number)

    async def _restore(self, number: int) -> dict[str, bytes]:
        tp = TopicPartition(self._state_topic, number)
        reader = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            client_id=f"{self.group_id}-restore",
            **self._client_options,
        )
        await reader.start()
        state: dict[str, bytes] = {}
        try:
            reader.assign([tp])
            await reader.seek_to_beginning(tp)
            end = (await reader.end_offsets([tp]))[tp]
            while await reader.position(tp) < end:
                batch = await reader.getmany(tp, timeout_ms=1000)
                for record in batch.get(tp, []):
                    if record.key is None:
                        continue
                    key = record.key.decode()
                    if record.value is None:
                        state.pop(key, None)
                    else:
                        state[key] = record.value
        finally:
            await reader.stop()
        return state

    # -- processing -----------------------------------------------------------------------

    def _compute(self, part: _Partition, records: Sequence[Any]) -> StageResult:
        return compute(
            self.logic,
            part.state,
            records,
            dlq_topic=self._dlq_topic,
            clock=self._clock,
            record_span=self._record_span,
        )

    def _record_span(self, record: InputRecord) -> contextlib.AbstractContextManager[Any]:
        """A CONSUMER span for one input record, child of the trace context in its headers."""
        return consume_span(
            get_tracer(),
            record.topic,
            record.headers,
            # Command or vehicle ids; a hostile key is cut short and never decoded strictly.
            key=None if record.key is None else record.key[:128].decode("utf-8", "replace"),
            partition=record.partition,
            offset=record.offset,
            consumer_group=self.group_id,
            bootstrap=self._bootstrap,
            client_id=self.client_id,
        )

    def _audit_outputs(
        self, part: _Partition, events: Sequence[AuditEvent], *, seal: bool = False
    ) -> list[Output]:
        return audit_outputs(part.chain, part.state, events, self._audit_topic, seal=seal)

    def _changelog(self, part: _Partition) -> list[Output]:
        return changelog_outputs(part.state, self._state_topic, part.number)

    async def _process_batch(
        self, tp: TopicPartition, records: Sequence[Any], generation: int
    ) -> None:
        async with self._assign_lock:
            if generation != self._generation or tp not in self._assigned:
                # Fetched before a rebalance: read again from the committed offset by whoever
                # owns the partition now (this runner too: the assignment reset its position).
                return
            part = self._parts.get(tp.partition)
            if part is None:
                # Our producer was fenced or failed but the group still gives us the partition:
                # start a new one (fencing the other in turn) and read from the committed offset.
                await self._open(tp.partition)
                return
            offsets = {tp: OffsetAndMetadata(records[-1].offset + 1, "")}
            if not await self._transact(part, lambda: self._compute(part, records), offsets):
                # Nothing of the batch is visible; read it again from its first offset. (The
                # lock kept the partition assigned: revocations wait for it.)
                self._seek({tp: records[0].offset})

    async def _tick(self, number: int) -> None:
        async with self._assign_lock:
            part = self._parts.get(number)
            if part is None:
                return
            now = self._clock()
            await self._transact(
                part, lambda: self.logic.tick(number, part.state, now), None, seal=True
            )

    async def _transact(
        self,
        part: _Partition,
        work: Callable[[], StageResult],
        offsets: dict[TopicPartition, OffsetAndMetadata] | None,
        *,
        seal: bool = False,
    ) -> bool:
        """Run ``work`` on the partition's state (in a thread) and commit its outputs, audit
        records, changelog and ``offsets`` in one transaction; on any failure, roll the state
        and audit head back and return False."""
        head_before = part.chain.head
        try:
            result, held = await asyncio.to_thread(_holding_metrics, work)
            with held_until_commit() as held_audit:
                outputs = result.outputs + self._audit_outputs(part, result.audit, seal=seal)
            outputs += self._changelog(part)
        except Exception:
            _log.exception(
                "stage %s: partition %d: work failed; will retry", self.stage, part.number
            )
            part.state.rollback()
            part.chain.head = head_before
            await self._backoff()
            return False
        if not outputs and not offsets:
            part.state.commit()  # nothing written; keeps the expiry index of what tick saw
            for update in held + held_audit:  # nothing to commit: what was counted stands
                update()
            return True
        return await self._commit(part, outputs, offsets, head_before, held + held_audit)

    async def _seal_audit(self, part: _Partition) -> None:
        """End of a run: sign the chain's unsigned tail in a last transaction. (Not on
        revocation: a batch may still be in flight then; the next owner signs the restored
        head before its first record, or at its first tick.)"""
        async with self._assign_lock:
            await self._transact(part, StageResult, None, seal=True)

    async def _commit(
        self,
        part: _Partition,
        outputs: Sequence[Output],
        offsets: dict[TopicPartition, OffsetAndMetadata] | None,
        head_before: ChainHead,
        metrics: Sequence[Callable[[], None]] = (),
    ) -> bool:
        """Commit one transaction; then apply the batch's outcome ``metrics`` (on_commit). On
        failure nothing of it counts: the records are read and counted again."""
        producer = part.producer
        try:
            async with producer.transaction():
                for out in outputs:
                    await producer.send(
                        out.topic,
                        value=out.value,
                        key=out.key,
                        partition=out.partition,
                        headers=list(out.headers) or None,
                    )
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, self.group_id)
        except ProducerFenced:
            # Another worker owns this partition now: drop it without writing.
            PRODUCE_ERRORS.labels(stage=self.stage).inc()
            _log.warning("stage %s: producer for partition %d fenced", self.stage, part.number)
            part.state.rollback()
            part.chain.head = head_before
            await self._close(part.number)
            return False
        except KafkaError as exc:
            PRODUCE_ERRORS.labels(stage=self.stage).inc()
            PRODUCE_RETRIES.labels(stage=self.stage).inc()
            _log.warning("stage %s: transaction failed (%s); will retry", self.stage, exc)
            part.state.rollback()
            part.chain.head = head_before
            await self._backoff()
            return False
        except Exception:
            # A producer in a state no retry leaves (aiokafka raises AssertionError or
            # IllegalOperation after a fatal error): drop it; the partition is opened again
            # with a new one, its state and offsets read back from what was committed.
            PRODUCE_ERRORS.labels(stage=self.stage).inc()
            _log.exception("stage %s: producer for partition %d failed", self.stage, part.number)
            part.state.rollback()
            part.chain.head = head_before
            await self._close(part.number)
            await self._backoff()
            return False
        part.state.commit()
        for update in metrics:
            update()
        self._failures = 0
        self.transactions += 1
        return True

    async def _observe_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        lag: dict[str, int] = {}
        for tp in consumer.assignment():
            end = consumer.last_stable_offset(tp)
            if end is None:
                end = consumer.highwater(tp)
            if end is None:
                continue
            try:
                position = await consumer.position(tp)
            except KafkaError:
                continue
            lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - position)
        for topic, value in lag.items():
            CONSUMER_LAG.labels(stage=self.stage, topic=topic).set(value)
