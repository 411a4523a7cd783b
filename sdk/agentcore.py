"""The state a vehicle agent's parts share: per-vehicle crypto state (made by
``AgentCore._make_vehicle``), the executions of a poll batch, counters, constants, the
trace-context helpers, and ``AgentCore``: the attributes and the cross-part methods that
``VehicleAgent``'s parts (``inbound``, ``execution``, ``uplink``) use."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from fleetbus.bus.commands import Command, ParamValue, Response
from fleetbus.bus.directory import KeyDirectory
from fleetbus.bus.errors import ConfigError
from fleetbus.bus.keys import KeyPath, SecurityProfile
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.observability.tracing import record_delivery
from fleetbus.sdk.executed import ExecutedStore
from fleetbus.sdk.handlers import Handler, VehicleHandler
from fleetbus.sdk.identity import VehicleIdentity

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
    from fleetbus.providers.sealing import EnvelopeSealer, EpochPolicy, VerifiedRoots
    from fleetbus.providers.sealing_v2 import EpochOpener, EpochSealer, SqliteEpochStore
    from fleetbus.sdk.codec import RecordCodec
    from fleetbus.sdk.transport import Transport

#: Default uplink (response, telemetry) key path to the bus sealer.
DEFAULT_UPLINK_PATHS: Final = (KeyPath(("xwing",)),)
#: KEM providers every agent can recover with; QKD is added per edge unit.
#: Lifetime of a response / telemetry envelope.
UPLINK_TTL_S: Final = 300.0
#: Wire format v2 messages of an unknown epoch kept per vehicle while the establishment is asked
#: for again (docs/wire-format.md V2.7), and the seconds between two statuses of one vehicle.
HELD_PER_VEHICLE: Final = 64
STATUS_INTERVAL_S: Final = 5.0
#: Per vehicle, the answers remembered in the agent's store for re-sending if the bus reports
#: their uplink epoch unknown (docs/wire-format.md V2.7.1): those of the last 4 uplink epochs
#: answered in, and at most 32 KiB of their command ids (910 UUIDv7 ids; past it the oldest go
#: until 24 KiB remain).
ANSWER_EPOCHS: Final = 4
ANSWER_ID_BYTES: Final = 32 * 1024
#: Directory capability of the bus sealer (and vehicles) announcing wire format v2.
WIRE2_CAPABILITY: Final = "wire2"
#: How long an executed command id is remembered after its expiry (envelopes expire first).
STORE_GRACE_S: Final = 3600.0
#: Seconds to wait before re-reading a record whose handling must be retried.
RETRY_BACKOFF_S: Final = 1.0


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
    uplink_renewed: int = 0  # uplink epochs ended on the bus's uplink_epoch_unknown
    by_status: dict[int, int] = field(default_factory=dict)


@dataclass
class ServedVehicle:
    """A vehicle this agent serves: its keys, opener and uplink sealers, queued readings."""

    identity: VehicleIdentity
    opener: EpochOpener  # v2 records, and v1 envelopes through its v1 opener
    sealer: EnvelopeSealer
    profile: SecurityProfile
    uplink_v2: EpochSealer  # telemetry batches when the bus announces wire2
    readings: list[tuple[float, dict[str, ParamValue]]] = field(default_factory=list)
    batch_bytes: int = 0
    batch_started: float = 0.0


@dataclass
class Execution:
    """A command of the current poll batch that passed every check and waits for the batch's
    claim (``command`` set), or a redelivery to answer again from the store (``command`` None)."""

    vehicle: ServedVehicle
    command_id: str
    command: Command | None
    expires_at: float
    position: tuple[Any, int] | None  # (topic partition, offset) of its record; None: no poll
    context: Any  # the OpenTelemetry context of its record's span
    response: Response | None = None


class RetryLater(Exception):
    """Answering failed for an operational reason: redeliver the record (do not commit it)."""


def _end_delivered(span: Span, metadata: Any) -> None:
    """Producer callback (kafka-python's IO thread): the answer is on the broker."""
    record_delivery(span, partition=metadata.partition, offset=metadata.offset)
    span.end()


def _end_failed(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
    span.end()


@contextlib.contextmanager
def attached(ctx: Any) -> Iterator[None]:
    """Run inside the OpenTelemetry context of a record's span (deferred work keeps its parent)."""
    from opentelemetry import context

    token = context.attach(ctx)
    try:
        yield
    finally:
        context.detach(token)


def trace_headers() -> list[tuple[str, bytes]]:
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(k, v.encode("ascii", "replace")) for k, v in sorted(carrier.items())]


class AgentCore:
    """What the parts of ``VehicleAgent`` share (set by ``VehicleAgent.__init__``), and the
    methods one part calls in another (defined there; these only name them for the type
    checker)."""

    settings: FleetbusSettings
    directory: KeyDirectory
    handlers: dict[str, Handler | VehicleHandler]
    sealer_principal: str
    stats: AgentStats
    store: ExecutedStore
    epochs: SqliteEpochStore
    transport: Transport
    codec: RecordCodec | None
    group_id: str
    sign_telemetry: bool  # wire-v2 telemetry batches go signed (SignedTelemetryBatch)
    _clock: Callable[[], float]
    _skew_s: float
    _max_size: int
    _vehicles: dict[str, ServedVehicle]
    _status_at: dict[str, float]  # when each vehicle last sent an epoch_unknown status
    _asked: dict[str, dict[bytes, float]]  # when each of its held epochs was last asked about
    _status_owed: set[str]  # vehicles whose status the interval held back
    # (vehicle id, uplink epoch id, command id) of answers sent since the store last recorded
    # them (``_record_answered``): written before the records' offsets are committed.
    _answered: list[tuple[str, bytes, str]]
    _responses: str
    _telemetry: str
    _client_id: str
    _retry_at: float  # monotonic time before which a redelivered record is not retried
    _batch: list[Execution] | None  # executions of the poll batch being read
    _position: tuple[Any, int] | None  # the record being handled
    _minimum: KeyPath  # the weakest key path accepted for commands
    _uplink_paths: list[KeyPath]
    _uplink_epochs: EpochPolicy | None
    _runner: KeyPathRunner
    _profile_sealer: ProfileSealer
    _roots: VerifiedRoots  # verified batch-signature roots, shared by the vehicles

    def _make_vehicle(self, identity: VehicleIdentity) -> ServedVehicle:
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
        return ServedVehicle(identity, opener, sealer, profile, uplink_v2)

    def _send(self, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        raise NotImplementedError

    def _execute(self, vehicle: ServedVehicle, command: Command, expires_at: float) -> list[Any]:
        raise NotImplementedError

    def _pending(
        self, vehicle: ServedVehicle, command_id: str, command: Command | None, expires_at: float
    ) -> Execution:
        raise NotImplementedError

    def _republish(self, vehicle: ServedVehicle, command_id: str) -> list[Any]:
        raise NotImplementedError

    def _publish_response(self, vehicle: ServedVehicle, response: Response) -> list[Any]:
        raise NotImplementedError

    def _record_answered(self) -> None:
        raise NotImplementedError
