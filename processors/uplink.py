"""Uplink (vehicle → bus) replay state of the track and telemetry stages, kept in the stage's
partition state: committed and rolled back with the Kafka transaction of the records that
caused it, restored from the changelog after a restart or rebalance, bounded per sender.

See docs/pipeline.md ("Uplink replay protection") for the layout and the decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Final

import cbor2

from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.processors.state import PartitionState

__all__ = [
    "ASK_INTERVAL_S",
    "EPOCHS_PER_SENDER",
    "StateEpochStore",
    "UplinkEpochAsker",
    "UplinkLimits",
    "UplinkReplay",
    "add_to_count",
    "expire_asked",
    "expire_epochs",
    "read_count",
    "sender_key",
]

#: ``<ID_PREFIX><sender key>/<message id>`` → deadline (ms, CBOR int): an accepted envelope.
ID_PREFIX: Final = "up/id/"
#: ``<COUNT_PREFIX><sender key>`` → live ids of that sender in this partition (CBOR int).
COUNT_PREFIX: Final = "up/n/"


def sender_key(prefix: str, sender: str) -> str:
    """``prefix`` + a length-prefixed sender id: ids may contain "/", and one sender's keys must
    never alias another's (``a/b`` + ``c`` against ``a`` + ``b/c``)."""
    return f"{prefix}{len(sender)}:{sender}"


def _int(raw: bytes | None) -> int:
    value = cbor2.loads(raw) if raw is not None else 0
    if type(value) is not int:
        raise FleetbusError("corrupt uplink state entry", reason=ReasonCode.MALFORMED)
    return value


def read_count(state: PartitionState, key: str) -> int:
    """The counter at ``key`` (0 when absent)."""
    return _int(state.get(key))


def add_to_count(state: PartitionState, key: str, delta: int) -> int:
    """Add ``delta`` to the counter at ``key`` (deleted at zero); returns the new value."""
    value = max(0, read_count(state, key) + delta)
    if value:
        state.put(key, cbor2.dumps(value))
    else:
        state.delete(key)
    return value


@dataclass(frozen=True)
class UplinkLimits:
    """Bounds of the bus's uplink state (settings ``uplink_max_lifetime_s``,
    ``uplink_ids_per_sender``, ``uplink_held_per_sender``)."""

    max_lifetime_s: float = 900.0
    ids_per_sender: int = 10_000
    held_per_sender: int = 100

    def __post_init__(self) -> None:
        if not self.max_lifetime_s > 0 or self.ids_per_sender < 1 or self.held_per_sender < 1:
            raise FleetbusError("uplink limits must be positive", reason=ReasonCode.CONFIG)


class UplinkReplay:
    """The (sender, message id) pairs a stage has accepted, each until its envelope's expiry +
    skew, in the stage's partition state, at most ``ids_per_sender`` live ids per sender and
    partition (a full sender is refused, fail closed; nobody's ids are ever evicted)."""

    def __init__(self, *, limits: UplinkLimits, skew_s: float) -> None:
        self.limits = limits
        self._skew_ms = round(skew_s * 1000)

    @staticmethod
    def id_key(sender: str, message_id: str) -> str:
        return f"{sender_key(ID_PREFIX, sender)}/{message_id}"

    def admit(
        self, state: PartitionState, sender: str, message_id: str, expires_at: float, now: float
    ) -> ReasonCode | None:
        """Record an accepted envelope: None, or why it is refused (``replayed``,
        ``sender_state_full``). Its writes are part of the caller's transaction."""
        key = self.id_key(sender, message_id)
        raw = state.get(key)
        now_ms = round(now * 1000)
        if raw is not None and _int(raw) >= now_ms:
            return ReasonCode.REPLAYED
        count_key = sender_key(COUNT_PREFIX, sender)
        if raw is None:
            # An expired id not yet swept is still counted: re-using its slot adds nothing.
            if read_count(state, count_key) >= self.limits.ids_per_sender:
                return ReasonCode.SENDER_STATE_FULL
            add_to_count(state, count_key, 1)
        deadline = round(expires_at * 1000) + self._skew_ms
        state.put(key, cbor2.dumps(deadline))
        return None

    @staticmethod
    def deadline(key: str, raw: bytes) -> float | None:
        """The deadline (s) of an id entry, for the stage's ``deadline`` (None: not an id)."""
        return _int(raw) / 1000 if key.startswith(ID_PREFIX) else None

    def expire(self, state: PartitionState, due: Iterable[str], now: float) -> int:
        """Forget the ids among ``due`` (the state's due keys) whose deadline has passed;
        returns how many."""
        now_ms = round(now * 1000)
        removed = 0
        for key in due:
            if not key.startswith(ID_PREFIX):
                continue
            raw = state.get(key)
            if raw is None or _int(raw) >= now_ms:
                continue
            state.delete(key)
            sender = _sender_of(key.removeprefix(ID_PREFIX))
            add_to_count(state, sender_key(COUNT_PREFIX, sender), -1)
            removed += 1
        return removed


