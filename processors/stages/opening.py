"""Opening what vehicles send (the uplink) for the response and telemetry stages: the opener
that picks the minimum key path by the sender's capabilities, the v1 prelude both stages share
(open, decode, key check, replay admission) and the acceptance of a vehicle's v2 uplink epoch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

from fleetbus.bus.envelope import EnvelopeError, decode_envelope
from fleetbus.bus.envelope_v2 import ParsedEstablishment, record_version
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.observability.metrics import ENVELOPE_REJECTS, on_commit
from fleetbus.processors.audit import AuditEvent
from fleetbus.processors.engine import (
    InputRecord,
    Output,
    PartitionState,
    StageResult,
    dead_letter_result,
)
from fleetbus.processors.stages.common import PipelineTopics
from fleetbus.processors.uplink import (
    EPOCH_COUNT_PREFIX,
    EPOCHS_PER_SENDER,
    StateEpochStore,
    UplinkEpochAsker,
    UplinkLimits,
    UplinkReplay,
    add_to_count,
    read_count,
    sender_key,
)
from fleetbus.providers.sealing_v2 import EpochUnknownError

P = TypeVar("P")


class UplinkOpener:
    """Opens vehicle-to-bus envelopes with the minimum key path the sender's capabilities
    allow: ``pqc_minimum`` for vehicles with the pqc capability, ``legacy_minimum`` otherwise.
    (Key-path minimums are by containment, so one minimum cannot cover xwing and x25519.)

    The openers must not check replays themselves (``check_replay=False``): the stage that
    reads the topic owns that check, in its transactional partition state (``UplinkReplay``).
    """

    def __init__(
        self, directory: Any, pqc_opener: Any, legacy_opener: Any, clock: Any = None
    ) -> None:
        import time

        self.directory = directory
        self.pqc = pqc_opener
        self.legacy = legacy_opener
        self._clock = clock or time.time

    @property
    def checks_replay(self) -> bool:
        return any(getattr(o, "checks_replay", False) for o in (self.pqc, self.legacy))

    def open(self, data: bytes, *, topic: str) -> Any:
        try:
            sender = decode_envelope(data).header.sender
            record = self.directory.current(sender, at=self._clock())
            capable = "pqc" in record.capabilities
        except EnvelopeError:
            raise
        except Exception:
            capable = True  # unknown sender: the stricter opener rejects it with its reason
        opened = (self.pqc if capable else self.legacy).open(data, topic=topic)
        # The sender is authenticated now; its key being in the directory is not enough: only
        # the fleet's side (vehicles, edge units) speaks on the uplink. A dispatcher's or the
        # sealer's key must not produce telemetry or outcomes, even under its own id.
        kind = self.directory.current(opened.sender, at=self._clock()).kind
        if kind not in UPLINK_KINDS:
            raise EnvelopeError(
                f"uplink sender {opened.sender!r} is a {kind}, not a vehicle or edge unit",
                reason=ReasonCode.POLICY_DENIED,
            )
        return opened


UPLINK_KINDS: Final = frozenset({"vehicle", "edge"})


def check_stage_owns_replay(stage: str, opener: Any) -> None:
    if getattr(opener, "checks_replay", False):
        # An in-memory replay set is not rolled back with an aborted transaction: the batch,
        # read again, would be refused as replayed and its responses lost (issue 14, item 2).
        raise ConfigError(
            f"{stage} stage: its opener keeps its own replay set; build the openers with "
            "check_replay=False (the stage keeps the replay state in its partition state)"
        )


def refusal_detail(reason: ReasonCode, sender: str, message_id: str, limits: UplinkLimits) -> str:
    if reason is ReasonCode.REPLAYED:
        return f"message id {message_id} from {sender} was already accepted"
    return (
        f"{sender} has {limits.ids_per_sender} live message ids in this partition's replay "
        "state; refused until some expire"
    )


@dataclass(frozen=True)
class UplinkKey:
    """How a v1 uplink record must be keyed (its replay state, and for a response its
    command's state, live on that key's partition) and what a replay refusal of it names."""

    key: str
    detail: str  # the DLQ detail of a record under another key
    command_id: str | None = None


@dataclass(frozen=True)
class V1Uplink(Generic[P]):
    """What sets one stage's v1 uplink records apart: the topic it reads (the envelopes' AAD),
    what they carry (for DLQ details), how their payload decodes, and ``identify``: the key
    a record must have given its payload and opened envelope, or why it names someone else."""

    topic: Callable[[PipelineTopics], str]
    what: str
    decode: Callable[..., P]  # (payload, max_size=...)
    identify: Callable[[P, Any], UplinkKey | str]


class UplinkStage(Protocol):
    """What ``admit_v1_uplink`` reads of the stage it runs for."""

    name: str
    topics: PipelineTopics
    opener: Any  # UplinkOpener without its own replay check
    replay: UplinkReplay
    limits: UplinkLimits
    max_bytes: int


def admit_v1_uplink(
    stage: UplinkStage,
    record: InputRecord,
    state: PartitionState,
    now: float,
    kind: V1Uplink[P],
    v2: Callable[[InputRecord, PartitionState, float], StageResult],
) -> tuple[Any, P] | StageResult:
    """The prelude of an uplink record that the response and telemetry stages share: a v2 record
    goes to ``v2``; a v1 envelope is opened, its payload decoded, checked to name its
    authenticated sender and to be keyed as it must be (``kind.identify``), and its message id
    admitted to the partition's replay state. Returns the opened envelope and its payload, or
    the stage's result (a DLQ record)."""

    def dlq(reason: ReasonCode, detail: str, **kw: Any) -> StageResult:
        return dead_letter_result(
            stage.name, stage.topics.dlq, record, reason, detail, now=now, **kw
        )

    if record.value is None:
        return dlq(ReasonCode.MALFORMED, "empty record")
    try:
        version = record_version(record.value, max_size=stage.max_bytes)
    except EnvelopeError:
        version = 1  # the opener refuses it with its own reason
    if version == 2:
        return v2(record, state, now)
    what = kind.what
    try:
        opened = stage.opener.open(record.value, topic=kind.topic(stage.topics))
    except EnvelopeError as exc:
        on_commit(ENVELOPE_REJECTS.labels(role="bus", reason=exc.reason.value).inc)
        return dlq(exc.reason, f"{what} envelope rejected: {exc.reason.value}")
    try:
        payload = kind.decode(opened.payload, max_size=stage.max_bytes)
    except FleetbusError as exc:
        return dlq(exc.reason, f"{what} payload: {exc}")
    keyed = kind.identify(payload, opened)
    if isinstance(keyed, str):
        return dlq(ReasonCode.WRONG_RECIPIENT, keyed)
    if record.key != keyed.key.encode():
        return dlq(ReasonCode.MALFORMED, keyed.detail)
    sender = opened.sender
    refused = stage.replay.admit(state, sender, opened.message_id, opened.expires_at, now)
    if refused is not None:
        on_commit(ENVELOPE_REJECTS.labels(role="bus", reason=refused.value).inc)
        detail = refusal_detail(refused, sender, opened.message_id, stage.limits)
        return dlq(refused, detail, actor=sender, command_id=keyed.command_id)
    return opened, payload


