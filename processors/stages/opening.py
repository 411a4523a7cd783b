"""Opening what vehicles send (the uplink) for the track and telemetry stages: the opener that
picks the minimum key path by the sender's capabilities, and the v1 prelude both stages share
(open, decode, key check, replay admission)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from fleetbus.bus.envelope import EnvelopeError, decode_envelope
from fleetbus.bus.envelope_v2 import record_version
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.observability.metrics import ENVELOPE_REJECTS, on_commit
from fleetbus.processors.engine import InputRecord, PartitionState, StageResult
from fleetbus.processors.uplink import UplinkLimits, UplinkReplay

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


def admit_v1_uplink(
    record: InputRecord,
    state: PartitionState,
    now: float,
    *,
    opener: Any,  # UplinkOpener without its own replay check
    replay: UplinkReplay,
    limits: UplinkLimits,
    max_bytes: int,
    topic: str,
    what: str,
    decode: Callable[[bytes], P],
    identify: Callable[[P, Any], UplinkKey | str],
    v2: Callable[[], StageResult],
    dlq: Callable[..., StageResult],
) -> tuple[Any, P] | StageResult:
    """The prelude of an uplink record that the track and telemetry stages share: a v2 record
    goes to ``v2``; a v1 envelope is opened (``topic`` is its AAD), its payload decoded, checked
    to name its authenticated sender (``identify``: the key the record must have, or why it
    names another) and keyed as it must be, and its message id admitted to the partition's
    replay state. Returns the opened envelope and its payload, or the stage's result (DLQ)."""
    if record.value is None:
        return dlq(ReasonCode.MALFORMED, "empty record")
    try:
        version = record_version(record.value, max_size=max_bytes)
    except EnvelopeError:
        version = 1  # the opener refuses it with its own reason
    if version == 2:
        return v2()
    try:
        opened = opener.open(record.value, topic=topic)
    except EnvelopeError as exc:
        on_commit(ENVELOPE_REJECTS.labels(role="bus", reason=exc.reason.value).inc)
        return dlq(exc.reason, f"{what} envelope rejected: {exc.reason.value}")
    try:
        payload = decode(opened.payload)
    except FleetbusError as exc:
        return dlq(exc.reason, f"{what} payload: {exc}")
    keyed = identify(payload, opened)
    if isinstance(keyed, str):
        return dlq(ReasonCode.WRONG_RECIPIENT, keyed)
    if record.key != keyed.key.encode():
        return dlq(ReasonCode.MALFORMED, keyed.detail)
    sender = opened.sender
    refused = replay.admit(state, sender, opened.message_id, opened.expires_at, now)
    if refused is not None:
        ENVELOPE_REJECTS.labels(role="bus", reason=refused.value).inc()
        detail = refusal_detail(refused, sender, opened.message_id, limits)
        return dlq(refused, detail, actor=sender, command_id=keyed.command_id)
    return opened, payload
