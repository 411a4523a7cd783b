"""The worker's key-topic follower: applies the compacted key topic to the stages' shared
``KeyDirectory`` while they run, and dead-letters and audits whatever it refuses; and, with
``directory_scope`` partitions, ``PartitionBuckets``: which vehicle buckets that directory
holds as the vehicle-keyed stages' partitions move.

The worker catches up with the topic before its stages start (``catch_up``, blocking, in
``build_pipeline``); this service then follows from where the catch-up ended, in the worker's
event loop — the same thread as the stages, so a change lands between two of their records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from fleetbus.bus.directory import (
    HEAD_KAFKA_KEY,
    WHOLE_DIRECTORY,
    DirectoryHead,
    DirectoryScope,
    KeyDirectory,
    RecordFile,
    RecordIndex,
    StoredRecord,
    open_directory_file,
    peek_record,
    principal_set,
)
from fleetbus.bus.keys import Signer
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.observability.metrics import (
    DIRECTORY_SCOPE_FALLBACK,
    DIRECTORY_VEHICLES_HELD,
    DLQ_RECORDS,
)
from fleetbus.processors.audit import AuditChain, AuditEvent
from fleetbus.processors.engine import DeadLetter
from fleetbus.processors.fleet_registry import DirectoryRoster
from fleetbus.sdk.keytopic import (
    KeyTopicFollower,
    KeyTopicItem,
    KeyTopicReader,
    KeyTopicRefusal,
    read_from,
)

_log = logging.getLogger(__name__)

#: The ``stage`` name of the follower in DLQ records, metrics and audit chains.
STAGE = "keys"


class KeyTopicService:
    """Follows the key topic in a running worker (``run`` / ``stop``, like a stage runner).

    A refused item goes to the DLQ (stage ``keys``, its reason code, its original bytes) and
    into the audit trail: this run's own chain ``keys-<run id>``, signed by the audit signer
    right after each refusal (refusals are rare; nothing is left unsigned) — once per process
    for each item (by its partition and offset), however often the topic is re-read for buckets
    taken. ``on_head`` runs in a thread after a new head is accepted (the worker refreshes its
    policy's entities with it), never two at once: heads that arrive meanwhile make it run once
    more. ``roster``, if given, sees every record too (the fleet-wide registry of a worker with
    a scoped directory).
    """

    stage = STAGE

    def __init__(
        self,
        settings: FleetbusSettings,
        directory: KeyDirectory,
        *,
        audit_signer: Signer | None = None,
        on_head: Callable[[], None] | None = None,
        roster: DirectoryRoster | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.topic = settings.topics.full(settings.topics.keys)
        self._dlq = settings.topics.full(settings.topics.dlq)
        self._audit = settings.topics.full(settings.topics.audit)
        self._clock = clock
        self._chain = AuditChain(
            f"{STAGE}-{uuid.uuid4().hex[:12]}",
            signer=audit_signer,
            signer_principal=settings.sealer_principal,
            checkpoint_every=settings.audit_checkpoint_every,
            clock=clock,
        )
        self._pending: list[KeyTopicRefusal] = []
        # The refused items already queued for the DLQ, by topic, partition and offset: a
        # bucket's re-read of the topic (``PartitionBuckets``, which reports through
        # ``follower.on_refused``) refuses them again, but each is dead-lettered once per
        # process. ``_refused`` runs on the event loop and in the re-read's thread.
        self._reported: set[tuple[str, int, int]] = set()
        self._reported_lock = threading.Lock()
        self.follower = _WorkerFollower(directory, roster, role="worker", on_refused=self._refused)
        self._positions: dict[int, int] = {}
        self._stopping = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        # Work that follows a new head (the policy's entities), off the event loop, coalesced.
        self.on_head = on_head
        self._head_changed = False
        self._refresh: asyncio.Task[None] | None = None

    def _refused(self, refusal: KeyTopicRefusal) -> None:
        """Queue ``refusal`` for the DLQ and the audit trail, unless its item already was."""
        item = refusal.item
        where = (item.topic, item.partition, item.offset)
        with self._reported_lock:
            if where in self._reported:
                return
            self._reported.add(where)
            self._pending.append(refusal)

    def catch_up(self, timeout_s: float = 60.0) -> None:
        """Read the topic up to its current end (blocking; before the stages start). What was
        refused on the way is reported when ``run`` starts (it needs the event loop)."""
        reader = KeyTopicReader(self.settings, self.follower)
        try:
            reader.start(timeout_s)
            self._positions = reader.positions()
        finally:
            reader.close()

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"{self.settings.app_id}-keys",
            **self.settings.aiokafka_client_config(),
        )
        failures = 0
        try:
            if not self._positions:
                await asyncio.to_thread(self.catch_up)
            await consumer.start()
            await self._assign(consumer)
            while not self._stopping.is_set():
                try:
                    await self._report()
                    batches = await consumer.getmany(timeout_ms=500, max_records=1000)
                    for tp, records in batches.items():
                        for record in records:
                            outcome = self.follower.apply(
                                KeyTopicItem(
                                    tp.topic, tp.partition, record.offset, record.key, record.value
                                )
                            )
                            if outcome == "applied" and record.key == HEAD_KAFKA_KEY:
                                self._head_changed = True
                    self._start_refresh()
                    failures = 0
                except Exception as exc:  # Kafka down, DLQ unreachable: retry, never stop
                    failures += 1
                    _log.warning("key topic: %s; retrying", type(exc).__name__)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._stopping.wait(), timeout=min(5.0, 0.1 * 2**failures)
                        )
        finally:
            if self._refresh is not None:
                with contextlib.suppress(Exception):
                    await self._refresh
            with contextlib.suppress(Exception):
                await consumer.stop()
            if self._producer is not None:
                with contextlib.suppress(Exception):
                    await self._producer.stop()

    def _start_refresh(self) -> None:
        if self.on_head is None or not self._head_changed:
            return
        if self._refresh is not None and not self._refresh.done():
            return  # runs again when this one is done: the flag stays set
        self._head_changed = False
        self._refresh = asyncio.create_task(self._run_refresh(self.on_head))

    @staticmethod
    async def _run_refresh(on_head: Callable[[], None]) -> None:
        try:
            await asyncio.to_thread(on_head)
        except Exception:
            _log.exception("key topic: refreshing after a new directory head failed")

    async def _assign(self, consumer: AIOKafkaConsumer) -> None:
        """Continue where the catch-up ended (a partition added since: from its start)."""
        tps = [TopicPartition(self.topic, p) for p in sorted(self._positions)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, self._positions[tp.partition])

    async def _report(self) -> None:
        """Dead-letter and audit the refusals collected since the last call."""
        if not self._pending:
            return
        if self._producer is None:
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.kafka_bootstrap,
                client_id=f"{self.settings.app_id}-keys-dlq",
                acks="all",
                **self.settings.aiokafka_client_config(),
            )
            await self._producer.start()
        while self._pending:
            refusal = self._pending[0]
            item, now = refusal.item, self._clock()
            letter = DeadLetter(
                STAGE,
                item.topic,
                item.partition,
                item.offset,
                refusal.reason,
                refusal.detail,
                item.key,
                item.value,
                now,
            )
            head = self._chain.head
            event = AuditEvent(
                actor="bus",
                event="dead_lettered",
                reason=refusal.reason.value,
                detail={
                    "stage": STAGE,
                    "topic": item.topic,
                    "partition": item.partition,
                    "offset": item.offset,
                    "detail": refusal.detail[:256],
                },
            )
            values = self._chain.append(event) + self._chain.seal()
            key = self._chain.chain.encode()
            try:
                await self._producer.send_and_wait(self._dlq, letter.encode(), key=item.key)
                for value in values:
                    await self._producer.send_and_wait(self._audit, value, key=key, partition=0)
            except Exception:
                self._chain.head = head  # written again, whole, at the next attempt
                raise
            DLQ_RECORDS.labels(stage=STAGE, reason=refusal.reason.value).inc()
            self._pending.pop(0)

    async def stop(self) -> None:
        self._stopping.set()


class _WorkerFollower(KeyTopicFollower):
    """The worker's follower: also hands every record to the registry's ``roster``."""

    def __init__(
        self, directory: KeyDirectory, roster: DirectoryRoster | None, **kwargs: Any
    ) -> None:
        super().__init__(directory, **kwargs)
        self.roster = roster

    def apply(self, item: KeyTopicItem) -> str:
        if self.roster is not None and item.key != HEAD_KAFKA_KEY:
            self.roster.note_kafka(item.key, item.value)
        return super().apply(item)


class _BucketReload(KeyTopicFollower):
    """Applies the key topic's records of vehicle ``buckets`` only (a re-read for buckets just
    taken into the scope); heads are the running follower's business. What it refuses is
    refused again at every re-read; the worker's ``on_refused`` (``KeyTopicService``)
    dead-letters each item once."""

    def __init__(self, directory: KeyDirectory, buckets: frozenset[int], **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self.buckets = buckets

    def apply(self, item: KeyTopicItem) -> str:
        head = self.directory.head
        named = peek_record(bytes(item.value or b""))
        if item.key == HEAD_KAFKA_KEY or head is None or named is None:
            return "skipped"  # unreadable values were refused by the running follower already
        index = principal_set(*named, head.vehicle_buckets)
        if index == 0 or index - 1 not in self.buckets:
            return "skipped"
        return self._apply(item)


#: The stages whose inputs are keyed by vehicle id: partition p holds bucket p's vehicles.
VEHICLE_KEYED_STAGES = frozenset({"seal", "responses", "telemetry"})


def buckets_are_partitions(head: DirectoryHead, partitions: int) -> bool:
    """Whether ``head``'s vehicle buckets are the topics' partitions, as a scoped worker needs;
    if not, a WARNING naming both counts and ``fleetbus_directory_scope_fallback`` 1: the
    worker then holds every vehicle."""
    if head.vehicle_buckets == partitions:
        return True
    _log.warning(
        "key directory: head %d has %d vehicle buckets but the topics have %d partitions: "
        "holding every vehicle (directory_scope=partitions needs a head signed with buckets = "
        "partitions)",
        head.seq,
        head.vehicle_buckets,
        partitions,
    )
    DIRECTORY_SCOPE_FALLBACK.set(1)
    return False


class PartitionBuckets:
    """Which vehicle buckets the worker's ``KeyDirectory`` holds (``directory_scope``
    partitions): set 0 always, plus the buckets of the partitions its vehicle-keyed stages are
    assigned. The stage runners report their assignment (``assigned``, ``revoked``) from their
    rebalance callbacks, holding their assignment lock, so a new bucket is loaded before its
    partition's first record: first the bucket is taken into the scope (the running follower
    keeps its records from then on), then its records are read from ``directory.cbor`` and the
    key topic is re-read for it; its set is used once it matches the head. A bucket no stage
    holds any more is dropped at the assignment that ends a rebalance (one always follows a
    revocation) once no stage is between the two, so a bucket that stays with another stage of
    this worker is not reloaded.

    If the head's bucket count is not the partition count, buckets are not partitions: every
    bucket is held (WARNING naming both counts, ``fleetbus_directory_scope_fallback`` 1).
    """

    def __init__(
        self,
        settings: FleetbusSettings,
        directory: KeyDirectory,
        directory_file: Path,
        *,
        on_refused: Callable[[KeyTopicRefusal], None] | None = None,
        topic_timeout_s: float = 60.0,
        roster: DirectoryRoster | None = None,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.directory_file = directory_file
        # The directory file, open since the first load (the roster's pass: with where its
        # records are, so a bucket's load reads that bucket's records only).
        self._file: RecordFile | None = None if roster is None else roster.file
        self._index: RecordIndex | None = None if roster is None else roster.index
        # Where a bucket's re-read of the key topic starts: from the file's head, else the
        # topic's start (0: the first item), never from the directory's current head.
        start = read_from(None if roster is None else roster.head, settings.key_topic_read_margin_s)
        self._since = 0.0 if start is None else start
        self.on_refused = on_refused
        self.topic_timeout_s = topic_timeout_s
        self.fallback = False
        self._leases: dict[str, frozenset[int]] = {}
        self._rebalancing: set[str] = set()  # revoked, not assigned again yet
        self._lock = asyncio.Lock()
        DIRECTORY_SCOPE_FALLBACK.set(0)
        DIRECTORY_VEHICLES_HELD.set(directory.vehicles_held())

    async def revoked(self, stage: str, partitions: Collection[int]) -> None:
        """``stage`` now holds only ``partitions``, until its next ``assigned``."""
        self._leases[stage] = frozenset(partitions)
        self._rebalancing.add(stage)

    async def assigned(self, stage: str, partitions: Collection[int]) -> None:
        """``stage`` now holds ``partitions``: load what is new; drop what no stage holds once
        no stage is between a revocation and its assignment (each stage's group rebalances on
        its own: a bucket one stage gave up may be the next one's again)."""
        self._leases[stage] = frozenset(partitions)
        self._rebalancing.discard(stage)
        async with self._lock:
            wanted, settled = self.wanted(), not self._rebalancing
            await asyncio.to_thread(self.reconcile, wanted, drop=settled)

    def wanted(self) -> frozenset[int]:
        """The buckets to hold: those of every stage's partitions, or all of them (fallback)."""
        head = self.directory.head
        if head is not None and (
            self.fallback or not buckets_are_partitions(head, self.settings.partitions)
        ):
            self.fallback = True
            return frozenset(range(head.vehicle_buckets))
        return frozenset().union(*self._leases.values())

    def reconcile(self, wanted: frozenset[int], *, drop: bool = True) -> None:
        """Hold ``wanted`` (blocking: file and topic reads); with ``drop``, nothing else."""
        held = self.directory.scope.buckets or frozenset()
        gone = held - wanted if drop else frozenset()
        if gone:
            dropped = self.directory.release_buckets(gone)
            _log.info("key directory: buckets %s dropped (%d records)", sorted(gone), dropped)
        new = self.directory.hold_buckets(wanted)
        if new:
            self._load(new)
        DIRECTORY_VEHICLES_HELD.set(self.directory.vehicles_held())

    def reread_topic(self, follower: KeyTopicFollower) -> None:
        """Read the key topic from the file's head (less ``key_topic_read_margin_s``) to its
        current end through ``follower``
        (blocking; ``KafkaUnavailableError`` if that takes more than ``topic_timeout_s``)."""
        reader = KeyTopicReader(self.settings, follower)
        try:
            # From the head of the file the buckets come from, not the directory's current
            # head: the records of a bucket not held that arrived since were not kept.
            reader.start(self.topic_timeout_s, since=self._since)
        finally:
            reader.close()

    def _load(self, buckets: frozenset[int]) -> None:
        started = time.monotonic()
        # In the fallback the file's head may count buckets otherwise than the directory's.
        scope = WHOLE_DIRECTORY if self.fallback else DirectoryScope(buckets=buckets)
        # Always the file as it was at the first load: records the directory holds by their
        # position in it stay readable. Records it lacks, or older ones, do not match the head
        # and come from the key topic, re-read next.
        with open_directory_file(
            self.directory_file, scope=scope, file=self._file, index=self._index
        ) as stream:
            self._file = stream.file
            loaded = 0

            def vehicles() -> Iterator[StoredRecord]:  # set 0 is held already
                nonlocal loaded
                if self._index is not None:  # by position: the buckets' records, none to peek at
                    source = self._index.records(stream.file, lambda i: i != 0 and scope.holds(i))
                else:
                    source = (
                        item
                        for item in stream.records
                        if (named := peek_record(item.data)) is not None and named[1] == "vehicle"
                    )
                for item in source:
                    loaded += 1
                    yield item

            if stream.head is not None:
                self.directory.ingest_committed(vehicles(), stream.head)
        from_file = time.monotonic() - started
        try:
            self.reread_topic(
                _BucketReload(self.directory, buckets, role="worker", on_refused=self.on_refused)
            )
        except Exception as exc:
            _log.error(
                "key directory: key topic not re-read for buckets %s (%s); their keys are "
                "used only while their records match the head",
                sorted(buckets),
                exc,
            )
        unsettled = [i - 1 for i in self.directory.unsettled_sets() if i - 1 in buckets]
        _log.info(
            "key directory: buckets %s loaded (%d vehicle records from %s in %.3f s, key topic "
            "re-read in %.3f s)%s",
            sorted(buckets),
            loaded,
            self.directory_file.name,
            from_file,
            time.monotonic() - started - from_file,
            f"; buckets {unsettled} do not match the head: their keys are refused"
            if unsettled
            else "",
        )