def _sender_of(rest: str) -> str:
    """The sender id of ``<len>:<sender>/...``."""
    length, _, tail = rest.partition(":")
    return tail[: int(length)]


#: ``<EPOCH_PREFIX><recipient key>/<epoch id hex>`` → a wire-v2 uplink epoch (CBOR map, no
#: secret): docs/pipeline.md, "Uplink epochs (wire format v2)".
EPOCH_PREFIX: Final = "up/ep/"
#: ``<EPOCH_WINDOW_PREFIX><recipient key>/<epoch id hex>`` → ``[highest, window]``: the epoch's
#: replay window, apart from the epoch so that each message rewrites a few bytes of state (and
#: of its changelog), not the establishment record.
EPOCH_WINDOW_PREFIX: Final = "up/ew/"
#: ``<EPOCH_COUNT_PREFIX><sender key>`` → that sender's live uplink epochs in this partition.
EPOCH_COUNT_PREFIX: Final = "up/epn/"
#: Uplink epochs one sender may hold in one partition (an establishment costs the stage a key
#: recovery and state until it ends; a vehicle needs one or two at a time).
EPOCHS_PER_SENDER: Final = 8


def expire_epochs(state: PartitionState, due: Iterable[str], now: float) -> None:
    """Forget the uplink epochs among ``due`` (the state's due keys) that have ended: their
    window and record go, and their sender's epoch count drops."""
    now_ms = round(now * 1000)
    for key in due:
        if not key.startswith(EPOCH_PREFIX):
            continue
        raw = state.get(key)
        if raw is not None and stored_until(raw) < now_ms:
            _forget_epoch(state, key, raw)


def _forget_epoch(state: PartitionState, key: str, raw: bytes) -> None:
    """Delete the uplink epoch at ``key`` (its record ``raw``) and its window, and drop its
    sender's epoch count: every way an epoch leaves the state frees its sender's slot."""
    state.delete(key)
    state.delete(EPOCH_WINDOW_PREFIX + key.removeprefix(EPOCH_PREFIX))
    add_to_count(state, sender_key(EPOCH_COUNT_PREFIX, cbor2.loads(raw)["sender"]), -1)


def stored_until(raw: bytes) -> int:
    """The ``until`` (ms) of a state entry that ends: an uplink epoch, a held response, a kept
    establishment."""
    until: int = cbor2.loads(raw)["until"]
    return until