class EpochStage(Protocol):
    """What ``accept_uplink_epoch`` reads of the stage it runs for."""

    name: str
    topics: PipelineTopics
    opener: Any  # UplinkOpener: its directory
    v2_openers: tuple[Any, Any] | None  # EpochOpener (pqc minimum, legacy minimum)


def accept_uplink_epoch(
    stage: EpochStage,
    record: InputRecord,
    state: PartitionState,
    now: float,
    parsed: ParsedEstablishment,
    store: StateEpochStore,
) -> StageResult:
    """A vehicle's v2 uplink establishment: verified with the minimum key path of its
    sender's capabilities and kept in this partition's state (at most ``EPOCHS_PER_SENDER``
    per sender). Raises ``FleetbusError`` with the reason of a refusal."""
    assert stage.v2_openers is not None
    sender = parsed.establishment.sender
    if record.key != sender.encode():
        raise EnvelopeError("record key must be the sending vehicle", reason=ReasonCode.MALFORMED)
    entry = stage.opener.directory.current(sender, at=now)
    if entry.kind not in UPLINK_KINDS:
        raise EnvelopeError(
            f"uplink sender {sender!r} is a {entry.kind}, not a vehicle or edge unit",
            reason=ReasonCode.POLICY_DENIED,
        )
    pqc, legacy = stage.v2_openers
    opener = pqc if "pqc" in entry.capabilities else legacy
    count_key = sender_key(EPOCH_COUNT_PREFIX, sender)
    if read_count(state, count_key) >= EPOCHS_PER_SENDER:
        on_commit(ENVELOPE_REJECTS.labels(role="bus", reason="sender_state_full").inc)
        return dead_letter_result(
            stage.name, stage.topics.dlq, record, ReasonCode.SENDER_STATE_FULL,
            f"{sender} holds {EPOCHS_PER_SENDER} uplink epochs in this partition; "
            "refused until one ends", now=now, actor=sender,
        )  # fmt: skip
    topic = record.topic
    accepted = opener.open(record.value or b"", topic=topic, store=store)
    if accepted.new:
        add_to_count(state, count_key, 1)
    return StageResult()


def uplink_asker(
    topics: PipelineTopics, opener: Any, sealer: str | None, signer: Any
) -> UplinkEpochAsker | None:
    """The stage's ``UplinkEpochAsker`` (None without the bus sealer's signer: no status)."""
    if sealer is None or signer is None:
        return None
    return UplinkEpochAsker(sealer, signer, topics.outbound, opener.directory, UPLINK_KINDS)


def ask_for_uplink_epoch(
    asker: UplinkEpochAsker | None,
    result: StageResult,
    record: InputRecord,
    state: PartitionState,
    exc: FleetbusError,
    now: float,
) -> StageResult:
    """``result`` (the record's DLQ result) plus, for a message of an uplink epoch this stage
    does not hold, the bus's ``uplink_epoch_unknown`` status to the vehicle (V2.7)."""
    if asker is None or not isinstance(exc, EpochUnknownError):
        return result
    asked = asker.ask(state, record.key, exc, now)
    if asked is not None:
        vid, status = asked
        result.outputs.append(Output(asker.topic, vid.encode(), status))
        detail: dict[str, str | int] = {
            "vehicle": vid,
            "epoch": exc.epoch_id.hex(),
            "sequence": exc.sequence,
        }
        result.audit.append(AuditEvent("bus", "uplink_epoch_asked", None, None, detail))
    return result
