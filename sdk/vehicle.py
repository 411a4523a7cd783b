"""The vehicle / edge SDK: receive sealed commands, execute each at most once, answer signed.

``VehicleAgent`` serves one or many vehicles (a simulator runs a thousand in one process) from
``commands.outbound``; a handler per action does the work. Every answer is a ``Response`` sealed
to the bus sealer as an envelope of kind ``rsp`` on ``commands.responses``. Telemetry goes the
same way (kind ``tel``, ``telemetry.raw``). See ``docs/sdk.md``.

This module holds the agent's loop (poll, handle, commit); its parts are ``inbound`` (open and
check), ``execution`` (execute once), ``uplink`` (answers, telemetry), over a ``Transport``
(``transport``, ``kafka_transport``), with ``executed`` (the store) and ``identity`` (keys).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fleetbus.bus.directory import KeyDirectory, PrincipalKeyFile
from fleetbus.bus.envelope import DEFAULT_MAX_SIZE
from fleetbus.bus.errors import ConfigError, FleetbusError, KafkaUnavailableError
from fleetbus.bus.keys import KeyPath, KeyProvider
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.observability.tracing import OP_PROCESS, consume_span, get_tracer, record_reject
from fleetbus.sdk.agentcore import (
    DEFAULT_UPLINK_PATHS,
    RETRY_BACKOFF_S,
    AgentStats,
    RetryLater,
    ServedVehicle,
)
from fleetbus.sdk.codec import RecordCodec
from fleetbus.sdk.executed import ExecutedStore
from fleetbus.sdk.execution import ExecutionPart
from fleetbus.sdk.handlers import Handler, HandlerResult, VehicleHandler
from fleetbus.sdk.identity import VehicleIdentity, load_key_directory
from fleetbus.sdk.inbound import InboundPart
from fleetbus.sdk.kafka_transport import KafkaTransport
from fleetbus.sdk.transport import Transport
from fleetbus.sdk.uplink import UplinkPart

if TYPE_CHECKING:
    from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
    from fleetbus.providers.sealing import EpochPolicy
    from fleetbus.sdk.keytopic import KeyTopicReader, KeyTopicRefusal

__all__ = [
    "AgentStats",
    "ExecutedStore",
    "Handler",
    "HandlerResult",
    "VehicleAgent",
    "VehicleHandler",
    "VehicleIdentity",
    "load_key_directory",
    "outbound_partition",
]

_log = logging.getLogger(__name__)

#: Seconds of polls that return nothing while burning the CPU before the consumer is replaced.
SPIN_RESET_S: Final = 15.0

#: Share of a poll's wall time spent as CPU by the polling thread that counts as spinning.
#: kafka-python 3 runs its network loop on its own IO thread: a tight loop of consumer calls
#: costs the calling thread only 37-47% of its wall time (the IO thread the rest), while an
#: idle healthy ``poll`` costs it under 1% (measured on the build machine, docs/sdk.md).
SPIN_CPU_SHARE: Final = 0.2


def outbound_partition(vehicle_id: str, partitions: int) -> int:
    """The partition of ``commands.outbound`` that holds ``vehicle_id``'s records: the seal stage
    keys them by vehicle id and its producer uses Kafka's default partitioner, the Java client's
    murmur2 of the key bytes (positive part) modulo the partition count; the key directory
    buckets vehicles by the same function, so this is also the vehicle's bucket."""
    from fleetbus.bus.topics import kafka_partition

    return kafka_partition(vehicle_id.encode(), partitions)


