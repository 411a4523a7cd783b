"""Executing key paths and security profiles: combine, fail over, break circuits, reject downgrades.

The rules (failover order, events, retry/backoff, downgrade ordering) are in ``docs/key-paths.md``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fleetbus.bus.errors import ConfigError, ReasonCode
from fleetbus.bus.keys import (
    Encapsulation,
    KeyPath,
    KeyProvider,
    KeyProviderError,
    PrivateKeySet,
    ProviderTraits,
    RecipientKeys,
    SecurityProfile,
)
from fleetbus.bus.registry import provider_traits_or_none
from fleetbus.providers.combiner import combine
from fleetbus.providers.resilience import (
    REASON_CIRCUIT_OPEN,
    REASON_TIMEOUT,
    BreakerState,
    CircuitBreaker,
    InstrumentedProvider,
    ProviderUnavailable,
    ResilientProvider,
)

if TYPE_CHECKING:
    from fleetbus.bus.settings import FleetbusSettings

__all__ = [
    "REASON_CIRCUIT_OPEN",
    "REASON_NOT_CONFIGURED",
    "REASON_RECIPIENT_INCAPABLE",
    "REASON_TIMEOUT",
    "BreakerState",
    "CircuitBreaker",
    "FailoverEvent",
    "KeyPathResult",
    "KeyPathRunner",
    "ProfileSealer",
    "is_at_least",
    "path_strength",
    "profiles_unable_to_seal",
]

_log = logging.getLogger(__name__)

#: Failover reasons that are not a provider's own ``ReasonCode`` (bounded set, metric-safe);
#: ``circuit_open`` and ``timeout`` come from the resilience layer.
REASON_RECIPIENT_INCAPABLE = "recipient_incapable"
#: The profile needs a provider this process does not have (e.g. no KME configured for QKD).
REASON_NOT_CONFIGURED = "provider_not_configured"


class KeyPathRunner:
    """Runs every provider of a key path and combines their secrets into the message key."""

    def __init__(self, providers: Mapping[str, KeyProvider]) -> None:
        self._providers = dict(providers)

    def provider(self, name: str) -> KeyProvider:
        try:
            return self._providers[name]
        except KeyError:
            raise ConfigError(
                f"key path names provider {name!r}, which is not configured; "
                f"configured: {', '.join(sorted(self._providers)) or 'none'}"
            ) from None

    def establish(
        self, path: KeyPath, recipient: RecipientKeys, context: bytes
    ) -> tuple[list[Encapsulation], bytes]:
        """Sender side: one encapsulation per provider, in path order, and the combined key."""
        encapsulations = [
            self.provider(name).establish(recipient, context=context) for name in path.providers
        ]
        return encapsulations, combine(encapsulations, context)

    def recover(
        self,
        path: KeyPath,
        refs: Sequence[tuple[str, str, bytes]],
        own: PrivateKeySet,
        context: bytes,
    ) -> bytes:
        """Receiver side: the message key from the envelope's ``(provider, key_id, key_ref)``s.

        ``refs`` must name exactly the providers of ``path``, in order.
        """
        if tuple(name for name, _, _ in refs) != path.providers:
            raise KeyProviderError(
                f"key refs do not match key path {path.name!r}", reason=ReasonCode.MALFORMED
            )
        encapsulations = [
            Encapsulation(
                provider=name,
                key_id=key_id,
                key_ref=key_ref,
                shared_secret=self.provider(name).recover(key_ref, key_id, own, context=context),
            )
            for name, key_id, key_ref in refs
        ]
        return combine(encapsulations, context)


@dataclass(frozen=True)
class FailoverEvent:
    """A key path was skipped or failed. ``to_path`` is the path tried next (the same path when
    a no-fallback profile retries it), or None when nothing is left to try.

    ``reason`` is a ``ReasonCode`` value from the provider's error, or one of
    ``circuit_open`` / ``recipient_incapable`` / ``timeout`` / ``provider_not_configured``.
    """

    profile: str
    from_path: KeyPath
    to_path: KeyPath | None
    reason: str
    at: float


@dataclass(frozen=True)
class KeyPathResult:
    """The key path that worked, its encapsulations (for the envelope) and the message key."""

    path: KeyPath
    encapsulations: tuple[Encapsulation, ...]
    key: bytes = field(repr=False)


class ProfileSealer:
    """Chooses and runs a key path of a ``SecurityProfile``: the failover layer.

    Each provider is called through its resilience layers (``fleetbus.providers.resilience``:
    instrumented -> resilient (timeout, breaker) -> the provider); on top of them this class
    skips incapable or broken paths, fails over along the profile's paths, or, for a profile
    without fallback, retries its one path with exponential backoff. ``listeners`` receive every
    ``FailoverEvent`` (metrics, tracing, audit hook in here); a listener that raises is logged
    and ignored so it cannot break sealing.
    """

    def __init__(
        self,
        runner: KeyPathRunner,
        *,
        listeners: Sequence[Callable[[FailoverEvent], None]] = (),
        provider_timeout_s: float | None = 5.0,
        retries: int = 2,
        backoff_s: float = 0.2,
        failure_threshold: int = 3,
        reset_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0 or backoff_s < 0:
            raise ConfigError("retries and backoff_s must not be negative")
        self.runner = runner
        self._listeners = list(listeners)
        self.provider_timeout_s = provider_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._failure_threshold = failure_threshold
        self._reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._breakers: dict[str, CircuitBreaker] = {}
        self._layered: dict[str, KeyProvider] = {}
        self._lock = threading.Lock()

    def add_listener(self, listener: Callable[[FailoverEvent], None]) -> None:
        self._listeners.append(listener)

    def breaker(self, provider: str) -> CircuitBreaker:
        with self._lock:
            if provider not in self._breakers:
                self._breakers[provider] = CircuitBreaker(
                    failure_threshold=self._failure_threshold,
                    reset_timeout_s=self._reset_timeout_s,
                    clock=self._clock,
                )
            return self._breakers[provider]

    def layered(self, name: str) -> KeyProvider:
        """The configured provider ``name`` inside its resilience layers (built once)."""
        provider = self.runner.provider(name)
        with self._lock:
            layered = self._layered.get(name)
        if layered is None:
            resilient = ResilientProvider(
                provider, self.breaker(name), timeout_s=self.provider_timeout_s
            )
            layered = InstrumentedProvider(resilient)
            with self._lock:
                layered = self._layered.setdefault(name, layered)
        return layered

    # -- public API -----------------------------------------------------------------------

    def establish(
        self, profile: SecurityProfile, recipient: RecipientKeys, context: bytes
    ) -> KeyPathResult:
        """Seal-side key establishment for ``recipient`` under ``profile``.

        Raises ``KeyProviderError`` with ``KEY_PATH_EXHAUSTED`` when no path worked.
        """
        if not profile.key_paths:
            raise ConfigError(f"profile {profile.name!r} has no key paths")
        if profile.allow_fallback:
            return self._with_fallback(profile, recipient, context)
        return self._with_retries(profile, recipient, context)

    # -- strategies -----------------------------------------------------------------------

    def _with_fallback(
        self, profile: SecurityProfile, recipient: RecipientKeys, context: bytes
    ) -> KeyPathResult:
        paths = list(profile.key_paths)
        last_reason = ""
        for index, path in enumerate(paths):
            next_path = paths[index + 1] if index + 1 < len(paths) else None
            reason = self._skip_reason(path, recipient)
            if reason is None:
                try:
                    return self._run_path(path, recipient, context)
                except ProviderUnavailable as failure:
                    reason = failure.failover_reason
            last_reason = reason
            self._emit(profile, path, next_path, reason)
        raise self._exhausted(profile, last_reason)

    def _with_retries(
        self, profile: SecurityProfile, recipient: RecipientKeys, context: bytes
    ) -> KeyPathResult:
        path = profile.key_paths[0]
        attempts = self.retries + 1
        last_reason = ""
        for attempt in range(attempts):
            reason = self._skip_reason(path, recipient)
            if reason is None:
                try:
                    return self._run_path(path, recipient, context)
                except ProviderUnavailable as failure:
                    reason = failure.failover_reason
            last_reason = reason
            final = attempt == attempts - 1 or reason == REASON_RECIPIENT_INCAPABLE
            self._emit(profile, path, None if final else path, reason)
            if final:
                break
            self._sleep(self.backoff_s * (2**attempt))
        raise self._exhausted(profile, last_reason)

    # -- helpers --------------------------------------------------------------------------

    def _skip_reason(self, path: KeyPath, recipient: RecipientKeys) -> str | None:
        providers = [self.runner.provider(name) for name in path.providers]
        if not all(_recipient_can_use(p, recipient) for p in providers):
            return REASON_RECIPIENT_INCAPABLE
        if not all(self.breaker(name).allow() for name in path.providers):
            return REASON_CIRCUIT_OPEN
        return None

    def _run_path(self, path: KeyPath, recipient: RecipientKeys, context: bytes) -> KeyPathResult:
        encapsulations: list[Encapsulation] = []
        for name in path.providers:
            # Raises ProviderUnavailable with one bounded reason (resilience layers).
            encapsulations.append(self.layered(name).establish(recipient, context=context))
        key = combine(encapsulations, context)
        return KeyPathResult(path=path, encapsulations=tuple(encapsulations), key=key)

    def _emit(
        self, profile: SecurityProfile, from_path: KeyPath, to_path: KeyPath | None, reason: str
    ) -> None:
        event = FailoverEvent(
            profile=profile.name,
            from_path=from_path,
            to_path=to_path,
            reason=reason,
            at=self._wall_clock(),
        )
        _log.info(
            "key path %s of profile %s failed (%s); next: %s",
            from_path.name,
            profile.name,
            reason,
            to_path.name if to_path else "none",
        )
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                _log.exception("failover listener %r raised", listener)

    @staticmethod
    def _exhausted(profile: SecurityProfile, last_reason: str) -> KeyProviderError:
        return KeyProviderError(
            f"profile {profile.name!r}: no key path succeeded (last reason: {last_reason})",
            reason=ReasonCode.KEY_PATH_EXHAUSTED,
        )


def _traits(provider: KeyProvider) -> ProviderTraits:
    """The registry's answer for a registered name, else what the class itself declares."""
    return provider_traits_or_none(provider.name) or type(provider).traits


