"""A stage's key-value state of one input partition: an overlay committed or rolled back with
the Kafka transaction that carries its changelog records, and the deadline index its timers use."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterator, Mapping

__all__ = ["DeadlineOf", "PartitionState"]

# The runner's logger: operators and the log tests filter on its name.
_log = logging.getLogger("fleetbus.processors.eos")

#: A stage's expiry rule: the time after which ``tick`` must look at an entry, from its key and
#: value alone (None: never).
DeadlineOf = Callable[[str, bytes], float | None]


class PartitionState:
    """Key-value state of one input partition, changelogged to a compacted topic.

    Writes go to an overlay that becomes visible to later reads at once and is committed or
    rolled back with the Kafka transaction that carries its changelog records.

    Timers: ``due(now, deadline_of)`` lists the keys whose deadline has passed, from an index
    ordered by deadline (a heap), so that a stage's ``tick`` costs O(due · log n) instead of a
    decode of every entry. The deadline of an entry is a function of its value alone
    (``deadline_of(key, value)``, the stage's), so the index needs no changelog records of its
    own: the first ``due`` builds it from the committed entries (a state is made afresh from
    the changelog on every assignment), ``commit`` updates it for the keys the transaction
    wrote, ``rollback`` restores the entries ``due`` took out of it, and entries written by
    the open transaction are read from the overlay.
    """

    def __init__(self, committed: Mapping[str, bytes] | None = None) -> None:
        self._committed: dict[str, bytes] = dict(committed or {})
        self._pending: dict[str, bytes | None] = {}
        self._deadline_of: DeadlineOf | None = None
        # The committed deadline of every indexed key; the heap holds one (deadline, key) pair
        # for each, plus stale pairs of keys whose deadline changed since (skipped when popped,
        # dropped when the heap outgrows the index twice over).
        self._deadlines: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        # Pairs popped by ``due`` in the open transaction: back on the heap on rollback, and on
        # commit those still current.
        self._taken: list[tuple[float, str]] = []

    def get(self, key: str) -> bytes | None:
        if key in self._pending:
            return self._pending[key]
        return self._committed.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._pending[key] = value

    def delete(self, key: str) -> None:
        if self.get(key) is not None:
            self._pending[key] = None

    def items(self) -> Iterator[tuple[str, bytes]]:
        for key, value in self._committed.items():
            if key not in self._pending:
                yield key, value
        for key, pending in list(self._pending.items()):
            if pending is not None:
                yield key, pending

    def changes(self) -> dict[str, bytes | None]:
        return dict(self._pending)

    def due(self, now: float, deadline_of: DeadlineOf) -> list[str]:
        """Keys whose deadline is before ``now``, soonest first (this transaction's own writes
        last). A due key stays due until the transaction that sees it rewrites or deletes it
        and commits. ``deadline_of`` must be the same function at every call."""
        if self._deadline_of is None:
            self._build(deadline_of)
        self._restore_taken()  # an earlier call of this transaction took them out
        keys: list[str] = []
        seen: set[str] = set()
        while self._heap and self._heap[0][0] < now:
            deadline, key = heapq.heappop(self._heap)
            self._taken.append((deadline, key))
            current = self._deadlines.get(key) == deadline and key not in self._pending
            if current and key not in seen:
                seen.add(key)
                keys.append(key)
        for key, value in self._pending.items():
            if value is None or key in seen:
                continue
            written = _deadline(deadline_of, key, value)
            if written is not None and written < now:
                seen.add(key)
                keys.append(key)
        return keys

    def _build(self, deadline_of: DeadlineOf) -> None:
        for key, value in self._committed.items():
            deadline = _deadline(deadline_of, key, value)
            if deadline is not None:
                self._deadlines[key] = deadline
        self._heap = [(deadline, key) for key, deadline in self._deadlines.items()]
        heapq.heapify(self._heap)
        self._deadline_of = deadline_of

    def commit(self) -> None:
        for key, value in self._pending.items():
            if value is None:
                self._committed.pop(key, None)
            else:
                self._committed[key] = value
        if self._deadline_of is not None:
            self._index(self._deadline_of)
        self._pending.clear()

    def _index(self, deadline_of: DeadlineOf) -> None:
        for key, value in self._pending.items():
            deadline = None if value is None else _deadline(deadline_of, key, value)
            if deadline is None:
                self._deadlines.pop(key, None)
            elif self._deadlines.get(key) != deadline:
                self._deadlines[key] = deadline
                heapq.heappush(self._heap, (deadline, key))
        for pair in set(self._taken):
            if self._deadlines.get(pair[1]) == pair[0]:
                heapq.heappush(self._heap, pair)
        self._taken.clear()
        if len(self._heap) > 2 * len(self._deadlines) + 1024:
            self._heap = [(deadline, key) for key, deadline in self._deadlines.items()]
            heapq.heapify(self._heap)

    def rollback(self) -> None:
        self._pending.clear()
        self._restore_taken()

    def _restore_taken(self) -> None:
        for pair in self._taken:
            heapq.heappush(self._heap, pair)
        self._taken.clear()

    def __len__(self) -> int:
        return sum(1 for _ in self.items())


def _deadline(deadline_of: DeadlineOf, key: str, value: bytes) -> float | None:
    """``deadline_of(key, value)``; an entry it cannot read is logged and left without a timer
    rather than failing the commit that wrote it (the stage wrote it: that is a bug, not input)."""
    try:
        return deadline_of(key, value)
    except Exception:
        _log.exception("state entry %r has no readable deadline; not indexed", key)
        return None
