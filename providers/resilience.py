"""Resilience as layers around one key provider, as kroxylicious wraps its KMS.

``InstrumentedProvider(ResilientProvider(provider))``: the outer layer turns every outcome into
one bounded, metric-safe reason (logging the unexpected); the inner one bounds the call with the
provider timeout and a circuit breaker. Retrying and failing over belong to a whole key path and
its profile, so they sit on top, in ``fleetbus.providers.keypath.ProfileSealer``. No caching layer:
nothing a provider returns may be reused (each secret is fresh); the one cache that applies, the
KME status answer, lives inside ``QKDProvider``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from enum import StrEnum
from functools import partial
from typing import TypeVar

from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.bus.keys import (
    Encapsulation,
    KeyProvider,
    KeyProviderError,
    PrivateKeySet,
    RecipientKeys,
)

__all__ = [
    "REASON_CIRCUIT_OPEN",
    "REASON_TIMEOUT",
    "BreakerState",
    "CircuitBreaker",
    "InstrumentedProvider",
    "ProviderUnavailable",
    "ProviderWrapper",
    "ResilientProvider",
]

_log = logging.getLogger("fleetbus.providers.keypath")  # the logger these lines always used
_T = TypeVar("_T")

#: Failover reasons that are not a provider's own ``ReasonCode`` (bounded set, metric-safe).
REASON_CIRCUIT_OPEN = "circuit_open"
REASON_TIMEOUT = "timeout"


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per-provider breaker: opens after ``failure_threshold`` consecutive failures, lets a trial
    call through (half-open) once ``reset_timeout_s`` has passed, and closes on a success."""

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ConfigError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state_locked()

    def _state_locked(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.reset_timeout_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        """Whether a call may be attempted now (closed or half-open)."""
        return self.state is not BreakerState.OPEN

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None

    def record_failure(self) -> None:
        with self._lock:
            state = self._state_locked()
            self._failures += 1
            if state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()  # (re)open; a failed trial restarts the wait


class ProviderUnavailable(KeyProviderError):
    """A wrapped provider could not establish a secret; ``failover_reason`` says why, as a
    ``ReasonCode`` value or ``circuit_open`` / ``timeout`` (what ``FailoverEvent`` carries)."""

    def __init__(self, provider: str, failover_reason: str) -> None:
        super().__init__(f"{provider}: {failover_reason}")
        self.provider = provider
        self.failover_reason = failover_reason


class ProviderWrapper(KeyProvider):
    """A key provider around another one: same name, key algorithm and blocking."""

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.name = inner.name
        self.algorithm = inner.algorithm
        self.may_block = inner.may_block

    def generate_keypair(self) -> tuple[bytes, bytes]:
        return self.inner.generate_keypair()

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        return self.inner.establish(recipient, context=context)

    def recover(self, key_ref: bytes, key_id: str, own: PrivateKeySet, *, context: bytes) -> bytes:
        return self.inner.recover(key_ref, key_id, own, context=context)

    def healthy(self) -> bool:
        return self.inner.healthy()


class ResilientProvider(ProviderWrapper):
    """Bounds ``establish`` by the provider timeout and a circuit breaker.

    A provider that declares ``may_block = False`` (a pure computation) is called inline: a
    thread per call cost more than the KEM itself. Every other one runs under the timeout in a
    fresh daemon thread, not a pool: a hung network provider (a KME that never answers) must not
    take a pool worker that the next call waits for. A timed-out call keeps running in its
    thread (Python cannot cancel it); its result is discarded.
    """

    def __init__(
        self, inner: KeyProvider, breaker: CircuitBreaker, *, timeout_s: float | None
    ) -> None:
        super().__init__(inner)
        self.breaker = breaker
        self.timeout_s = timeout_s

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        if not self.breaker.allow():
            raise ProviderUnavailable(self.name, REASON_CIRCUIT_OPEN)
        try:
            if not self.may_block:
                enc = self.inner.establish(recipient, context=context)
            else:
                enc = self._call(partial(self.inner.establish, recipient, context=context))
        except FutureTimeout:
            self.breaker.record_failure()
            raise ProviderUnavailable(self.name, REASON_TIMEOUT) from None
        except Exception:
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return enc

    def _call(self, fn: Callable[[], _T]) -> _T:
        if self.timeout_s is None:
            return fn()
        future: Future[_T] = Future()

        def work() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=work, name="fleetbus-key-provider", daemon=True).start()
        return future.result(timeout=self.timeout_s)


class InstrumentedProvider(ProviderWrapper):
    """Every failed ``establish`` leaves as ``ProviderUnavailable`` with one bounded reason:
    the provider's ``ReasonCode``, the inner layer's ``circuit_open`` / ``timeout``, or
    ``key_provider_failed`` for anything else (a provider bug is logged by type only, never by
    message, and must not take sealing down with it)."""

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        try:
            return self.inner.establish(recipient, context=context)
        except ProviderUnavailable:
            raise
        except FleetbusError as exc:
            raise ProviderUnavailable(self.name, str(exc.reason)) from None
        except Exception as exc:
            _log.warning("key provider %s raised %s", self.name, type(exc).__name__)
            raise ProviderUnavailable(self.name, ReasonCode.KEY_PROVIDER_FAILED.value) from None
