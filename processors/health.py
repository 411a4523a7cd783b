"""What a worker reports about its key providers and keys between seals: provider health,
circuit-breaker states, the QKD key pool its KME holds for each QKD site, and key expiry.

Sealing alone would only touch these gauges when a command happens to use a provider, so a
quiet worker — or one whose QKD path is broken and skipped — would report nothing. The
``HealthReporter`` probes on a fixed interval instead and also creates the labelled
Kafka produce counters of every stage at start, so a healthy worker exports zeros, not gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from fleetbus.bus.directory import KeyDirectory
from fleetbus.bus.errors import FleetbusError
from fleetbus.bus.keys import KeyProvider
from fleetbus.observability.metrics import (
    INTERNAL_ERRORS,
    KEY_EXPIRY,
    PRODUCE_ERRORS,
    PRODUCE_RETRIES,
    PROVIDER_UP,
    QKD_KEY_POOL,
    set_circuit_state,
)

_log = logging.getLogger(__name__)

#: Seconds between probes: often enough for 1-minute alerts, rare enough for a KME.
PROBE_INTERVAL_S = 5.0


@runtime_checkable
class KeyPoolStatus(Protocol):
    """A provider that can report its KME's key pool for a peer SAE (ETSI 014 status)."""

    def status(self, slave_sae_id: str) -> Mapping[str, Any]: ...


class BreakerSource(Protocol):
    """Where breaker states come from (``ProfileSealer`` fits)."""

    def breaker(self, provider: str) -> Any: ...


def init_stage_counters(stages: Iterable[str]) -> None:
    """Create the per-stage produce retry/error and internal-error series at zero (absent series
    read as gaps, and ``increase()`` does not see the first increment of a new series: the
    first internal error would not fire FleetbusInternalError)."""
    for stage in stages:
        PRODUCE_RETRIES.labels(stage=stage)
        PRODUCE_ERRORS.labels(stage=stage)
        INTERNAL_ERRORS.labels(stage=stage)


class HealthReporter:
    """Publishes ``fleetbus_provider_up``, ``fleetbus_provider_circuit_state``,
    ``fleetbus_qkd_stored_keys`` and ``fleetbus_key_expiry_seconds``.

    A provider with a key-pool status (QKD) is up when its KME answers the status of every QKD
    site in the directory; other providers report ``healthy()``. Key expiry is, per principal
    kind, the soonest ``not_after`` among each principal's newest unrevoked key.
    """

    stage = "health"

    def __init__(
        self,
        providers: Mapping[str, KeyProvider],
        breakers: BreakerSource,
        directory: KeyDirectory,
        *,
        interval_s: float = PROBE_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.providers = dict(providers)
        self.breakers = breakers
        self.directory = directory
        self.interval_s = interval_s
        self._clock = clock
        self._stopping = asyncio.Event()

    def qkd_sites(self) -> list[str]:
        """SAE ids of the QKD-connected principals (sites, not vehicles: bounded)."""
        return sorted({r.qkd_sae_id for r in self.directory.records() if r.qkd_sae_id})

    def report(self) -> None:
        """One probe of everything (blocking: QKD status is an HTTPS call)."""
        sites = self.qkd_sites()
        for name, provider in self.providers.items():
            up = self._probe(name, provider, sites)
            PROVIDER_UP.labels(provider=name).set(1 if up else 0)
            set_circuit_state(name, str(self.breakers.breaker(name).state))
        self.report_key_expiry()

    def _probe(self, name: str, provider: KeyProvider, sites: list[str]) -> bool:
        if not sites or not isinstance(provider, KeyPoolStatus):
            try:
                return bool(provider.healthy())
            except Exception:  # a probe must never take the worker down
                _log.warning("health probe of %s raised", name, exc_info=False)
                return False
        up = True
        for site in sites:
            try:
                count = provider.status(site).get("stored_key_count")
            except FleetbusError as exc:
                _log.info("provider %s: status for %s failed (%s)", name, site, exc.reason)
                up = False
                continue
            except Exception:
                _log.warning("provider %s: status for %s raised", name, site, exc_info=False)
                up = False
                continue
            if isinstance(count, int) and not isinstance(count, bool):
                QKD_KEY_POOL.labels(slave_sae=site).set(count)
        return up

    def report_key_expiry(self) -> None:
        now = self._clock()
        newest: dict[str, Any] = {}
        for record in self.directory.records():
            if record.revoked:
                continue
            seen = newest.get(record.principal_id)
            if seen is None or record.version > seen.version:
                newest[record.principal_id] = record
        soonest: dict[str, float] = {}
        for record in newest.values():
            if math.isfinite(record.not_after):
                soonest[record.kind] = min(soonest.get(record.kind, math.inf), record.not_after)
        for kind, not_after in soonest.items():
            KEY_EXPIRY.labels(kind=kind).set(not_after - now)

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.to_thread(self.report)
            except Exception:
                _log.exception("health report failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval_s)

    async def stop(self) -> None:
        self._stopping.set()
