"""The worker's key-topic follower: applies the compacted key topic to the stages' shared
``KeyDirectory`` while they run, and dead-letters and audits whatever it refuses.

The worker catches up with the topic before its stages start (``catch_up``, blocking, in
``build_pipeline``); this service then follows from where the catch-up ended, in the worker's
event loop — the same thread as the stages, so a change lands between two of their records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from fleetbus.bus.directory import HEAD_KAFKA_KEY, KeyDirectory
from fleetbus.bus.keys import Signer
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.observability.metrics import DLQ_RECORDS
from fleetbus.processors.audit import AuditChain, AuditEvent
from fleetbus.processors.engine import DeadLetter
from fleetbus.sdk.keytopic import KeyTopicFollower, KeyTopicItem, KeyTopicReader, KeyTopicRefusal

_log = logging.getLogger(__name__)

#: The ``stage`` name of the follower in DLQ records, metrics and audit chains.
STAGE = "keys"


class KeyTopicService:
    """Follows the key topic in a running worker (``run`` / ``stop``, like a stage runner).

    A refused item goes to the DLQ (stage ``keys``, its reason code, its original bytes) and
    into the audit trail: this run's own chain ``keys-<run id>``, signed by the audit signer
    right after each refusal (refusals are rare; nothing is left unsigned). ``on_head`` runs in
    a thread after a new head is accepted (the worker refreshes its policy's entities with it),
    never two at once: heads that arrive meanwhile make it run once more.
    """

    stage = STAGE

    def __init__(
        self,
        settings: FleetbusSettings,
        directory: KeyDirectory,
        *,
        audit_signer: Signer | None = None,
        on_head: Callable[[], None] | None = None,
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
        self.follower = KeyTopicFollower(directory, role="worker", on_refused=self._pending.append)
        self._positions: dict[int, int] = {}
        self._stopping = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        # Work that follows a new head (the policy's entities), off the event loop, coalesced.
        self.on_head = on_head
        self._head_changed = False
        self._refresh: asyncio.Task[None] | None = None

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
