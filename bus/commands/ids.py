"""Command ids: UUIDv7 (RFC 9562 section 5.7), monotonic within a process."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from fleetbus.bus.commands.wire import _UUID_RE
from fleetbus.bus.errors import FleetbusError, ReasonCode

if TYPE_CHECKING:
    pass


# --- UUIDv7 (RFC 9562 section 5.7) ---------------------------------------------------------


class UUIDv7Generator:
    """Monotonic UUIDv7 ids: 48-bit Unix milliseconds, version 7, variant 10, 74 random bits.

    Within one millisecond (or when the clock steps back) the 74-bit random field is
    incremented by a random amount instead of redrawn (RFC 9562 section 6.2, method 2), so ids
    from one generator sort in creation order. Thread-safe.
    """

    _RANDOM_BITS: Final = 74

    def __init__(
        self,
        *,
        clock_ms: Callable[[], int] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._random_bytes = random_bytes
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def _random(self, bits: int) -> int:
        return int.from_bytes(self._random_bytes((bits + 7) // 8), "big") & ((1 << bits) - 1)

    def new(self) -> str:
        with self._lock:
            now = self._clock_ms()
            if now > self._last_ms:
                ms, rand = now, self._random(self._RANDOM_BITS)
            else:
                # Same or earlier millisecond: stay on the last timestamp and step forward.
                ms, rand = self._last_ms, self._last_random + 1 + self._random(32)
                if rand >> self._RANDOM_BITS:
                    ms, rand = ms + 1, self._random(self._RANDOM_BITS)
            if ms >> 48:
                raise FleetbusError("clock beyond the UUIDv7 range", reason=ReasonCode.CONFIG)
            self._last_ms, self._last_random = ms, rand
        rand_a = rand >> 62
        rand_b = rand & ((1 << 62) - 1)
        value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
        text = f"{value:032x}"
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_DEFAULT_GENERATOR = UUIDv7Generator()


def new_command_id() -> str:
    """A fresh UUIDv7 in canonical lowercase text form."""
    return _DEFAULT_GENERATOR.new()


def command_id_at(at: float) -> str:
    """A fresh UUIDv7 whose timestamp is ``at`` (epoch seconds), for a command issued then."""
    ms = round(at * 1000)
    if not 0 <= ms < 1 << 48:
        raise FleetbusError("time outside the UUIDv7 range", reason=ReasonCode.MALFORMED)
    return UUIDv7Generator(clock_ms=lambda: ms).new()


def uuid7_timestamp_ms(value: str) -> int:
    """The Unix millisecond timestamp embedded in a UUIDv7 text id."""
    if not _UUID_RE.fullmatch(value):
        raise FleetbusError("not a canonical UUIDv7", reason=ReasonCode.MALFORMED)
    return int(value.replace("-", "")[:12], 16)