class StateEpochStore:
    """Wire-v2 uplink epochs in a stage's partition state (an ``EpochStore``).

    The state — and so its changelog topic — holds no secret: only the epoch's public fields,
    its replay window and its establishment record. The epoch secret lives in ``secrets``, the
    stage's in-memory cache, and is re-derived from the record (``rederive``: the bus sealer
    recovers the key path again) after a restart or a rebalance. The window is committed and
    rolled back with the records' transaction, like ``UplinkReplay``.
    """

    def __init__(
        self,
        state: PartitionState,
        secrets: dict[bytes, bytes],
        rederive: Callable[[bytes], bytes],
        *,
        skew_ms: int,
        max_secrets: int = 65_536,
    ) -> None:
        self._state = state
        self._secrets = secrets
        self._rederive = rederive
        self._skew_ms = skew_ms
        self._max_secrets = max_secrets

    @staticmethod
    def key(recipient: str, epoch_id: bytes) -> str:
        return f"{sender_key(EPOCH_PREFIX, recipient)}/{epoch_id.hex()}"

    @staticmethod
    def window_key(recipient: str, epoch_id: bytes) -> str:
        return f"{sender_key(EPOCH_WINDOW_PREFIX, recipient)}/{epoch_id.hex()}"

    def _window(self, recipient: str, epoch_id: bytes, epoch: Any) -> tuple[int, int]:
        """The epoch's ``(highest, window)``; ``epoch``, its map or its stored bytes, is read
        only for an epoch written by an earlier release, which kept the window inside it."""
        raw = self._state.get(self.window_key(recipient, epoch_id))
        if raw is None:
            m = cbor2.loads(epoch) if isinstance(epoch, bytes) else epoch
            return m["highest"], m["window"]
        highest, window = cbor2.loads(raw)
        return highest, window

    def get(self, recipient: str, epoch_id: bytes) -> Any:
        from fleetbus.providers.sealing_v2 import StoredEpoch

        raw = self._state.get(self.key(recipient, epoch_id))
        if raw is None:
            return None
        m = cbor2.loads(raw)
        digest = m["est_digest"]
        secret = self._secrets.get(digest)
        if secret is None:
            secret = self._rederive(m["record"])
            self._remember(digest, secret)
        highest, window = self._window(recipient, epoch_id, m)
        return StoredEpoch(
            recipient=recipient,
            epoch_id=epoch_id,
            sender=m["sender"],
            sender_key_id=m["sender_key_id"],
            signature_suite=m["suite"],
            topic=m["topic"],
            direction=m["direction"],
            key_path=m["key_path"],
            key_ids=tuple((p, k) for p, k in m["key_ids"]),
            not_after_ms=m["until"] - self._skew_ms,
            max_messages=m["max_messages"],
            est_digest=digest,
            secret=secret,
            highest=highest,
            window=window,
            record=m["record"],
        )

    def check_keyed_by_sender(self, key: bytes | None, recipient: str, epoch_id: bytes) -> None:
        """Refuse a message of a known epoch under another key than its sender's before it is
        opened: opening records its sequence in the epoch's window, which must not be spent by
        a copy that is refused anyway (the sender's own copy would then be a "replay")."""
        raw = self._state.get(self.key(recipient, epoch_id))
        if raw is not None and key != str(cbor2.loads(raw)["sender"]).encode():
            raise FleetbusError(
                "record key must be the sending vehicle", reason=ReasonCode.MALFORMED
            )

    def put(self, epoch: Any) -> None:
        key = self.key(epoch.recipient, epoch.epoch_id)
        until = epoch.not_after_ms + self._skew_ms
        self._state.put(
            key,
            cbor2.dumps(
                {
                    "sender": epoch.sender,
                    "sender_key_id": epoch.sender_key_id,
                    "suite": epoch.signature_suite,
                    "topic": epoch.topic,
                    "direction": epoch.direction,
                    "key_path": epoch.key_path,
                    "key_ids": [list(pair) for pair in epoch.key_ids],
                    "until": until,
                    "max_messages": epoch.max_messages,
                    "est_digest": epoch.est_digest,
                    "record": epoch.record,
                },
                canonical=True,
            ),
        )
        self._put_window(epoch.recipient, epoch.epoch_id, epoch.highest, epoch.window)
        self._remember(epoch.est_digest, epoch.secret)

    def _put_window(self, recipient: str, epoch_id: bytes, highest: int, window: int) -> None:
        self._state.put(self.window_key(recipient, epoch_id), cbor2.dumps([highest, window]))

    def record(self, recipient: str, epoch_id: bytes, sequence: int) -> bool:
        from fleetbus.providers.sealing_v2 import window_admits, window_record

        raw = self._state.get(self.key(recipient, epoch_id))
        if raw is None:
            return False
        # Not decoded here: the epoch's map holds its establishment record (1-5 kB), and each
        # message reads it already (``get``).
        highest, window = self._window(recipient, epoch_id, raw)
        probe = SimpleNamespace(highest=highest, window=window)
        if not window_admits(probe, sequence):  # type: ignore[arg-type]
            return False
        window_record(probe, sequence)  # type: ignore[arg-type]
        self._put_window(recipient, epoch_id, probe.highest, probe.window)
        return True

    def erase(self, recipient: str, epoch_id: bytes) -> None:
        # The opener erases an epoch that has ended when a message of it arrives before the
        # tick does: its sender's slot must go with it, or each such message would take one of
        # the sender's EPOCHS_PER_SENDER for good.
        key = self.key(recipient, epoch_id)
        raw = self._state.get(key)
        if raw is not None:
            _forget_epoch(self._state, key, raw)

    def _remember(self, digest: bytes, secret: bytes) -> None:
        if len(self._secrets) >= self._max_secrets:
            self._secrets.pop(next(iter(self._secrets)))
        self._secrets[digest] = secret


