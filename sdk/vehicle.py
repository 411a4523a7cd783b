"""The vehicle / edge SDK: receive sealed commands, execute each at most once, answer signed.

``VehicleAgent`` serves one or many vehicles (a simulator runs a thousand in one process) from
``commands.outbound``; a handler per action does the work. Every answer is a ``Response`` sealed
to the bus sealer as an envelope of kind ``rsp`` on ``commands.responses``. Telemetry goes the
same way (kind ``tel``, ``telemetry.raw``). See ``docs/sdk.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fleetbus.bus.commands import (
    Command,
    ParamValue,
    Response,
    SignedCommand,
    Telemetry,
    TelemetryBatch,
    new_command_id,
)
from fleetbus.bus.directory import (
    WHOLE_DIRECTORY,
    KeyDirectory,
    PrincipalKeyFile,
    RootPublicKey,
    head_store_for,
    load_directory,
    load_key_file,
    vehicle_agent_scope,
)
from fleetbus.bus.envelope import DEFAULT_MAX_SIZE, MessageKind, decode_envelope
from fleetbus.bus.envelope_v2 import ParsedEstablishment, decode_record, record_version
from fleetbus.bus.errors import ConfigError, FleetbusError, KafkaUnavailableError, ReasonCode
from fleetbus.bus.keys import KeyPath, KeyProvider, PrivateKeySet, SecurityProfile, Signer
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.observability.tracing import (
    OP_PROCESS,
    consume_span,
    get_tracer,
    record_delivery,
    record_reject,
    send_span,
    stage_span,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
    from fleetbus.providers.sealing import EnvelopeSealer, EpochPolicy
    from fleetbus.providers.sealing_v2 import EpochOpener, EpochSealer, EpochUnknownError
    from fleetbus.sdk.keytopic import KeyTopicReader, KeyTopicRefusal

__all__ = [
    "ExecutedStore",
    "Handler",
    "HandlerResult",
    "VehicleAgent",
    "VehicleIdentity",
    "load_key_directory",
    "outbound_partition",
]

_log = logging.getLogger(__name__)

#: Default uplink (response, telemetry) key path to the bus sealer.
DEFAULT_UPLINK_PATHS: Final = (KeyPath(("xwing",)),)
#: Lifetime of a response / telemetry envelope.
UPLINK_TTL_S: Final = 300.0
#: Wire format v2 messages of an unknown epoch kept per vehicle while the establishment is asked
#: for again (docs/wire-format.md V2.7), and the seconds between two statuses of one vehicle.
HELD_PER_VEHICLE: Final = 64
STATUS_INTERVAL_S: Final = 5.0
#: Directory capability of the bus sealer (and vehicles) announcing wire format v2.
WIRE2_CAPABILITY: Final = "wire2"
#: How long an executed command id is remembered after its expiry (envelopes expire first).
STORE_GRACE_S: Final = 3600.0

# Opener rejects raised *after* the signature of the sealer has verified (see the check order
# in docs/wire-format.md): the envelope is authentic, so the vehicle may answer with a 4xx/5xx.
_AUTHENTICATED_REJECTS: Final = frozenset(
    {
        ReasonCode.UNKNOWN_KEY_ID,
        ReasonCode.TAMPERED,
        ReasonCode.QKD_UNAVAILABLE,
        ReasonCode.SENDER_STATE_FULL,
    }
)
_STATUS_FOR_REJECT: Final = {
    ReasonCode.SENDER_STATE_FULL: 503,
    ReasonCode.UNKNOWN_KEY_ID: 400,
    ReasonCode.TAMPERED: 400,
    ReasonCode.QKD_UNAVAILABLE: 503,
    ReasonCode.MALFORMED: 400,
    ReasonCode.OVERSIZE: 413,
    ReasonCode.UNSUPPORTED_VERSION: 400,
    ReasonCode.WRONG_RECIPIENT: 400,
    ReasonCode.EXPIRED: 408,
    ReasonCode.BAD_SIGNATURE: 403,
    ReasonCode.UNKNOWN_SIGNER: 403,
    ReasonCode.SIGNER_EXPIRED: 403,
    ReasonCode.SIGNER_REVOKED: 403,
    ReasonCode.NOT_YET_VALID: 403,
    ReasonCode.INTERNAL: 500,
}


@dataclass(frozen=True)
class HandlerResult:
    """What a handler reports: an HTTP-like status (2xx done, 4xx refused, 5xx failed)."""

    status: int = 200
    detail: str = ""


#: A command handler. Returning None means 200; raising means 500 (the message is not sent).
Handler = Callable[[Command], HandlerResult | None]


@dataclass(frozen=True)
class VehicleIdentity:
    """One vehicle's (or edge unit's) own keys: KEM private keys to open, a signer to answer."""

    vehicle_id: str
    keys: PrivateKeySet
    signer: Signer

    @classmethod
    def from_key_file(cls, key_file: PrincipalKeyFile) -> VehicleIdentity:
        return cls(key_file.principal_id, key_file.key_set(), key_file.signer())

    @classmethod
    def load(cls, keys_dir: str | Path, vehicle_id: str) -> VehicleIdentity:
        """Load ``<keys_dir>/<vehicle_id>.key`` (a ``fleetbus keys`` private key file)."""
        key_file = load_key_file(Path(keys_dir).expanduser() / f"{vehicle_id}.key")
        if key_file.principal_id != vehicle_id:
            raise ConfigError(f"{vehicle_id}.key holds the keys of {key_file.principal_id!r}")
        return cls.from_key_file(key_file)


def load_key_directory(
    keys_dir: str | Path,
    *,
    state_dir: str | Path | None = None,
    vehicles: Iterable[str] | None = None,
) -> KeyDirectory:
    """The verified key directory of a ``fleetbus keys`` folder (root.pub, directory.cbor).

    The highest directory head accepted is kept in ``state_dir`` (default: the keys folder), so
    a restart with an older directory file is refused. With ``vehicles`` (the ids an agent
    serves) only what an agent needs is held: the common set (root, sealers, dispatchers,
    approvers, edge units) and those vehicles' own records, never the rest of the fleet.
    """
    folder = Path(keys_dir).expanduser()
    try:
        root = RootPublicKey.from_bytes((folder / "root.pub").read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{folder / 'root.pub'} not found; run `fleetbus keys init`") from None
    state = Path(state_dir).expanduser() if state_dir else folder
    scope = WHOLE_DIRECTORY if vehicles is None else vehicle_agent_scope(vehicles)
    return load_directory(
        folder / "directory.cbor", root, head_store=head_store_for(state, root), scope=scope
    )


# --- durable record of executed commands ---------------------------------------------------


class ExecutedStore:
    """Which commands each vehicle has started and finished, and the response it gave.

    SQLite with ``synchronous=FULL``: a commit is on disk (fsync) before it returns, so
    ``begin`` before running a handler makes execution at most once across crashes, and
    ``finish`` before producing the answer lets a redelivery be answered with the same response.
    ``begin_many`` / ``finish_many`` do the same for many commands in one transaction (one
    fsync): ``VehicleAgent`` claims a whole poll batch at once and records its results at once.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS executed ("
            " vehicle_id TEXT NOT NULL, command_id TEXT NOT NULL,"
            " state TEXT NOT NULL CHECK (state IN ('started', 'finished')),"
            " response BLOB, keep_until REAL NOT NULL,"
            " PRIMARY KEY (vehicle_id, command_id))"
        )

    def lookup(self, vehicle_id: str, command_id: str) -> tuple[str, bytes | None] | None:
        """``(state, response bytes)`` of a command, or None if this vehicle never started it."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, response FROM executed WHERE vehicle_id = ? AND command_id = ?",
                (vehicle_id, command_id),
            ).fetchone()
        return None if row is None else (str(row[0]), row[1])

    def begin(self, vehicle_id: str, command_id: str, *, keep_until: float) -> bool:
        """Record that execution starts; False if the command was already started."""
        return bool(self.begin_many([(vehicle_id, command_id, keep_until)]))

    def begin_many(self, claims: Sequence[tuple[str, str, float]]) -> set[tuple[str, str]]:
        """Record that execution of each ``(vehicle_id, command_id, keep_until)`` starts, all in
        one transaction (durable when this returns); the ``(vehicle_id, command_id)`` pairs that
        were not started before. Nothing is recorded if it raises."""
        started: set[tuple[str, str]] = set()
        if not claims:
            return started
        with self._lock, self._transaction():
            for vehicle_id, command_id, keep_until in claims:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO executed VALUES (?, ?, 'started', NULL, ?)",
                    (vehicle_id, command_id, keep_until),
                )
                if cursor.rowcount == 1:
                    started.add((vehicle_id, command_id))
        return started

    def finish(self, vehicle_id: str, command_id: str, response: bytes) -> None:
        self.finish_many([(vehicle_id, command_id, response)])

    def finish_many(self, results: Sequence[tuple[str, str, bytes]]) -> None:
        """Record ``(vehicle_id, command_id, response)`` of finished commands in one transaction
        (durable when this returns)."""
        if not results:
            return
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE executed SET state = 'finished', response = ?"
                " WHERE vehicle_id = ? AND command_id = ?",
                [(response, vid, cid) for vid, cid, response in results],
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def prune(self, now: float) -> int:
        """Forget commands whose envelopes can no longer be opened (expired + grace)."""
        with self._lock:
            return self._db.execute("DELETE FROM executed WHERE keep_until < ?", (now,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --- the agent -----------------------------------------------------------------------------


def _end_delivered(span: Span, metadata: Any) -> None:
    """Producer callback (kafka-python's IO thread): the answer is on the broker."""
    record_delivery(span, partition=metadata.partition, offset=metadata.offset)
    span.end()


def _end_failed(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
    span.end()


@dataclass
class AgentStats:
    """Counters for the simulator's summary line and for tests."""

    executed: int = 0
    answered: int = 0
    duplicates: int = 0
    ignored: int = 0
    rejected: int = 0
    telemetry: int = 0
    errors: int = 0
    consumer_resets: int = 0
    epochs: int = 0  # v2 establishments accepted
    epoch_statuses: int = 0  # epoch_unknown statuses sent
    by_status: dict[int, int] = field(default_factory=dict)


@dataclass
class _Vehicle:
    identity: VehicleIdentity
    opener: EpochOpener  # v2 records, and v1 envelopes through its v1 opener
    sealer: EnvelopeSealer
    profile: SecurityProfile
    uplink_v2: EpochSealer  # telemetry batches when the bus announces wire2
    readings: list[tuple[float, dict[str, ParamValue]]] = field(default_factory=list)
    batch_bytes: int = 0
    batch_started: float = 0.0


@dataclass
class _Execution:
    """A command of the current poll batch that passed every check and waits for the batch's
    claim (``command`` set), or a redelivery to answer again from the store (``command`` None)."""

    vehicle: _Vehicle
    command_id: str
    command: Command | None
    expires_at: float
    position: tuple[Any, int] | None  # (topic partition, offset) of its record; None: no poll
    context: Any  # the OpenTelemetry context of its record's span
    response: Response | None = None


#: Seconds to wait before re-reading a record whose handling must be retried.
RETRY_BACKOFF_S: Final = 1.0

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
    murmur2 of the key bytes (positive part) modulo the partition count."""
    from kafka.partitioner.default import murmur2

    return (int(murmur2(vehicle_id.encode())) & 0x7FFFFFFF) % partitions


class _RetryLater(Exception):
    """Answering failed for an operational reason: redeliver the record (do not commit it)."""


class VehicleAgent:
    """Consumes ``commands.outbound`` for ``vehicles`` and answers on ``commands.responses``.

    Delivery is at least once (offsets are committed after the answer is on the broker) and
    execution at most once (``ExecutedStore``), so each command runs effectively once.

    - ``vehicles``: identities (or private key files) of the vehicles this process serves.
    - ``directory``: the verified key directory (issuers, the bus sealer, the vehicles).
    - ``minimum_path``: the weakest key path the vehicles accept for commands.
    - ``handlers``: action name -> handler; an action without a handler is answered 404.
    - ``store_path``: the agent's SQLite file of executed commands.
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
    """

    def __init__(
        self,
        settings: FleetbusSettings,
        *,
        vehicles: Iterable[VehicleIdentity | PrincipalKeyFile],
        directory: KeyDirectory,
        minimum_path: KeyPath | str,
        handlers: Mapping[str, Handler],
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
        # (epoch id, sequence, expires-at, record, topic) of v2 messages whose epoch is unknown.
        self._held: dict[str, list[tuple[bytes, int, float, bytes, str]]] = {}
        self._status_at: dict[str, float] = {}
        self._vehicles: dict[str, _Vehicle] = {}
        for item in vehicles:
            identity = (
                VehicleIdentity.from_key_file(item) if isinstance(item, PrincipalKeyFile) else item
            )
            if identity.vehicle_id in self._vehicles:
                raise ConfigError(f"vehicle {identity.vehicle_id!r} is listed twice")
            self._vehicles[identity.vehicle_id] = self._make_vehicle(identity)
        if not self._vehicles:
            raise ConfigError("a VehicleAgent needs at least one vehicle")
        self._keys = {vid.encode(): vid for vid in self._vehicles}
        digest = hashlib.sha256("\n".join(sorted(self._vehicles)).encode()).hexdigest()[:16]
        self.group_id = group_id or f"{settings.app_id}.vehicles.{digest}"
        self._client_id = f"fleetbus-vehicle-agent-{self.group_id}"
        self._auto_offset_reset = auto_offset_reset
        self.store = ExecutedStore(store_path)
        self._outbound = settings.topics.full(settings.topics.commands_outbound)
        self._confine = (
            settings.vehicle_confine_partitions
            if confine_partitions is None
            else confine_partitions
        )
        self._confined_to: tuple[int, frozenset[int]] | None = None  # (topic partitions, ours)
        self._responses = settings.topics.full(settings.topics.commands_responses)
        self._telemetry = settings.topics.full(settings.topics.telemetry_raw)
        self._consumer: Any = None
        self._producer: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0
        self._retry_at = 0.0  # monotonic time before which a redelivered record is not retried
        self._spinning_since: float | None = None  # see _watch_spin
        self._batch: list[_Execution] | None = None  # executions of the poll batch being read
        self._position: tuple[Any, int] | None = None  # the record being handled
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

    def _make_vehicle(self, identity: VehicleIdentity) -> _Vehicle:
        from fleetbus.bus.envelope_v2 import Direction
        from fleetbus.providers.sealing import EnvelopeOpener, EnvelopeSealer, ReplayCache
        from fleetbus.providers.sealing_v2 import EpochOpener, EpochSealer

        if identity.keys.principal_id != identity.vehicle_id:
            raise ConfigError(f"keys of {identity.keys.principal_id!r} given for a different id")
        v1_opener = EnvelopeOpener(
            identity.keys,
            self.directory,
            self._runner,
            self._minimum,
            max_size=self._max_size,
            clock=self._clock,
            skew_s=self._skew_s,
            # Per vehicle: a group command reaches every member under the same message id.
            # Per sender inside, no eviction (a full sender is refused); lifetimes bounded by
            # the longest command lifetime the bus accepts, so entries always drain.
            replay_cache=ReplayCache(max_per_sender=10_000, clock=self._clock),
            max_lifetime_s=self.settings.replay_ttl_s,
            root_cache=self._roots,
        )
        opener = EpochOpener(
            identity.keys,
            self.directory,
            self._runner,
            self._minimum,
            store=self.epochs,
            v1=v1_opener,
            max_size=self._max_size,
            clock=self._clock,
            skew_s=self._skew_s,
            max_lifetime_s=self.settings.replay_ttl_s,
            root_cache=self._roots,
        )
        sealer = EnvelopeSealer(
            identity.vehicle_id,
            identity.signer,
            self._profile_sealer,
            epochs=self._uplink_epochs,
            clock=self._clock,
        )
        profile = SecurityProfile(
            name="vehicle-uplink",
            key_paths=tuple(self._uplink_paths),
            signature_suite=identity.signer.suite,
            allow_fallback=True,
            minimum_path=self._uplink_paths[-1],
        )
        uplink_v2 = EpochSealer(
            identity.vehicle_id,
            identity.signer,
            self._profile_sealer,
            direction=Direction.UPLINK,
            epochs=self._uplink_epochs,
            clock=self._clock,
        )
        return _Vehicle(identity, opener, sealer, profile, uplink_v2)

    # -- Kafka ----------------------------------------------------------------------------

    def _connect(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer
        from kafka.errors import KafkaError

        bootstrap = self.settings.kafka_bootstrap
        if self._key_reader is not None and not self._key_reader_started:
            # Before the first command: a revocation already published is in force for it.
            self._key_reader.start()
            self._key_reader_started = True
        try:
            if self._producer is None:
                self._producer = KafkaProducer(
                    bootstrap_servers=bootstrap,
                    client_id=self._client_id,
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=5,
                    max_block_ms=10_000,
                    **self.settings.kafka_client_config(),
                )
            if self._consumer is None:
                self._consumer = KafkaConsumer(
                    *(() if self._confine else (self._outbound,)),
                    bootstrap_servers=bootstrap,
                    group_id=self.group_id,
                    enable_auto_commit=False,
                    # Only sealed records of committed seal transactions, never aborted ones.
                    isolation_level="read_committed",
                    auto_offset_reset=self._auto_offset_reset,
                    max_partition_fetch_bytes=max(self._max_size * 4, 1 << 20),
                    session_timeout_ms=int(self.settings.broker_session_timeout_s * 1000),
                    heartbeat_interval_ms=int(self.settings.broker_heartbeat_interval_s * 1000),
                    **self.settings.kafka_client_config(),
                )
                self._confined_to = None
            if self._confine:
                self._assign_own_partitions()
        except (KafkaError, OSError) as exc:
            raise KafkaUnavailableError(
                f"vehicle agent: Kafka at {bootstrap} did not answer ({type(exc).__name__})"
            ) from exc

    def _assign_own_partitions(self) -> None:
        """Assign the outbound partitions our vehicles hash to; again whenever the topic's
        partition count changes (after a repartition the vehicles hash elsewhere, and keeping
        the old assignment would silently miss their commands)."""
        from kafka import TopicPartition

        count = len(self._consumer.partitions_for_topic(self._outbound))
        if count == 0 and self._confined_to is None:
            raise ConfigError(
                f"vehicle agent: topic {self._outbound} does not exist or is not readable"
            )
        if self._confined_to is not None and self._confined_to[0] in (count, 0):
            return  # unchanged, or metadata briefly without the topic: keep what we read
        ours = frozenset(outbound_partition(vid, count) for vid in self._vehicles)
        self._consumer.assign([TopicPartition(self._outbound, p) for p in sorted(ours)])
        self._confined_to = (count, ours)
        _log.info(
            "vehicle agent %s: reading %d of %d partitions of %s (confined to its vehicles)",
            self.group_id,
            len(ours),
            count,
            self._outbound,
        )

    def _send(self, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        from kafka.errors import KafkaError

        self._connect()
        try:
            return self._producer.send(topic, key=key.encode(), value=value, headers=headers)
        except (KafkaError, OSError) as exc:
            raise _RetryLater(f"producing to {topic}: {type(exc).__name__}") from exc

    # -- the loop -------------------------------------------------------------------------

    def poll_once(self, timeout_s: float = 1.0) -> int:
        """Fetch, handle and answer one batch of records; commit after the answers are
        acknowledged. Returns how many records were read."""
        from kafka import TopicPartition
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        self._connect()
        if self._key_reader is not None:
            self._key_reader.poll(0)
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, timeout_s))  # back off before retrying a redelivered record
        wall, cpu = time.monotonic(), time.thread_time()
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=500)
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
                except _RetryLater as exc:
                    _log.warning(
                        "will retry %s[%d]@%d: %s", tp.topic, tp.partition, record.offset, exc
                    )
                    self.stats.errors += 1
                    self._consumer.seek(tp, record.offset)
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
        try:
            for future in pending:
                future.get(timeout=30)
        except KafkaError as exc:
            # Answers not confirmed: commit nothing; the records come again after a seek.
            _log.warning("responses not acknowledged (%s); redelivering", type(exc).__name__)
            self.stats.errors += 1
            for tp in done:
                committed = self._consumer.committed(tp)
                self._consumer.seek(tp, committed if committed is not None else 0)
            return count
        if done:
            try:
                self._consumer.commit(
                    {
                        TopicPartition(tp.topic, tp.partition): OffsetAndMetadata(offset, "", -1)
                        for tp, offset in done.items()
                    }
                )
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
            self.store.prune(now)
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
        consumer, self._consumer = self._consumer, None
        try:
            consumer.close(autocommit=False, timeout_ms=5000)
        except Exception:  # a stuck client may fail to close; the new one joins regardless
            _log.warning("closing the stuck consumer failed", exc_info=True)
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
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._producer is not None:
            self._producer.flush(timeout=10)
            self._producer.close(timeout=10)
            self._producer = None
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

    def _reject(self, reason: ReasonCode, detail: str) -> None:
        from fleetbus.observability.metrics import ENVELOPE_REJECTS

        self.stats.rejected += 1
        ENVELOPE_REJECTS.labels(role="vehicle", reason=reason.value).inc()
        record_reject(None, stage="vehicle", reason=reason.value, detail=detail)
        _log.warning("vehicle rejected an envelope: %s (%s)", reason.value, detail)

    def _handle(self, vehicle: _Vehicle, value: object, topic: str) -> list[Any]:
        from fleetbus.providers.sealing_v2 import AcceptedEpoch

        vid = vehicle.identity.vehicle_id
        if type(value) is not bytes:
            self._reject(ReasonCode.MALFORMED, "record without a value")
            return []
        try:
            opened = vehicle.opener.open(value, topic=topic)
        except FleetbusError as exc:
            return self._rejected_envelope(vehicle, value, exc, topic)
        if isinstance(opened, AcceptedEpoch):
            if opened.sender != self.sealer_principal:
                # Verified, but only the bus sealer sends commands: its epochs are the only
                # ones that can ever carry one.
                self._forget_epoch(vehicle, opened.epoch_id)
                self._reject(ReasonCode.WRONG_RECIPIENT, "an epoch not from the bus sealer")
                return []
            if opened.new:
                self.stats.epochs += 1
            return self._release_held(vehicle, opened.epoch_id)
        if opened.sender != self.sealer_principal or opened.kind is not MessageKind.COMMAND:
            self._reject(ReasonCode.WRONG_RECIPIENT, "not a command from the bus sealer")
            return self._answer(vehicle, opened.message_id, None, 400, "not a command envelope")
        try:
            signed = SignedCommand.decode(opened.payload, max_size=self._max_size)
            command = signed.verify(self.directory, at=self._clock())
            self._check_binding(vid, opened.message_id, opened.action, command)
        except FleetbusError as exc:
            self._reject(exc.reason, str(exc))
            status = _STATUS_FOR_REJECT.get(exc.reason, 400)
            return self._answer(vehicle, opened.message_id, None, status, exc.reason.value)
        return self._execute(vehicle, command, opened.expires_at)

    def _check_binding(self, vid: str, message_id: str, action: str, command: Command) -> None:
        if command.id != message_id or command.action != action:
            raise FleetbusError(
                "inner command does not match the envelope's id or action",
                reason=ReasonCode.TAMPERED,
            )
        target = command.target
        if target.vehicle is not None:
            if target.vehicle != vid:
                raise FleetbusError(
                    f"command is for {target.vehicle!r}", reason=ReasonCode.WRONG_RECIPIENT
                )
        else:
            record = self.directory.current(vid, at=self._clock())
            if target.group not in record.groups:
                raise FleetbusError(
                    f"vehicle is not in group {target.group!r}", reason=ReasonCode.WRONG_RECIPIENT
                )
        if command.is_expired(self._clock() - self._skew_s):
            raise FleetbusError("command has expired", reason=ReasonCode.EXPIRED)

    def _forget_epoch(self, vehicle: _Vehicle, epoch_id: bytes) -> None:
        self.epochs.erase(vehicle.identity.vehicle_id, epoch_id)

    def _hold_for_epoch(
        self, vehicle: _Vehicle, value: bytes, topic: str, exc: EpochUnknownError
    ) -> list[Any]:
        """Keep a v2 message whose epoch is unknown and ask the bus for the establishment
        (docs/wire-format.md V2.7). Nothing of it is trusted yet: it is bounded in number,
        kept only until its clear expiry, and executed only once its epoch is verified."""
        from fleetbus.providers.sealing_v2 import make_status, sign_status

        vid = vehicle.identity.vehicle_id
        now = self._clock()
        held = [h for h in self._held.get(vid, []) if h[2] + self._skew_s >= now]
        if len(held) >= HELD_PER_VEHICLE:
            self._reject(ReasonCode.EPOCH_UNKNOWN, f"{vid}: held messages full; dropped")
            self._held[vid] = held
            return []
        held.append((exc.epoch_id, exc.sequence, exc.expires_at, value, topic))
        self._held[vid] = held
        self._reject(ReasonCode.EPOCH_UNKNOWN, f"{vid}: held until its epoch is delivered again")
        _log.info("%s: message of unknown epoch %s held", vid, exc.epoch_id.hex())
        if now - self._status_at.get(vid, float("-inf")) < STATUS_INTERVAL_S:
            return []
        self._status_at[vid] = now
        status = make_status(
            topic=self._responses,
            recipient=self.sealer_principal,
            epoch_id=exc.epoch_id,
            sequence=exc.sequence,
            at=now,
        )
        record = sign_status(vehicle.identity.signer, vid, status)
        self.stats.epoch_statuses += 1
        return [self._send(self._responses, vid, record, [])]

    def _release_held(self, vehicle: _Vehicle, epoch_id: bytes) -> list[Any]:
        vid = vehicle.identity.vehicle_id
        held = self._held.get(vid, [])
        ready = sorted((h for h in held if h[0] == epoch_id), key=lambda h: h[1])
        if not ready:
            return []
        self._held[vid] = [h for h in held if h[0] != epoch_id]
        self._status_at.pop(vid, None)
        out: list[Any] = []
        for _epoch, _seq, _expires, value, topic in ready:
            out.extend(self._handle(vehicle, value, topic))
        return out

    def _version_of(self, value: bytes) -> int:
        """The record's format version; 0 for a record that has none we read."""
        try:
            return record_version(value, max_size=self._max_size)
        except FleetbusError:
            return 0

    def _authenticated_id(self, value: bytes, exc: FleetbusError) -> str | None:
        """The message id of a refused record whose sender is authenticated, else None."""
        from fleetbus.providers.sealing_v2 import AuthenticatedRejectError

        if isinstance(exc, AuthenticatedRejectError):
            return exc.message_id
        if self._version_of(value) != 1:
            return None  # v2: only a message that passed the AEAD names its sender's id
        if exc.reason is not ReasonCode.REPLAYED and exc.reason not in _AUTHENTICATED_REJECTS:
            return None
        return decode_envelope(value, max_size=self._max_size).header.message_id

    def _rejected_envelope(
        self, vehicle: _Vehicle, value: bytes, exc: FleetbusError, topic: str
    ) -> list[Any]:
        from fleetbus.providers.sealing_v2 import EpochUnknownError

        vid = vehicle.identity.vehicle_id
        if isinstance(exc, EpochUnknownError):
            return self._hold_for_epoch(vehicle, value, topic, exc)
        if exc.reason is ReasonCode.QKD_UNAVAILABLE and self._version_of(value) == 2:
            parsed = decode_record(value, max_size=self._max_size)
            if (
                isinstance(parsed, ParsedEstablishment)
                and self._clock() * 1000 < parsed.establishment.not_after_ms
            ):
                raise _RetryLater("QKD key of an epoch establishment unavailable; retrying")
        if exc.reason is ReasonCode.REPLAYED:
            replayed_id = self._authenticated_id(value, exc)
            if replayed_id is None:
                self._reject(exc.reason, str(exc))
                return []
            # Authentic (the replay check follows the signature check, or the AEAD in v2) and
            # seen before: a redelivery. Answer it again if we have an answer.
            return self._answer_again(vehicle, replayed_id)
        if exc.reason is ReasonCode.QKD_UNAVAILABLE and self._version_of(value) == 1:
            # The key exists at our KME but cannot be fetched now (link or KME down): the
            # command is authentic and still valid, so wait for the KME rather than fail it.
            header = decode_envelope(value, max_size=self._max_size).header
            if self._clock() * 1000 < header.expires_at_ms:
                raise _RetryLater(f"QKD key for {header.message_id} unavailable; retrying")
        self._reject(exc.reason, str(exc))
        message_id = self._authenticated_id(value, exc)
        if message_id is None:
            # An unauthenticated sender must not be able to make vehicles talk.
            return []
        status = _STATUS_FOR_REJECT.get(exc.reason, 400)
        _log.info("answering %s for %s: %s", status, vid, exc.reason.value)
        return self._answer(vehicle, message_id, None, status, exc.reason.value)

    def _answer_again(self, vehicle: _Vehicle, command_id: str) -> list[Any]:
        self.stats.duplicates += 1
        if self._batch is not None:
            # After the batch's results are recorded: its first copy may be in this batch.
            self._batch.append(self._pending(vehicle, command_id, None, 0.0))
            return []
        return self._republish(vehicle, command_id)

    def _republish(self, vehicle: _Vehicle, command_id: str) -> list[Any]:
        found = self.store.lookup(vehicle.identity.vehicle_id, command_id)
        if found is None or found[1] is None:
            return []
        return self._publish_response(vehicle, Response.decode(found[1]))

    def _pending(
        self, vehicle: _Vehicle, command_id: str, command: Command | None, expires_at: float
    ) -> _Execution:
        from opentelemetry import context

        return _Execution(
            vehicle, command_id, command, expires_at, self._position, context.get_current()
        )

    def _execute(self, vehicle: _Vehicle, command: Command, expires_at: float) -> list[Any]:
        """Execute an authentic, checked command at most once and answer it. Inside a poll the
        command joins the batch's executions (``_run_executions``), run after the batch is read."""
        item = self._pending(vehicle, command.id, command, expires_at)
        if self._batch is not None:
            self._batch.append(item)
            return []
        return self._run_executions([item], {})

    def _run_executions(self, items: Sequence[_Execution], done: dict[Any, int]) -> list[Any]:
        """Execute the commands of one poll batch and answer them; the futures of the answers.

        At most once, with two durable writes per batch instead of two per command:

        1. claim: every new command of the batch is recorded ``started`` in one transaction,
           fsync'ed before any of their handlers runs. After a crash from here on, none of them
           runs again (a redelivery is answered 500 "interrupted"), including those whose
           handler had not started yet: the price of one fsync per batch.
        2. the handlers run, in record order.
        3. finish: every response is recorded in one transaction, fsync'ed before any answer is
           produced and so before any offset is committed: a redelivery after a crash, or a
           copy in the same batch, is answered with the same response.

        An answer that cannot be produced (``_RetryLater``) or a store that fails moves the
        partition back to that record (``done`` and a seek): it comes again and is answered
        from the store, never executed again.
        """
        if not items:
            return []
        try:
            self._claim_and_execute(items)
        except sqlite3.Error as exc:
            _log.error("executed-command store failed (%s); redelivering", type(exc).__name__)
            self.stats.errors += 1
            self._redeliver(items, done)
            if items[0].position is None:
                raise _RetryLater(f"executed-command store: {type(exc).__name__}") from exc
            return []
        futures: list[Any] = []
        failed: list[_Execution] = []
        failed_partitions: set[Any] = set()
        for item in items:
            tp, offset = item.position if item.position is not None else (None, -1)
            if tp is not None and tp in failed_partitions:
                continue  # comes again after the seek and is answered from the store then
            with _attached(item.context):
                try:
                    if item.command is None:
                        futures += self._republish(item.vehicle, item.command_id)
                    else:
                        assert item.response is not None
                        futures += self._publish_response(item.vehicle, item.response)
                except _RetryLater as exc:
                    if tp is None:
                        raise
                    _log.warning("will retry %s[%d]@%d: %s", tp.topic, tp.partition, offset, exc)
                    self.stats.errors += 1
                    failed.append(item)
                    failed_partitions.add(tp)
        self._redeliver(failed, done)
        return futures

    def _claim_and_execute(self, items: Sequence[_Execution]) -> None:
        """Steps 1-3 of ``_run_executions``: set ``response`` of every item with a command,
        or turn it into a repeat (``command`` None) when it was executed before."""
        claims: list[_Execution] = []
        finished: list[tuple[str, str, bytes]] = []
        seen: set[tuple[str, str]] = set()
        for item in items:
            command = item.command
            if command is None:
                continue
            vid = item.vehicle.identity.vehicle_id
            if (vid, command.id) in seen:
                # A second copy in the same batch: answered from the store like any redelivery.
                self.stats.duplicates += 1
                item.command = None
                continue
            seen.add((vid, command.id))
            found = self.store.lookup(vid, command.id)
            if found is None:
                claims.append(item)
                continue
            self.stats.duplicates += 1
            _state, stored = found
            if stored is not None:
                item.response = Response.decode(stored)
                continue
            # Started but never finished: the process died after the claim. Never run it twice.
            item.response = self._response(
                vid, command, 500, "execution was interrupted; not repeated"
            )
            finished.append((vid, command.id, item.response.encode()))
        started = self.store.begin_many(
            [
                (
                    item.vehicle.identity.vehicle_id,
                    item.command_id,
                    max(item.expires_at, item.command.expires_at) + self._skew_s + STORE_GRACE_S,
                )
                for item in claims
                if item.command is not None
            ]
        )
        for item in claims:
            command = item.command
            assert command is not None
            vid = item.vehicle.identity.vehicle_id
            if (vid, command.id) not in started:
                # Started meanwhile by another agent on the same store: answer what it answers.
                self.stats.duplicates += 1
                item.command = None
                continue
            with _attached(item.context):
                item.response = self._run_handler(vid, command)
            finished.append((vid, command.id, item.response.encode()))
        self.store.finish_many(finished)

    def _redeliver(self, items: Sequence[_Execution], done: dict[Any, int]) -> None:
        """Seek each partition of ``items`` back to its first record among them."""
        first: dict[Any, int] = {}
        for item in items:
            if item.position is not None:
                tp, offset = item.position
                first[tp] = min(first.get(tp, offset), offset)
        for tp, offset in first.items():
            self._consumer.seek(tp, offset)
            done[tp] = min(done.get(tp, offset), offset)
            self._retry_at = time.monotonic() + RETRY_BACKOFF_S

    def _run_handler(self, vid: str, command: Command) -> Response:
        handler = self.handlers.get(command.action)
        if handler is None:
            response = self._response(vid, command, 404, f"no handler for {command.action!r}")
        else:
            with stage_span(get_tracer(), "execute", **{"fleetbus.action": command.action}) as span:
                try:
                    result = handler(command) or HandlerResult()
                    response = self._response(vid, command, result.status, result.detail)
                except Exception as exc:
                    _log.exception("handler for %s failed on %s", command.action, vid)
                    response = self._response(
                        vid, command, 500, f"handler raised {type(exc).__name__}"
                    )
                span.set_attribute("fleetbus.response.status", response.status)
            self.stats.executed += 1
        return response

    def _response(self, vid: str, command: Command, status: int, detail: str) -> Response:
        if not 100 <= status <= 599:
            status, detail = 500, f"handler returned an invalid status {status}"
        return Response(
            command_id=command.id,
            correlation_id=command.correlation_id,
            vehicle_id=vid,
            status=status,
            detail=detail[:1024],
            executed_at=self._clock(),
        )

    def _answer(
        self,
        vehicle: _Vehicle,
        command_id: str,
        correlation_id: str | None,
        status: int,
        detail: str,
    ) -> list[Any]:
        response = Response(
            command_id=command_id,
            correlation_id=correlation_id,
            vehicle_id=vehicle.identity.vehicle_id,
            status=status,
            detail=detail,
            executed_at=self._clock(),
        )
        return self._publish_response(vehicle, response)

    def _publish_response(self, vehicle: _Vehicle, response: Response) -> list[Any]:
        self.stats.answered += 1
        self.stats.by_status[response.status] = self.stats.by_status.get(response.status, 0) + 1
        # The envelope's message id is the command id (the bus checks that they match), so the
        # bus's replay check drops a re-sent answer it already has and takes one it missed.
        envelope = self._seal(
            vehicle,
            MessageKind.RESPONSE,
            self._responses,
            response.command_id,
            "response",
            response.encode(),
        )
        headers: list[tuple[str, bytes]] = []
        # The span ends when the broker acknowledged the answer, with its partition and offset.
        with send_span(
            get_tracer(),
            self._responses,
            headers,
            key=response.command_id,
            bootstrap=self.settings.kafka_bootstrap,
            client_id=self._client_id,
            end_on_exit=False,
        ) as span:
            try:
                future = self._send(self._responses, response.command_id, envelope, headers)
            except BaseException:
                span.end()
                raise
        if hasattr(future, "add_callback"):
            future.add_callback(_end_delivered, span).add_errback(_end_failed, span)
        else:
            span.end()  # a stand-in producer without delivery reports: nothing to wait for
        return [future]

    def _seal(
        self,
        vehicle: _Vehicle,
        kind: MessageKind,
        topic: str,
        message_id: str,
        action: str,
        payload: bytes,
    ) -> bytes:
        now = self._clock()
        try:
            recipient = self.directory.recipient_keys(self.sealer_principal, at=now)
            return vehicle.sealer.seal(
                kind,
                topic,
                recipient,
                message_id,
                action,
                payload,
                now,
                now + UPLINK_TTL_S,
                vehicle.profile,
            )
        except FleetbusError as exc:
            raise _RetryLater(f"sealing to {self.sealer_principal}: {exc.reason.value}") from exc

    # -- telemetry ------------------------------------------------------------------------

    def publish_telemetry(
        self, vehicle_id: str, fields: Mapping[str, ParamValue], *, at: float | None = None
    ) -> Any:
        """Seal ``fields`` as a ``tel`` envelope to the bus sealer on ``telemetry.raw`` (key:
        vehicle id). Returns the Kafka future; raises ``FleetbusError`` on bad input."""
        vehicle = self._vehicles.get(vehicle_id)
        if vehicle is None:
            raise ConfigError(f"vehicle {vehicle_id!r} is not served by this agent")
        telemetry = Telemetry(
            vehicle_id=vehicle_id, at=self._clock() if at is None else at, fields=dict(fields)
        )
        if self._uplink_v2(self._clock()) is not None:
            # v2: this reading and any queued ones go now, as one batch.
            vehicle.readings.append((telemetry.at, dict(telemetry.fields)))
            return self._flush_readings(vehicle)
        return self._publish_v1(vehicle, telemetry)

    def _publish_v1(self, vehicle: _Vehicle, telemetry: Telemetry) -> Any:
        vehicle_id = vehicle.identity.vehicle_id
        try:
            envelope = self._seal(
                vehicle,
                MessageKind.TELEMETRY,
                self._telemetry,
                new_command_id(),
                "telemetry",
                telemetry.encode(),
            )
            future = self._send(self._telemetry, vehicle_id, envelope, _trace_headers())
        except _RetryLater as exc:
            raise KafkaUnavailableError(f"telemetry of {vehicle_id}: {exc}") from exc
        self.stats.telemetry += 1
        return future

    def add_reading(
        self, vehicle_id: str, fields: Mapping[str, ParamValue], *, at: float | None = None
    ) -> Any:
        """Queue one reading of ``vehicle_id``. With wire format v2 (the bus sealer's record
        announces ``wire2``) readings are batched — flushed as one v2 message when the batch
        reaches ``telemetry_batch_readings`` readings or ``telemetry_batch_bytes`` bytes, or its
        oldest reading ``telemetry_batch_age_s`` (``poll_once`` and ``flush_telemetry`` check
        the age) — and the future of the batch that this reading completed is returned, else
        None. Without v2 every reading is sent at once (``publish_telemetry``)."""
        vehicle = self._vehicles.get(vehicle_id)
        if vehicle is None:
            raise ConfigError(f"vehicle {vehicle_id!r} is not served by this agent")
        now = self._clock()
        when = now if at is None else at
        # Validated here, so that one bad reading is refused alone and never sinks its batch.
        reading = Telemetry(vehicle_id=vehicle_id, at=when, fields=dict(fields))
        if self._uplink_v2(now) is None:
            return self.publish_telemetry(vehicle_id, fields, at=when)
        if not vehicle.readings:
            vehicle.batch_started = now
        vehicle.readings.append((reading.at, dict(reading.fields)))
        vehicle.batch_bytes += len(reading.encode()) - len(vehicle_id)
        settings = self.settings
        if (
            len(vehicle.readings) >= settings.telemetry_batch_readings
            or vehicle.batch_bytes >= settings.telemetry_batch_bytes
        ):
            return self._flush_readings(vehicle)
        return None

    def flush_telemetry(self, *, older_than_s: float | None = None) -> list[Any]:
        """Send every queued batch (or only those whose oldest reading is older than
        ``older_than_s``); returns the futures of the batches sent."""
        now = self._clock()
        futures = []
        for vehicle in self._vehicles.values():
            if vehicle.readings and (
                older_than_s is None or now - vehicle.batch_started >= older_than_s
            ):
                futures.append(self._flush_readings(vehicle))
        return futures

    def _uplink_v2(self, now: float) -> Any:
        """The bus sealer's keys when it announces wire format v2, else None."""
        try:
            keys = self.directory.recipient_keys(self.sealer_principal, at=now)
        except FleetbusError:
            return None
        return keys if WIRE2_CAPABILITY in keys.capabilities else None

    def _flush_readings(self, vehicle: _Vehicle) -> Any:
        """Send the queued readings of ``vehicle`` as one v2 batch; on a sealing failure they
        stay queued (``KafkaUnavailableError``), so none is lost."""
        from fleetbus.providers.sealing import SealRequest

        vid = vehicle.identity.vehicle_id
        readings = vehicle.readings
        now = self._clock()
        recipient = self._uplink_v2(now)
        if recipient is None:
            # The bus stopped announcing wire2 (its record was re-issued): v1, one by one.
            vehicle.readings, vehicle.batch_bytes = [], 0
            future = None
            for at, fields in readings:
                future = self._publish_v1(vehicle, Telemetry(vid, at, fields))
            return future
        batch = TelemetryBatch(vid, tuple(readings))
        try:
            prepared = vehicle.uplink_v2.prepare(
                SealRequest(
                    MessageKind.TELEMETRY,
                    self._telemetry,
                    recipient,
                    new_command_id(),
                    "",
                    batch.encode(),
                    now,
                    now + UPLINK_TTL_S,
                    vehicle.profile,
                )
            )
            [records] = vehicle.uplink_v2.records_for([prepared])
        except FleetbusError as exc:
            raise KafkaUnavailableError(f"telemetry of {vid}: {exc.reason.value}") from exc
        vehicle.readings, vehicle.batch_bytes = [], 0
        futures = [self._send(self._telemetry, vid, value, _trace_headers()) for value in records]
        if len(records) > 1:
            # Batches go without the establishment only once the broker acknowledged it; until
            # then every batch carries it again.
            announce = partial(_announce, vehicle.uplink_v2, prepared.epoch_id)
            if futures[0] is None:
                announce(None)
            else:
                futures[0].add_callback(announce)
        self.stats.telemetry += len(readings)
        return futures[-1]

    def flush(self, timeout_s: float = 30.0) -> None:
        self.flush_telemetry()
        if self._producer is not None:
            self._producer.flush(timeout=timeout_s)


def _key_refused(refusal: KeyTopicRefusal) -> None:
    """A vehicle has no DLQ: a refused key-topic item is a reject event on the trace (and the
    follower's metric and log line), as for an envelope it refuses."""
    record_reject(None, stage="vehicle-keys", reason=refusal.reason.value, detail=refusal.detail)


def _announce(sealer: EpochSealer, epoch_id: bytes, _metadata: object) -> None:
    sealer.announced([epoch_id])


@contextlib.contextmanager
def _attached(ctx: Any) -> Iterator[None]:
    """Run inside the OpenTelemetry context of a record's span (deferred work keeps its parent)."""
    from opentelemetry import context

    token = context.attach(ctx)
    try:
        yield
    finally:
        context.detach(token)


def _trace_headers() -> list[tuple[str, bytes]]:
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(k, v.encode("ascii", "replace")) for k, v in sorted(carrier.items())]
