"""Uplink (vehicle → bus) replay state of the track and telemetry stages, kept in the stage's
partition state: committed and rolled back with the Kafka transaction of the records that
caused it, restored from the changelog after a restart or rebalance, bounded per sender.

See docs/pipeline.md ("Uplink replay protection") for the layout and the decisions.
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Final

import cbor2

from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.processors.eos import PartitionState

__all__ = [
    "EPOCHS_PER_SENDER",
    "DeadlineIndex",
    "StateEpochStore",
    "UplinkLimits",
    "UplinkReplay",
    "add_to_count",
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


@dataclass
class _Heap:
    items: list[tuple[int, str]] = field(default_factory=list)
    handed_out: list[str] = field(default_factory=list)


class DeadlineIndex:
    """The keys of a partition state under ``prefixes``, ordered by deadline: a heap per state
    object (a worker gets a new one per assignment), built from the state on first use.

    ``add`` is O(log n); ``due`` costs O(k log n) for k due keys and never scans the state. The
    heap is only an index: callers re-check each due key against the state's current value
    (a rolled-back write leaves a heap entry without a state entry, a re-written key two heap
    entries). A deletion rolled back with its transaction puts the key back into the state but
    not into the heap, so the keys handed out by the previous ``due`` that are still in the
    state go back into the heap first.
    """

    def __init__(self, prefixes: tuple[str, ...], deadline_of: Callable[[str, bytes], int]) -> None:
        self._prefixes = prefixes
        self._deadline_of = deadline_of
        self._heaps: weakref.WeakKeyDictionary[PartitionState, _Heap] = weakref.WeakKeyDictionary()

    def _heap(self, state: PartitionState) -> _Heap:
        heap = self._heaps.get(state)
        if heap is None:
            heap = _Heap(
                [
                    (self._deadline_of(key, raw), key)
                    for key, raw in state.items()
                    if key.startswith(self._prefixes)
                ]
            )
            heapq.heapify(heap.items)
            self._heaps[state] = heap
        return heap

    def add(self, state: PartitionState, key: str, deadline_ms: int) -> None:
        heapq.heappush(self._heap(state).items, (deadline_ms, key))

    def due(self, state: PartitionState, now_ms: int) -> list[str]:
        """Keys whose indexed deadline is before ``now_ms`` and that are still in the state."""
        heap = self._heap(state)
        for key in heap.handed_out:
            raw = state.get(key)
            if raw is not None:
                heapq.heappush(heap.items, (self._deadline_of(key, raw), key))
        out: dict[str, None] = {}
        while heap.items and heap.items[0][0] < now_ms:
            _, key = heapq.heappop(heap.items)
            if state.get(key) is not None:
                out[key] = None
        heap.handed_out = list(out)
        return heap.handed_out


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
        self._index = DeadlineIndex((ID_PREFIX,), lambda _key, raw: _int(raw))

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
        self._index.add(state, key, deadline)
        return None

    def expire(self, state: PartitionState, now: float) -> int:
        """Forget the ids whose deadline has passed; returns how many."""
        now_ms = round(now * 1000)
        removed = 0
        for key in self._index.due(state, now_ms):
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
#: ``<EPOCH_COUNT_PREFIX><sender key>`` → that sender's live uplink epochs in this partition.
EPOCH_COUNT_PREFIX: Final = "up/epn/"
#: Uplink epochs one sender may hold in one partition (an establishment costs the stage a key
#: recovery and state until it ends; a vehicle needs one or two at a time).
EPOCHS_PER_SENDER: Final = 8


def epoch_until(_key: str, raw: bytes) -> int:
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
        index: DeadlineIndex | None = None,
        max_secrets: int = 65_536,
    ) -> None:
        self._state = state
        self._secrets = secrets
        self._rederive = rederive
        self._skew_ms = skew_ms
        self._index = index
        self._max_secrets = max_secrets

    @staticmethod
    def key(recipient: str, epoch_id: bytes) -> str:
        return f"{sender_key(EPOCH_PREFIX, recipient)}/{epoch_id.hex()}"

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
            highest=m["highest"],
            window=m["window"],
            record=m["record"],
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
                    "highest": epoch.highest,
                    "window": epoch.window,
                    "record": epoch.record,
                },
                canonical=True,
            ),
        )
        self._remember(epoch.est_digest, epoch.secret)
        if self._index is not None:
            self._index.add(self._state, key, until)

    def record(self, recipient: str, epoch_id: bytes, sequence: int) -> bool:
        from fleetbus.providers.sealing_v2 import window_admits, window_record

        key = self.key(recipient, epoch_id)
        raw = self._state.get(key)
        if raw is None:
            return False
        m = dict(cbor2.loads(raw))
        probe = SimpleNamespace(highest=m["highest"], window=m["window"])
        if not window_admits(probe, sequence):  # type: ignore[arg-type]
            return False
        window_record(probe, sequence)  # type: ignore[arg-type]
        m["highest"], m["window"] = probe.highest, probe.window
        self._state.put(key, cbor2.dumps(m, canonical=True))
        return True

    def erase(self, recipient: str, epoch_id: bytes) -> None:
        self._state.delete(self.key(recipient, epoch_id))

    def _remember(self, digest: bytes, secret: bytes) -> None:
        if len(self._secrets) >= self._max_secrets:
            self._secrets.pop(next(iter(self._secrets)))
        self._secrets[digest] = secret