#: ``<ASKED_PREFIX><vehicle key>`` → ``{"until": ms}``: the bus asked that vehicle for a new
#: uplink epoch and asks it again only after ``until`` (``UplinkEpochAsker``).
ASKED_PREFIX: Final = "up/ask/"
#: Seconds between two ``uplink_epoch_unknown`` statuses to one vehicle from one stage.
ASK_INTERVAL_S: Final = 10.0


@dataclass(frozen=True)
class UplinkEpochAsker:
    """The bus's answer to a v2 message in an uplink epoch it does not hold: a status
    ``uplink_epoch_unknown`` signed by the bus sealer, for the vehicle's downlink partition of
    ``commands.outbound`` (docs/wire-format.md V2.7, "Uplink recovery").

    The message is unauthenticated (no epoch, no key): its record key, the only sender it
    names, may be anybody's. So the status says nothing the record did not show in clear
    (the epoch id, the sequence) besides "this bus does not hold it"; it goes only to a
    vehicle or edge unit of the directory (so one state entry per real vehicle at most), at
    most once per ``interval_s`` per vehicle however many records arrive (a forger's rate
    never becomes the bus's), and the vehicle acts on it only for an epoch it has open."""

    sealer_principal: str
    signer: Any  # the bus sealer's Signer
    topic: str  # commands.outbound
    directory: Any
    uplink_kinds: frozenset[str]
    interval_s: float = ASK_INTERVAL_S

    def ask(
        self, state: PartitionState, key: bytes | None, exc: Any, now: float
    ) -> tuple[str, bytes] | None:
        """``(vehicle id, signed status)`` to publish for ``exc`` (an ``EpochUnknownError``)
        of a record under ``key``, or None (not a vehicle, or asked within the interval). The
        interval is written to ``state``: committed with the record's transaction."""
        from fleetbus.bus.envelope_v2 import StatusCode
        from fleetbus.providers.sealing_v2 import make_status, sign_status

        try:
            vid = (key or b"").decode("utf-8")
            if self.directory.current(vid, at=now).kind not in self.uplink_kinds:
                return None
        except (UnicodeDecodeError, FleetbusError):
            return None
        slot = sender_key(ASKED_PREFIX, vid)
        raw = state.get(slot)
        now_ms = round(now * 1000)
        if raw is not None and stored_until(raw) > now_ms:
            return None
        state.put(slot, cbor2.dumps({"until": now_ms + round(self.interval_s * 1000)}))
        status = make_status(
            topic=self.topic,
            recipient=vid,
            epoch_id=exc.epoch_id,
            sequence=exc.sequence,
            at=now,
            code=StatusCode.UPLINK_EPOCH_UNKNOWN,
        )
        return vid, sign_status(self.signer, self.sealer_principal, status)


def expire_asked(state: PartitionState, due: Iterable[str], now: float) -> None:
    """Forget the ``UplinkEpochAsker`` intervals among ``due`` that have passed."""
    now_ms = round(now * 1000)
    for key in due:
        if key.startswith(ASKED_PREFIX):
            raw = state.get(key)
            if raw is not None and stored_until(raw) <= now_ms:
                state.delete(key)
