"""The key pool both KMEs draw from, and the simulated link that fills it (rate, QBER,
eavesdropper, link up or down). No I/O but the state file; the clock and the randomness are
injectable."""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleetbus.kmesim.errors import KMEBadRequest, KMEUnauthorized, KMEUnavailable
from fleetbus.kmesim.state import KMEStateError, PoolStateFile, b64_text, canonical_json


@dataclass(frozen=True)
class _Reservation:
    key_id: str
    material: bytes
    master: str
    slave: str
    source_kme: str
    target_kme: str
    reserved_at: float
    #: Wall-clock time of the reservation: what the state file keeps, so the TTL keeps
    #: running while the KME is down.
    reserved_wall: float = 0.0


class KeyPool:
    """Key material both ends of the simulated link hold, plus who each handed-out key is for.

    The link adds ``key_rate_bps`` bits per second of clock time while it is up and the QBER is
    at or below the threshold, up to ``max_key_count * key_size`` bits. ``enc_keys`` takes
    material out of the pool and reserves it for one (master, slave) pair; ``dec_keys`` on the
    other KME hands it to that slave and forgets it. So every key is handed out once per side.

    With a ``state_file`` the unreserved material and the reservations are written to it before
    ``reserve``, ``deliver``, ``flush`` and ``reset`` return, and read back at start instead of
    the initial fill: a key handed to the master before a restart is still fetchable by the
    slave after it, and a key delivered to both sides is gone for good. Switches (link,
    eavesdropper, rate) and the ``delivered`` counters start afresh.
    """

    def __init__(
        self,
        *,
        key_size: int = 256,
        max_key_count: int = 1000,
        key_rate_bps: float = 10_000.0,
        prefill_keys: int | None = None,
        qber_baseline: float = 0.02,
        qber_eavesdropper: float = 0.25,
        qber_threshold: float = 0.11,
        flush_on_eavesdropper: bool = False,
        reservation_ttl_s: float = 600.0,
        state_file: PoolStateFile | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if key_size % 8 or key_size <= 0:
            raise ValueError("key_size must be a positive multiple of 8")
        self.key_size = key_size
        self.max_key_count = max_key_count
        self.qber_baseline = qber_baseline
        self.qber_eavesdropper = qber_eavesdropper
        self.qber_threshold = qber_threshold
        self.flush_on_eavesdropper = flush_on_eavesdropper
        self.reservation_ttl_s = reservation_ttl_s
        #: Unfetched reservations beyond this many are dropped, oldest first.
        self.max_reserved = 4 * max_key_count
        self._clock = clock
        self._wall_clock = wall_clock
        self._random = random_bytes
        self._lock = threading.Lock()
        self._initial_rate = float(key_rate_bps)
        self._initial_fill = max_key_count if prefill_keys is None else prefill_keys
        self._reserved: OrderedDict[str, _Reservation] = OrderedDict()
        self.delivered: dict[str, int] = {}
        self.state_file = state_file
        #: key_ID -> the reservation's canonical JSON, so a save re-encodes only new ones.
        self._fragments: dict[str, str] = {}
        saved = state_file.load() if state_file is not None else None
        if saved is None:
            self.reset()
        else:
            with self._lock:
                self._start_state()
                self._restore(saved)

    # -- state and switches -------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.max_key_count * self.key_size // 8

    def reset(self) -> None:
        """Back to the start-up state: link up, no eavesdropper, initial rate and fill, no
        reservations (also in the state file)."""
        with self._lock:
            self._start_state()
            fill = min(self._initial_fill, self.max_key_count) * self.key_size // 8
            self._material = bytearray(self._random(fill))
            self._reserved.clear()
            self._persist()

    def _start_state(self) -> None:
        self._link_up = True
        self._eavesdropper = False
        self._rate = self._initial_rate
        self._material = bytearray()
        self._carry_bits = 0.0
        self._last = self._clock()

    # -- durability ----------------------------------------------------------------------

    def _persist(self) -> None:
        """Write the pool to the state file (caller holds the lock). Key material at rest."""
        if self.state_file is None:
            return
        fragments = []
        for r in self._reserved.values():
            fragment = self._fragments.get(r.key_id)
            if fragment is None:
                fragment = self._fragments[r.key_id] = canonical_json(
                    {
                        "key_ID": r.key_id,
                        "key": b64_text(r.material),
                        "master": r.master,
                        "slave": r.slave,
                        "source_kme": r.source_kme,
                        "target_kme": r.target_kme,
                        "reserved_at": r.reserved_wall,
                    }
                )
            fragments.append(fragment)
        if len(self._fragments) != len(fragments):  # drop delivered and expired ones
            self._fragments = {k: self._fragments[k] for k in self._reserved}
        # Keys in sorted order, compact: the same text as canonical_json() of the parsed state.
        material = canonical_json(b64_text(bytes(self._material)))
        self.state_file.save(
            '{"material":' + material + ',"reservations":[' + ",".join(fragments) + "]}"
        )

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Take over a saved state (caller holds the lock); reservation ages keep running over
        the time the KME was down (wall clock)."""
        assert self.state_file is not None
        where = self.state_file.path
        try:
            material = base64.b64decode(state["material"], validate=True)
            now, wall = self._clock(), self._wall_clock()
            reserved: OrderedDict[str, _Reservation] = OrderedDict()
            for entry in state["reservations"]:
                fields = ("key_ID", "master", "slave", "source_kme", "target_kme")
                key_id, master, slave, source, target = (str(entry[f]) for f in fields)
                reserved_wall = float(entry["reserved_at"])
                reserved[key_id] = _Reservation(
                    key_id,
                    base64.b64decode(entry["key"], validate=True),
                    master,
                    slave,
                    source,
                    target,
                    now - max(0.0, wall - reserved_wall),
                    reserved_wall,
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise KMEStateError(
                f"KME state file {where} has an unexpected shape ({type(exc).__name__}); "
                "move it away to start with a fresh pool (keys it holds are then lost)"
            ) from None
        # A smaller --pool-size than before keeps the first keys of the pool, drops the rest.
        self._material = bytearray(material[: self.capacity_bytes])
        self._reserved = reserved
        self._expire()

    def close(self) -> None:
        """Release the state directory (its lock); the pool stays usable in memory."""
        if self.state_file is not None:
            self.state_file.close()
            self.state_file = None

    def _persist_or_undo(self, undo: Callable[[], None]) -> None:
        """Persist a change before it is answered; if the write fails, undo it and answer 503,
        so no key is ever handed out (or forgotten) that the state file does not reflect."""
        try:
            self._persist()
        except OSError as exc:
            undo()
            raise KMEUnavailable(
                "key pool state could not be written",
                [{"reason": "state_write_failed", "error": exc.strerror or type(exc).__name__}],
            ) from None

    @property
    def qber(self) -> float:
        return self.qber_eavesdropper if self._eavesdropper else self.qber_baseline

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def eavesdropper(self) -> bool:
        return self._eavesdropper

    @property
    def key_rate_bps(self) -> float:
        """The configured rate of the link (what it produces while generating)."""
        return self._rate

    @property
    def generating(self) -> bool:
        """Whether new key material is being distilled right now."""
        return self._link_up and self.qber <= self.qber_threshold and self._rate > 0

    def set_link(self, up: bool) -> None:
        with self._lock:
            self._refill()
            self._link_up = up

    def set_eavesdropper(self, on: bool) -> None:
        with self._lock:
            self._refill()
            self._eavesdropper = on
            if on and self.flush_on_eavesdropper and self.qber > self.qber_threshold:
                self._material.clear()
                self._persist()

    def set_key_rate(self, bits_per_second: float) -> None:
        if bits_per_second < 0:
            raise ValueError("key rate must be >= 0")
        with self._lock:
            self._refill()
            self._rate = float(bits_per_second)

    def flush(self) -> None:
        """Drop all unreserved key material (reserved keys stay fetchable)."""
        with self._lock:
            self._refill()
            self._material.clear()
            self._carry_bits = 0.0
            self._persist()

    def stored_key_count(self) -> int:
        """Unreserved keys of the default size in the pool (014 ``stored_key_count``)."""
        with self._lock:
            self._refill()
            return len(self._material) * 8 // self.key_size

    def reserved_key_count(self) -> int:
        with self._lock:
            self._expire()
            return len(self._reserved)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        if not self.generating:
            self._carry_bits = 0.0
            return
        room = self.capacity_bytes - len(self._material)
        bits = self._carry_bits + elapsed * self._rate
        whole = int(bits // 8)
        if whole >= room:
            whole, self._carry_bits = room, 0.0
        else:
            self._carry_bits = bits - whole * 8
        if whole > 0:
            self._material += self._random(whole)

    def _expire(self) -> None:
        deadline = self._clock() - self.reservation_ttl_s
        while self._reserved:
            oldest = next(iter(self._reserved.values()))
            if oldest.reserved_at > deadline and len(self._reserved) <= self.max_reserved:
                break
            self._reserved.popitem(last=False)

    # -- the two halves of a key exchange -----------------------------------------------

    def reserve(
        self,
        *,
        source_kme: str,
        target_kme: str,
        master: str,
        slave: str,
        number: int,
        size_bits: int,
    ) -> list[tuple[str, bytes]]:
        """``enc_keys``: take ``number`` keys of ``size_bits`` out of the pool for ``slave``."""
        if number < 1 or size_bits <= 0 or size_bits % 8:
            raise KMEBadRequest("number must be >= 1 and size a positive multiple of 8")
        with self._lock:
            if not self._link_up:
                raise KMEUnavailable("QKD link down", [{"reason": "link_down", "kme": source_kme}])
            self._refill()
            needed = number * size_bits // 8
            if len(self._material) < needed:
                details: dict[str, Any] = {
                    "reason": "key_pool_empty",
                    "stored_key_count": len(self._material) * 8 // self.key_size,
                }
                if self.qber > self.qber_threshold:
                    details = {
                        "reason": "eavesdropper_detected",
                        "qber": self.qber,
                        "qber_threshold": self.qber_threshold,
                    }
                raise KMEUnavailable("not enough key material in the pool", [details])
            chunk = bytes(self._material[:needed])
            del self._material[:needed]
            self._expire()
            before = OrderedDict(self._reserved)
            now, wall = self._clock(), self._wall_clock()
            step = size_bits // 8
            out: list[tuple[str, bytes]] = []
            for i in range(number):
                key_id = str(uuid.uuid4())
                material = chunk[i * step : (i + 1) * step]
                self._reserved[key_id] = _Reservation(
                    key_id, material, master, slave, source_kme, target_kme, now, wall
                )
                out.append((key_id, material))
            self._expire()

            def undo() -> None:
                self._material[:0] = chunk
                self._reserved = before

            self._persist_or_undo(undo)
            self.delivered[source_kme] = self.delivered.get(source_kme, 0) + number
            return out

    def deliver(
        self, *, target_kme: str, master: str, slave: str, key_ids: Sequence[str]
    ) -> list[tuple[str, bytes]]:
        """``dec_keys``: hand the keys ``master`` reserved for ``slave`` to it, once, all or none.

        A key_ID held for another slave SAE is refused with 401 (014 Table 7: the caller is not
        the key's slave); one that is unknown, already fetched, expired, or held for this slave
        under another master with 400. Nothing is handed out or used up by a refusal.
        """
        if not key_ids:
            raise KMEBadRequest("no key_ID given")
        if len(set(key_ids)) != len(key_ids):
            raise KMEBadRequest("duplicate key_ID in request")
        with self._lock:
            if not self._link_up:
                raise KMEUnavailable("QKD link down", [{"reason": "link_down", "kme": target_kme}])
            self._expire()
            foreign: list[dict[str, Any]] = []
            bad: list[dict[str, Any]] = []
            for key_id in key_ids:
                res = self._reserved.get(key_id)
                if res is not None and res.slave != slave:
                    foreign.append({"key_ID": key_id, "reason": "not the slave SAE of this key"})
                elif res is None or res.master != master or res.target_kme != target_kme:
                    bad.append({"key_ID": key_id, "reason": "unknown or not available"})
            if foreign:
                raise KMEUnauthorized(f"SAE {slave!r} is not the slave SAE of the key", foreign)
            if bad:
                raise KMEBadRequest("key_ID not available to this SAE", bad)
            before = OrderedDict(self._reserved)
            out = [(k, self._reserved.pop(k).material) for k in key_ids]

            def undo() -> None:
                self._reserved = before

            self._persist_or_undo(undo)
            self.delivered[target_kme] = self.delivered.get(target_kme, 0) + len(out)
            return out

    def snapshot(self) -> dict[str, Any]:
        """The admin view (no key material)."""
        stored = self.stored_key_count()
        return {
            "link_up": self._link_up,
            "eavesdropper": self._eavesdropper,
            "qber": self.qber,
            "qber_threshold": self.qber_threshold,
            "generating": self.generating,
            "key_rate_bps": self._rate,
            "key_size": self.key_size,
            "stored_key_count": stored,
            "max_key_count": self.max_key_count,
            "reserved_key_count": self.reserved_key_count(),
            "delivered": dict(self.delivered),
        }