def _recipient_can_use(provider: KeyProvider, recipient: RecipientKeys) -> bool:
    if provider.algorithm is not None:
        return (
            provider.algorithm in recipient.public_keys and provider.algorithm in recipient.key_ids
        )
    if _traits(provider).needs_sae_id:
        return recipient.qkd_sae_id is not None
    return True


# -- downgrade ordering: from the providers' declared traits (fleetbus.bus.registry) ----------

_UNKNOWN = ProviderTraits()


def path_strength(path: KeyPath) -> int:
    """A rank for display and ordering: 4 if a QKD key is mixed in, + 2 if a post-quantum KEM,
    + 1 if a classical KEM (x25519=1, mlkem768=2, xwing=3, qkd+xwing=7). Unknown providers add
    nothing. Downgrade checks use ``is_at_least``, not this number."""
    pq = classical = qkd = False
    for name in path.providers:
        t = provider_traits_or_none(name) or _UNKNOWN
        pq, classical, qkd = pq or t.post_quantum_kem, classical or t.classical_kem, qkd or t.qkd
    return 4 * qkd + 2 * pq + 1 * classical


def _components(path: KeyPath) -> frozenset[str]:
    parts: set[str] = set()
    for name in path.providers:
        parts |= (provider_traits_or_none(name) or _UNKNOWN).covers(name)
    return frozenset(parts)


