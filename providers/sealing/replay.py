"""Bounded memories of the opening side: seen message ids per sender, verified batch roots."""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable

from fleetbus.bus.envelope import (
    EnvelopeError,
)
from fleetbus.bus.errors import ReasonCode
from fleetbus.providers.sealing.common import Clock


class ReplayCache:
    """Message ids already opened, per sender, each kept until its message would be expired.

    In memory, for one process (a vehicle's opener). Bounded per sender: a sender whose live ids
    fill its share (``max_per_sender``) is refused with ``sender_state_full`` until some of them
    expire — fail closed for that sender only; no sender can make another's ids go (there is
    no eviction). Expiry runs off a heap ordered by deadline, so ``add`` costs O(log n) and
    never scans. The opener bounds how far ahead a deadline can lie (``max_lifetime_s``), so a
    full share always drains.
    """

    def __init__(self, max_per_sender: int = 10_000, *, clock: Clock = time.time) -> None:
        if max_per_sender < 1:
            raise EnvelopeError(
                "a replay cache needs max_per_sender >= 1", reason=ReasonCode.CONFIG
            )
        self._max = max_per_sender
        self._clock = clock
        self._ids: dict[str, dict[str, float]] = {}
        self._deadlines: list[tuple[float, str, str]] = []
        self._size = 0
        self._lock = threading.Lock()
        self.refusals = 0

    def __len__(self) -> int:
        return self._size

    def seen(self, sender: str, message_id: str) -> bool:
        with self._lock:
            until = self._ids.get(sender, {}).get(message_id)
            return until is not None and until >= self._clock()

    def add(self, sender: str, message_id: str, *, until: float) -> bool:
        """Record an opened id; False when it was already there (a concurrent replay).

        Raises ``EnvelopeError`` (``sender_state_full``) when ``sender`` has no room left.
        """
        now = self._clock()
        with self._lock:
            self._expire(now)
            ids = self._ids.get(sender)
            if ids is not None and message_id in ids:
                return False  # still live: _expire dropped every expired id
            if ids is not None and len(ids) >= self._max:
                self.refusals += 1
                raise EnvelopeError(
                    f"replay state of {sender!r} is full ({self._max} live message ids)",
                    reason=ReasonCode.SENDER_STATE_FULL,
                )
            self._ids.setdefault(sender, {})[message_id] = until
            heapq.heappush(self._deadlines, (until, sender, message_id))
            self._size += 1
            return True

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] < now:
            until, sender, message_id = heapq.heappop(self._deadlines)
            ids = self._ids.get(sender)
            if ids is None or ids.get(message_id) != until:
                continue
            del ids[message_id]
            self._size -= 1
            if not ids:
                del self._ids[sender]


class _LRU:
    """A small bounded LRU map with per-entry expiry."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._data: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, now: float) -> object | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[0] < now:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return item[1]

    def put(self, key: Hashable, value: object, until: float) -> None:
        with self._lock:
            self._data[key] = (until, value)
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)


class VerifiedRoots(_LRU):
    """Batch-signature roots whose signature has verified: (sender, sender key id, suite, root,
    tree size) -> True until the entry expires. One per opener by default; openers in one
    process that use the same key directory (a ``VehicleAgent`` serving many vehicles) may
    share one, so that a batch root is verified once per process, not once per recipient.
    Signer validity (revocation, expiry) and each envelope's inclusion proof are still checked
    on every open."""
