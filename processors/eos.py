"""Exactly-once consume-transform-produce for the stages that re-key their records.

``TransactionalStage`` reads its input topics with a read_committed consumer (manual commits,
range assignment so that co-partitioned inputs land together) and keeps one transactional
producer per assigned input partition number (``transactional.id = {app_id}-{stage}-{p}``):
starting it fences any zombie of an earlier worker. Each batch of a partition's records —
their outputs, DLQ and audit records, state-changelog writes and the input offsets — is
committed in one Kafka transaction, and a revocation waits for the transaction in flight. See
docs/pipeline.md ("Delivery guarantees", "Rebalances").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import cbor2
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import Signer
from fleetbus.bus.topics import check_copartitioned
from fleetbus.observability.metrics import (
    CONSUMER_LAG,
    DLQ_RECORDS,
    INTERNAL_ERRORS,
    PRODUCE_ERRORS,
    PRODUCE_RETRIES,
    RECORDS,
    STAGE_LATENCY,
    held_until_commit,
    on_commit,
)
from fleetbus.observability.tracing import (
    consume_span,
    get_tracer,
    inject_headers,
    record_failover,
    record_reject,
)
from fleetbus.processors.audit import AuditChain, AuditEvent, ChainHead

__all__ = [
    "AUDIT_HEAD_KEY",
    "BatchStageLogic",
    "DeadLetter",
    "DeadlineOf",
    "InputRecord",
    "Output",
    "PartitionState",
    "StageLogic",
    "StageResult",
    "TransactionalStage",
    "dead_letter_result",
]

_log = logging.getLogger(__name__)

#: The state key under which a partition's audit chain head is kept.
AUDIT_HEAD_KEY = "__audit_head__"

#: A stage's expiry rule: the time after which ``tick`` must look at an entry, from its key and
#: value alone (None: never).
DeadlineOf = Callable[[str, bytes], float | None]


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


def _record_events(stage: str, result: StageResult) -> None:
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


def _with_trace_context(result: StageResult) -> StageResult:
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
    # The runner turns the audit event below into the span's reject event (_record_events).
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


class PartitionState:
    """Key-value state of one input partition, changelogged to a compacted topic.

    Writes go to an overlay that becomes visible to later reads at once and is committed or
    rolled back with the Kafka transaction that carries its changelog records.

    Timers: ``due(now, deadline_of)`` lists the keys whose deadline has passed, from an index
    ordered by deadline (a heap), so that a stage's ``tick`` costs O(due · log n) instead of a
    decode of every entry. The deadline of an entry is a function of its value alone
    (``deadline_of(key, value)``, the stage's), so the index needs no changelog records of its
    own: the first ``due`` builds it from the committed entries (a state is made afresh from
    the changelog on every assignment), ``commit`` updates it for the keys the transaction
    wrote, ``rollback`` restores the entries ``due`` took out of it, and entries written by
    the open transaction are read from the overlay.
    """

    def __init__(self, committed: Mapping[str, bytes] | None = None) -> None:
        self._committed: dict[str, bytes] = dict(committed or {})
        self._pending: dict[str, bytes | None] = {}
        self._deadline_of: DeadlineOf | None = None
        # The committed deadline of every indexed key; the heap holds one (deadline, key) pair
        # for each, plus stale pairs of keys whose deadline changed since (skipped when popped,
        # dropped when the heap outgrows the index twice over).
        self._deadlines: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        # Pairs popped by ``due`` in the open transaction: back on the heap on rollback, and on
        # commit those still current.
        self._taken: list[tuple[float, str]] = []

    def get(self, key: str) -> bytes | None:
        if key in self._pending:
            return self._pending[key]
        return self._committed.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._pending[key] = value

    def delete(self, key: str) -> None:
        if self.get(key) is not None:
            self._pending[key] = None

    def items(self) -> Iterator[tuple[str, bytes]]:
        for key, value in self._committed.items():
            if key not in self._pending:
                yield key, value
        for key, pending in list(self._pending.items()):
            if pending is not None:
                yield key, pending

    def changes(self) -> dict[str, bytes | None]:
        return dict(self._pending)

    def due(self, now: float, deadline_of: DeadlineOf) -> list[str]:
        """Keys whose deadline is before ``now``, soonest first (this transaction's own writes
        last). A due key stays due until the transaction that sees it rewrites or deletes it
        and commits. ``deadline_of`` must be the same function at every call."""
        if self._deadline_of is None:
            self._build(deadline_of)
        self._restore_taken()  # an earlier call of this transaction took them out
        keys: list[str] = []
        seen: set[str] = set()
        while self._heap and self._heap[0][0] < now:
            deadline, key = heapq.heappop(self._heap)
            self._taken.append((deadline, key))
            current = self._deadlines.get(key) == deadline and key not in self._pending
            if current and key not in seen:
                seen.add(key)
                keys.append(key)
        for key, value in self._pending.items():
            if value is None or key in seen:
                continue
            written = _deadline(deadline_of, key, value)
            if written is not None and written < now:
                seen.add(key)
                keys.append(key)
        return keys

    def _build(self, deadline_of: DeadlineOf) -> None:
        for key, value in self._committed.items():
            deadline = _deadline(deadline_of, key, value)
            if deadline is not None:
                self._deadlines[key] = deadline
        self._heap = [(deadline, key) for key, deadline in self._deadlines.items()]
        heapq.heapify(self._heap)
        self._deadline_of = deadline_of

    def commit(self) -> None:
        for key, value in self._pending.items():
            if value is None:
                self._committed.pop(key, None)
            else:
                self._committed[key] = value
        if self._deadline_of is not None:
            self._index(self._deadline_of)
        self._pending.clear()

    def _index(self, deadline_of: DeadlineOf) -> None:
        for key, value in self._pending.items():
            deadline = None if value is None else _deadline(deadline_of, key, value)
            if deadline is None:
                self._deadlines.pop(key, None)
            elif self._deadlines.get(key) != deadline:
                self._deadlines[key] = deadline
                heapq.heappush(self._heap, (deadline, key))
        for pair in set(self._taken):
            if self._deadlines.get(pair[1]) == pair[0]:
                heapq.heappush(self._heap, pair)
        self._taken.clear()
        if len(self._heap) > 2 * len(self._deadlines) + 1024:
            self._heap = [(deadline, key) for key, deadline in self._deadlines.items()]
            heapq.heapify(self._heap)

    def rollback(self) -> None:
        self._pending.clear()
        self._restore_taken()

    def _restore_taken(self) -> None:
        for pair in self._taken:
            heapq.heappush(self._heap, pair)
        self._taken.clear()

    def __len__(self) -> int:
        return sum(1 for _ in self.items())


def _deadline(deadline_of: DeadlineOf, key: str, value: bytes) -> float | None:
    """``deadline_of(key, value)``; an entry it cannot read is logged and left without a timer
    rather than failing the commit that wrote it (the stage wrote it: that is a bug, not input)."""
    try:
        return deadline_of(key, value)
    except Exception:
        _log.exception("state entry %r has no readable deadline; not indexed", key)
        return None


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
    ) -> None:
        self.logic = logic
        self.stage = logic.name
        self.group_id = f"{app_id}-{self.stage}"
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
            client_id=f"{self.group_id}-consumer",
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

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        # One producer per transactional id in this process: two would fence each other.
        async with self._assign_lock:
            self._assigned.update(assigned)
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
        inputs = [
            InputRecord(
                topic=raw.topic,
                partition=raw.partition,
                offset=raw.offset,
                key=raw.key,
                value=raw.value,
                timestamp_ms=raw.timestamp,
                headers=tuple((k, v) for k, v in (raw.headers or ())),
            )
            for raw in records
        ]
        total = StageResult()
        process_batch = getattr(self.logic, "process_batch", None)
        if process_batch is not None and len(inputs) > 1:
            started = time.perf_counter()
            now = self._clock()
            try:
                with held_until_commit() as batch_metrics:
                    results: Sequence[StageResult | Exception] = process_batch(
                        inputs, part.state, now
                    )
                if len(results) != len(inputs):
                    raise RuntimeError("process_batch returned the wrong number of results")
            except Exception:
                # The batch as a whole failed: nothing of it counts (its outcome metrics are
                # dropped too); redo it record by record. process_batch must return an
                # exception per bad record, so this is our bug.
                _log.exception("stage %s: batch processing failed; one by one", self.stage)
                INTERNAL_ERRORS.labels(stage=self.stage).inc()
                part.state.rollback()
            else:
                for update in batch_metrics:
                    on_commit(update)
                each = (time.perf_counter() - started) / len(inputs)
                for record, outcome in zip(inputs, results, strict=True):
                    with self._record_span(record):
                        if isinstance(outcome, Exception):
                            outcome = self._dead_letter(record, outcome, now)
                        _record_events(self.stage, outcome)
                        outcome = _with_trace_context(outcome)
                    STAGE_LATENCY.labels(stage=self.stage).observe(each)
                    on_commit(RECORDS.labels(stage=self.stage, outcome=outcome.outcome).inc)
                    total.extend(outcome)
                return total
        for record in inputs:
            started = time.perf_counter()
            now = self._clock()
            with self._record_span(record):
                try:
                    result = self.logic.process(record, part.state, now)
                except Exception as exc:
                    result = self._dead_letter(record, exc, now)
                _record_events(self.stage, result)
                result = _with_trace_context(result)
            STAGE_LATENCY.labels(stage=self.stage).observe(time.perf_counter() - started)
            on_commit(RECORDS.labels(stage=self.stage, outcome=result.outcome).inc)
            total.extend(result)
        return total

    def _record_span(self, record: InputRecord) -> contextlib.AbstractContextManager[Any]:
        """A CONSUMER span for one input record, child of the trace context in its headers."""
        return consume_span(
            get_tracer(),
            record.topic,
            record.headers,
            partition=record.partition,
            offset=record.offset,
            consumer_group=self.group_id,
            bootstrap=self._bootstrap,
            client_id=f"{self.group_id}-consumer",
        )

    def _dead_letter(self, record: InputRecord, exc: Exception, now: float) -> StageResult:
        """The DLQ result of a record whose logic raised. Stages turn bad input into typed
        rejects themselves; an exception that is not a ``FleetbusError`` (or one without a
        reason) is a fault of ours, filed as ``internal``, never as ``malformed``."""
        reason = exc.reason if isinstance(exc, FleetbusError) else ReasonCode.INTERNAL
        detail = str(exc) if isinstance(exc, FleetbusError) else type(exc).__name__
        if reason is ReasonCode.INTERNAL:
            # Counted as it happens, not on commit: the fault occurred whether or not the
            # transaction commits.
            INTERNAL_ERRORS.labels(stage=self.stage).inc()
            _log.error(
                "stage %s: internal error on %s[%d]@%d",
                self.stage,
                record.topic,
                record.partition,
                record.offset,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        return dead_letter_result(self.stage, self._dlq_topic, record, reason, detail, now=now)

    def _audit_outputs(
        self, part: _Partition, events: Sequence[AuditEvent], *, seal: bool = False
    ) -> list[Output]:
        """The audit values of ``events``; with ``seal``, then a checkpoint over any unsigned
        records (ticks and the end of a run: the chain's tail is signed while the writer
        lives, not only every ``checkpoint_every`` records)."""
        values = [value for event in events for value in part.chain.append(event)]
        if seal:
            values += part.chain.seal()
        if values:
            part.state.put(AUDIT_HEAD_KEY, part.chain.head.to_cbor())
        key = part.chain.chain.encode()
        return [Output(self._audit_topic, key, value, partition=0) for value in values]

    def _changelog(self, part: _Partition) -> list[Output]:
        return [
            Output(self._state_topic, key.encode(), value, partition=part.number)
            for key, value in part.state.changes().items()
        ]

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