def is_at_least(path: KeyPath, minimum: KeyPath) -> bool:
    """True when ``path`` covers every component of ``minimum`` (it may add more).

    Adding a source to a CatKDF combination never weakens it, so containment of components is a
    safe partial order; ``xwing`` covers ``x25519`` and ``mlkem768`` because it is their hybrid.
    Paths that merely have an equal or higher ``path_strength`` do not qualify.
    """
    return _components(minimum) <= _components(path)


# -- which profiles can seal to a key set: `keys issue` asks before it signs a record ---------


def _path_takes(path: KeyPath, key_algorithms: Collection[str], has_sae_id: bool) -> bool:
    """``_recipient_can_use`` for every provider of ``path``, from the registry's traits alone
    (no provider is built). An unregistered name can take nothing."""
    for name in path.providers:
        traits = provider_traits_or_none(name)
        if traits is None:
            return False
        if traits.key_algorithm is not None:
            if not any(traits.owns_algorithm(alg) for alg in key_algorithms):
                return False
        elif traits.needs_sae_id and not has_sae_id:
            return False
    return True


def profiles_unable_to_seal(
    settings: FleetbusSettings,
    key_algorithms: Collection[str],
    capabilities: Collection[str],
    has_sae_id: bool,
) -> dict[str, str]:
    """The profiles ``settings.profile_rules`` can choose for a recipient with these directory
    keys and capabilities whose key paths none of its keys can take, each with a line that says
    why (``"(no rule)"`` when, for some criticality, no rule matches at all).

    Every criticality a rule names is tried, and one no rule names; a profile without fallback
    only ever uses its first path (§3). A command routed to any of them would be refused at seal
    time (``key_path_exhausted``) for as long as the record lives; see docs/key-paths.md §3.
    """
    caps = frozenset(capabilities)
    named = sorted({r.criticality for r in settings.profile_rules if r.criticality is not None})
    unable: dict[str, str] = {}
    for criticality in [*named, None]:
        rule = next(
            (
                r
                for r in settings.profile_rules
                if (r.criticality is None or r.criticality == criticality)
                and (r.capability is None or r.capability in caps)
            ),
            None,
        )
        what = f"criticality {criticality}" if criticality else "any other criticality"
        if rule is None:
            unable["(no rule)"] = f"no profile rule matches {what}"
            continue
        if rule.profile in unable:
            continue
        chosen = (
            f"profile {rule.profile} (chosen for {what}"
            f"{f' and capability {rule.capability}' if rule.capability else ''})"
        )
        spec = settings.profiles.get(rule.profile)
        if spec is None:
            # The seal stage refuses every command a rule routes to an undefined profile.
            unable[rule.profile] = f"{chosen} is not defined"
            continue
        paths = [KeyPath.parse(p) for p in spec.key_paths]
        usable = paths if spec.allow_fallback else paths[:1]
        if not any(_path_takes(p, key_algorithms, has_sae_id) for p in usable):
            unable[rule.profile] = f"{chosen} seals only on {', '.join(p.name for p in usable)}"
    return unable