class VehicleAgent(InboundPart, ExecutionPart, UplinkPart):
    """Consumes ``commands.outbound`` for ``vehicles`` and answers on ``commands.responses``.

    Delivery is at least once (offsets are committed after the answer is on the broker) and
    execution at most once (``ExecutedStore``), so each command runs effectively once.

    - ``vehicles``: identities (or private key files) of the vehicles this process serves.
    - ``directory``: the verified key directory (issuers, the bus sealer, the vehicles).
    - ``minimum_path``: the weakest key path the vehicles accept for commands.
    - ``handlers``: action name -> handler; an action without a handler is answered 404.
    - ``store_path``: the agent's SQLite file: executed commands, v2 epochs, the v2
      messages held until their epoch is delivered again, and the uplink epoch of each v2
      answer (sent again if the bus reports that epoch unknown, also after a restart).
    - ``qkd_provider``: for QKD-connected edge units, a ``QKDProvider`` configured for the unit's
      SAE (``sae_id`` = the unit, ``master_sae_id`` = the bus sealer's SAE), so that envelopes
      sealed on a ``qkd-etsi014+...`` key path can be opened.
    - ``uplink_epochs``: key epochs for answers and telemetry (one key establishment per
      vehicle per epoch instead of one per message, see ``EpochPolicy``); None: per message.
    - ``group_id``: Kafka consumer group; by default one derived from the set of vehicle ids, so
      a restarted agent resumes from its committed offsets and other agents are unaffected.
    - ``confine_partitions``: read only the partitions of ``commands.outbound`` that this
      agent's vehicles hash to (``outbound_partition``), by explicit assignment, instead of
      subscribing with the group to every partition (default: the setting
      ``vehicle_confine_partitions``). Offsets are still committed under ``group_id``. Two
      agents must then not serve the same vehicles: nothing balances them. docs/sdk.md.
    - ``metrics_port``: serve this process's Prometheus metrics (the vehicle-side
      ``fleetbus_envelope_rejects_total{role="vehicle"}`` and the build info) on
      ``metrics_bind:metrics_port``; None: no endpoint (the host application may serve its own).
    - ``follow_key_topic``: read the compacted key topic into ``directory`` (catch up before the
      first command, then between polls), so a revocation reaches the vehicles within seconds;
      give it a directory from ``load_key_directory(..., vehicles=ids)`` to hold set 0 only.
    - ``sign_telemetry``: sign every wire-v2 telemetry batch with the vehicle's own directory
      key, inside the encrypted message, so that the bus can keep evidence a third party
      verifies (default: the setting ``telemetry_sign``, off). docs/sdk.md, "Signed telemetry".
    - ``transport``: where records come from and answers go (default: a ``KafkaTransport`` of
      the settings, which ``group_id``, ``auto_offset_reset`` and ``confine_partitions``
      configure); ``MemoryTransport`` for tests.
    - ``codec``: replaces the envelope (opening commands, sealing answers) for a plaintext
      baseline or a test (``PlaintextCodec``); None, the default: the envelope. Never in
      production: a codec skips every check the envelope makes.
    """

    def __init__(
        self,
        settings: FleetbusSettings,
        *,
        vehicles: Iterable[VehicleIdentity | PrincipalKeyFile],
        directory: KeyDirectory,
        minimum_path: KeyPath | str,
        handlers: Mapping[str, Handler | VehicleHandler],
        store_path: str | Path,
        sealer_principal: str = "bus-sealer",
        uplink_paths: Sequence[KeyPath | str] = DEFAULT_UPLINK_PATHS,
        qkd_provider: KeyProvider | None = None,
        key_providers: Mapping[str, KeyProvider] | None = None,
        uplink_epochs: EpochPolicy | None = None,
        group_id: str | None = None,
        confine_partitions: bool | None = None,
        auto_offset_reset: str = "earliest",
        max_message_bytes: int = DEFAULT_MAX_SIZE,
        clock_skew_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        metrics_port: int | None = None,
        metrics_bind: str = "127.0.0.1",
        follow_key_topic: bool = False,
        sign_telemetry: bool | None = None,
        transport: Transport | None = None,
        codec: RecordCodec | None = None,
    ) -> None:
        from fleetbus.bus.registry import load_key_providers
        from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
        from fleetbus.providers.sealing import VerifiedRoots
        from fleetbus.providers.sealing_v2 import SqliteEpochStore
        from fleetbus.sdk.keytopic import KeyTopicFollower, KeyTopicReader

        self.settings = settings
        self.directory = directory
        self.handlers = dict(handlers)
        self.sealer_principal = sealer_principal
        self.stats = AgentStats()
        self._clock = clock
        self._skew_s = clock_skew_s
        self._max_size = max_message_bytes
        self._minimum = (
            minimum_path if isinstance(minimum_path, KeyPath) else KeyPath.parse(minimum_path)
        )
        paths = [p if isinstance(p, KeyPath) else KeyPath.parse(p) for p in uplink_paths]
        if not paths:
            raise ConfigError("uplink_paths must name at least one key path")
        self._uplink_paths = paths
        self._uplink_epochs = uplink_epochs
        self.sign_telemetry = settings.telemetry_sign if sign_telemetry is None else sign_telemetry
        # The default providers and each one a key path names (its uplink paths, the
        # profiles commands are sealed under); a per-SAE provider (QKD) is ``qkd_provider``.
        named = {n for p in paths for n in p.providers} | {
            n
            for spec in settings.profiles.values()
            for p in spec.key_paths
            for n in KeyPath.parse(p).providers
        }
        providers: dict[str, KeyProvider] = (
            dict(key_providers)
            if key_providers is not None
            else load_key_providers(settings, named, own_sae=False)
        )
        if qkd_provider is not None:
            providers[qkd_provider.name] = qkd_provider
        self._runner: KeyPathRunner = KeyPathRunner(providers)
        self._profile_sealer: ProfileSealer = ProfileSealer(self._runner)
        # One cache of verified batch-signature roots for all vehicles of this process: a batch
        # that reaches several of them is verified once (each envelope's proof still is).
        self._roots = VerifiedRoots(4096)
        # Wire format v2 epochs live in the same durable file as the executed commands.
        self.epochs = SqliteEpochStore(store_path)
        self._status_at: dict[str, float] = {}
        self._answered: list[tuple[str, bytes, str]] = []
        self._asked: dict[str, dict[bytes, float]] = {}
        self._vehicles: dict[str, ServedVehicle] = {}
        for item in vehicles:
            identity = (
                VehicleIdentity.from_key_file(item) if isinstance(item, PrincipalKeyFile) else item
            )
            if identity.vehicle_id in self._vehicles:
                raise ConfigError(f"vehicle {identity.vehicle_id!r} is listed twice")
            self._vehicles[identity.vehicle_id] = self._make_vehicle(identity)
        if not self._vehicles:
            raise ConfigError("a VehicleAgent needs at least one vehicle")
        # Messages held before a restart may still wait for a status: the first poll asks.
        self._status_owed: set[str] = set(self._vehicles)
        self._keys = {vid.encode(): vid for vid in self._vehicles}
        digest = hashlib.sha256("\n".join(sorted(self._vehicles)).encode()).hexdigest()[:16]
        self.group_id = group_id or f"{settings.app_id}.vehicles.{digest}"
        self._client_id = f"fleetbus-vehicle-agent-{self.group_id}"
        self.store = ExecutedStore(store_path)
        self._outbound = settings.topics.full(settings.topics.commands_outbound)
        confine = (
            settings.vehicle_confine_partitions
            if confine_partitions is None
            else confine_partitions
        )
        self._responses = settings.topics.full(settings.topics.commands_responses)
        self._telemetry = settings.topics.full(settings.topics.telemetry_raw)
        self.codec = codec
        self.transport = (
            transport
            if transport is not None
            else KafkaTransport(
                settings,
                client_id=self._client_id,
                producer_options={"linger_ms": 5, "max_block_ms": 10_000},
                topic=self._outbound,
                group_id=self.group_id,
                consumer_options={
                    "enable_auto_commit": False,
                    # Only sealed records of committed seal transactions, never aborted ones.
                    "isolation_level": "read_committed",
                    "auto_offset_reset": auto_offset_reset,
                    "max_partition_fetch_bytes": max(self._max_size * 4, 1 << 20),
                    "session_timeout_ms": int(settings.broker_session_timeout_s * 1000),
                    "heartbeat_interval_ms": int(settings.broker_heartbeat_interval_s * 1000),
                },
                assign=self._own_partitions if confine else None,
            )
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0
        self._retry_at = 0.0
        self._spinning_since: float | None = None  # see _watch_spin
        self._batch = None
        self._position = None
        if metrics_port is not None:
            from fleetbus.observability.metrics import serve_metrics

            serve_metrics(metrics_port, metrics_bind)
        self._key_reader: KeyTopicReader | None = None
        if follow_key_topic:
            follower = KeyTopicFollower(directory, role="vehicle", on_refused=_key_refused)
            self._key_reader = KeyTopicReader(settings, follower)
        self._key_reader_started = False

    @property
    def vehicle_ids(self) -> list[str]:
        return sorted(self._vehicles)

    # -- the transport -------------------------------------------------------------------

    def _own_partitions(self, count: int) -> frozenset[int]:
        """The outbound partitions our vehicles hash to, of ``count`` (``confine_partitions``)."""
        return frozenset(outbound_partition(vid, count) for vid in self._vehicles)

    def _connect(self) -> None:
        from kafka.errors import KafkaError

        if self._key_reader is not None and not self._key_reader_started:
            # Before the first command: a revocation already published is in force for it.
            self._key_reader.start()
            self._key_reader_started = True
        try:
            self.transport.connect()
        except (KafkaError, OSError) as exc:
            raise KafkaUnavailableError(
                f"vehicle agent: Kafka at {self.settings.kafka_bootstrap} did not answer "
                f"({type(exc).__name__})"
            ) from exc

    def _send(self, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        from kafka.errors import KafkaError

        self._connect()
        try:
            return self.transport.send(topic, key.encode(), value, headers)
        except (KafkaError, OSError) as exc:
            raise RetryLater(f"producing to {topic}: {type(exc).__name__}") from exc

    # -- the loop -------------------------------------------------------------------------

    def poll_once(self, timeout_s: float = 1.0) -> int:
        """Fetch, handle and answer one batch of records; commit after the answers are
        acknowledged. Returns how many records were read."""
        from kafka.errors import KafkaError

        self._connect()
        if self._key_reader is not None:
            self._key_reader.poll(0)
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, timeout_s))  # back off before retrying a redelivered record
        wall, cpu = time.monotonic(), time.thread_time()
        batches = self.transport.poll(timeout_s, 500)
        if self._watch_spin(bool(batches), time.monotonic() - wall, time.thread_time() - cpu):
            return 0
        count = 0
        done: dict[Any, int] = {}
        pending: list[Any] = []
        self._batch = []
        for tp, records in batches.items():
            for record in records:
                count += 1
                self._position = (tp, record.offset)
                try:
                    pending.extend(self._handle_record(record))
                except RetryLater as exc:
                    _log.warning(
                        "will retry %s[%d]@%d: %s", tp.topic, tp.partition, record.offset, exc
                    )
                    self.stats.errors += 1
                    self.transport.seek(tp, record.offset)
                    self._retry_at = time.monotonic() + RETRY_BACKOFF_S
                    break
                except Exception:
                    # A bug must not stop the vehicles: log it, count it, move on.
                    _log.exception(
                        "unexpected error on %s[%d]@%d", tp.topic, tp.partition, record.offset
                    )
                    self.stats.errors += 1
                done[tp] = record.offset + 1
        executions, self._batch, self._position = self._batch, None, None
        pending.extend(self._run_executions(executions, done))
        pending.extend(self._ask_owed())
        try:
            for future in pending:
                future.get(timeout=30)
            # Before the offsets: an answer whose record is committed has its epoch on disk.
            self._record_answered()
        except (KafkaError, sqlite3.Error) as exc:
            # Answers not confirmed or their epochs not recorded: commit nothing; the records
            # come again after a seek and are answered again from the store.
            _log.warning(
                "answers not acknowledged or not recorded (%s); redelivering", type(exc).__name__
            )
            self.stats.errors += 1
            for tp in done:
                committed = self.transport.committed(tp)
                self.transport.seek(tp, committed if committed is not None else 0)
            return count
        if done:
            try:
                self.transport.commit(done)
            except KafkaError as exc:
                # The group went on without this consumer (evicted after a stall longer than
                # the session timeout, or rebalanced): the answers are out, the records come
                # again to whoever owns them now and are answered again from the store.
                _log.warning(
                    "vehicle agent %s: offsets not committed (%s); the records will be "
                    "redelivered and answered again from the execute-once store",
                    self.group_id,
                    type(exc).__name__,
                )
                self.stats.errors += 1
        now = self._clock()
        # Batches whose oldest reading waited long enough go now; their delivery is the
        # producer's, as for every telemetry record.
        try:
            self.flush_telemetry(older_than_s=self.settings.telemetry_batch_age_s)
        except FleetbusError as exc:
            # Sealing failed (the bus's keys, a key provider): the readings stay queued.
            _log.warning("telemetry batch not sent (%s); kept for the next poll", exc.reason.value)
            self.stats.errors += 1
        if now - self._last_prune > 60:
            self._last_prune = now
            self.store.prune(now, skew_s=self._skew_s)
            self.epochs.prune(now, self._skew_s)
        return count

    def _watch_spin(self, got_records: bool, wall_s: float, cpu_s: float) -> bool:
        """Replace a consumer stuck in its group membership; True when it was replaced.

        kafka-python 3.0.12's consumer can lose its group membership without noticing (the
        broker lists the group as Empty) and then loops inside ``poll`` at 100% CPU, returning
        nothing, forever (seen starting agents on a fresh broker in bench runs; upstream
        dpkp/kafka-python#2695 fixed a loop of this kind). An idle healthy consumer sleeps in
        ``poll``; so polls that return nothing while this thread uses ``SPIN_CPU_SHARE`` of
        their wall time as CPU, for ``SPIN_RESET_S`` in a row, mean that: close the consumer
        (nothing is committed that was not answered) and join the group again with a new one
        on the next poll."""
        if got_records or wall_s < 0.05 or cpu_s < SPIN_CPU_SHARE * wall_s:
            self._spinning_since = None
            return False
        now = time.monotonic()
        if self._spinning_since is None:
            self._spinning_since = now
            return False
        if now - self._spinning_since < SPIN_RESET_S:
            return False
        _log.warning(
            "vehicle agent %s: the Kafka consumer polled for %.0f s without records at full "
            "CPU (stuck outside its group); replacing it",
            self.group_id,
            now - self._spinning_since,
        )
        self.stats.consumer_resets += 1
        self._spinning_since = None
        self.transport.reconnect()
        return True

    def run(self, stop: threading.Event | None = None, *, poll_s: float = 0.5) -> None:
        """Serve until ``stop`` (or ``self.stop()``) is set."""
        stop_event = stop or self._stop
        while not stop_event.is_set() and not self._stop.is_set():
            self.poll_once(poll_s)

    def start(self) -> VehicleAgent:
        """Run in a background thread (``stop()`` ends it)."""
        self._connect()
        self._thread = threading.Thread(target=self.run, name="vehicle-agent", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def close(self) -> None:
        """Stop, leave the consumer group, flush answers and close the store."""
        self.stop()
        if self._key_reader is not None:
            self._key_reader.close()
        self.transport.close()
        try:
            self._record_answered()  # answers sent outside ``poll_once`` (tests, embedders)
        except sqlite3.Error as exc:
            _log.warning("uplink epochs of %d answers not recorded (%s)", len(self._answered), exc)
        self.store.close()
        self.epochs.close()

    def __enter__(self) -> VehicleAgent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one record -----------------------------------------------------------------------

    def _handle_record(self, record: Any) -> list[Any]:
        """Handle one outbound record; return the futures of what it produced."""
        vehicle_id = self._keys.get(record.key) if isinstance(record.key, bytes) else None
        if vehicle_id is None:
            # Another process's vehicle (vehicles share partitions): never opened here.
            self.stats.ignored += 1
            return []
        # A CONSUMER span, child of the seal stage's context in the record's headers.
        with consume_span(
            get_tracer(),
            record.topic,
            record.headers,
            operation=OP_PROCESS,
            key=vehicle_id,
            partition=record.partition,
            offset=record.offset,
            consumer_group=self.group_id,
            bootstrap=self.settings.kafka_bootstrap,
            client_id=self._client_id,
        ):
            return self._handle(self._vehicles[vehicle_id], record.value, record.topic)


def _key_refused(refusal: KeyTopicRefusal) -> None:
    """A vehicle has no DLQ: a refused key-topic item is a reject event on the trace (and the
    follower's metric and log line), as for an envelope it refuses."""
    record_reject(None, stage="vehicle-keys", reason=refusal.reason.value, detail=refusal.detail)
