"""A simulated QKD link: two ETSI GS QKD 014 (v1.1.1) Key Management Entities in one process.

KME-A serves the SAEs of site A, KME-B those of site B; both draw from one key pool that a
simulated link fills at a configured key rate. Key bits come from ``os.urandom``: this is a
simulator of the *interfaces and failure modes* of a QKD link, not of quantum physics, and its
keys have no information-theoretic property at all. With a state directory the pool and
its reservations survive a restart (``PoolStateFile``). See ``docs/qkd.md``.

Modules: ``config`` (``KMEPairConfig``), ``pool`` (the key pool and the simulated link),
``state`` (the pool's state file), ``api`` (the ETSI 014 HTTP API), ``errors`` (014 error
bodies), ``admin`` (switches and metrics); this module runs the pair (``KMEPair``,
``serve_pair``) and re-exports the names the CLI, the dev tools and the tests use.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from fleetbus.bus.errors import ConfigError
from fleetbus.kmesim.admin import PairCollector, admin_app, admin_mtls_middleware, metrics_app
from fleetbus.kmesim.api import KMEService, caller_sae_id
from fleetbus.kmesim.config import API_PREFIX, MAX_BODY_BYTES, KMEPairConfig, certificate_kme_id
from fleetbus.kmesim.errors import KMEBadRequest, KMEError, KMEUnauthorized, KMEUnavailable
from fleetbus.kmesim.pool import KeyPool
from fleetbus.kmesim.state import KMEStateError, PoolStateFile
from fleetbus.observability.metrics import set_build_info

__all__ = [
    "API_PREFIX",
    "MAX_BODY_BYTES",
    "KMEBadRequest",
    "KMEError",
    "KMEPair",
    "KMEPairConfig",
    "KMEService",
    "KMEStateError",
    "KMEUnauthorized",
    "KMEUnavailable",
    "KeyPool",
    "PairEndpoints",
    "PoolStateFile",
    "admin_app",
    "caller_sae_id",
    "certificate_kme_id",
    "metrics_app",
    "serve_pair",
    "server_ssl_context",
]


def server_ssl_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS >= 1.2 with a mandatory client certificate issued by ``ca_file``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


@dataclass(frozen=True)
class PairEndpoints:
    """Where a running pair listens (actual ports, also when 0 was configured)."""

    kme_a_url: str
    kme_b_url: str
    admin_url: str
    metrics_url: str | None = None

    def as_dict(self) -> dict[str, str]:
        out = {"kme_a": self.kme_a_url, "kme_b": self.kme_b_url, "admin": self.admin_url}
        if self.metrics_url is not None:
            out["metrics"] = self.metrics_url
        return out


class KMEPair:
    """Both KMEs, the pool between them and the admin endpoint, as aiohttp applications."""

    def __init__(self, config: KMEPairConfig, *, clock: Callable[[], float] = time.monotonic):
        for cert, kme_id in (
            (config.kme_a_cert, config.kme_a_id),
            (config.kme_b_cert, config.kme_b_id),
        ):
            # A status source_KME_ID its own certificate contradicts would fail every SAE's
            # KME ID check: refuse to start instead.
            if certificate_kme_id(cert) != kme_id:
                raise ConfigError(f"{cert} does not name KME ID {kme_id!r} (its subject CN)")
        self.config = config
        state_file = None if config.state_dir is None else PoolStateFile(config.state_dir)
        self.pool = KeyPool(
            key_size=config.key_size,
            max_key_count=config.max_key_count,
            key_rate_bps=config.key_rate_bps,
            prefill_keys=config.prefill_keys,
            qber_baseline=config.qber_baseline,
            qber_eavesdropper=config.qber_eavesdropper,
            qber_threshold=config.qber_threshold,
            flush_on_eavesdropper=config.flush_on_eavesdropper,
            reservation_ttl_s=config.reservation_ttl_s,
            state_file=state_file,
            clock=clock,
        )
        self.registry = CollectorRegistry()
        self.registry.register(PairCollector(self.pool, (config.kme_a_id, config.kme_b_id)))
        set_build_info(self.registry)
        requests_total = Counter(
            "fleetbus_qkd_kme_requests",
            "ETSI 014 requests answered, by KME, endpoint and HTTP status code.",
            ["kme", "endpoint", "code"],
            registry=self.registry,
        )
        self.kme_a = KMEService(
            kme_id=config.kme_a_id,
            peer_kme_id=config.kme_b_id,
            local_saes=config.sae_a,
            remote_saes=config.sae_b,
            pool=self.pool,
            config=config,
            requests_total=requests_total,
        )
        self.kme_b = KMEService(
            kme_id=config.kme_b_id,
            peer_kme_id=config.kme_a_id,
            local_saes=config.sae_b,
            remote_saes=config.sae_a,
            pool=self.pool,
            config=config,
            requests_total=requests_total,
        )
        self._runners: list[web.AppRunner] = []

    async def start(self) -> PairEndpoints:
        cfg = self.config
        ctx_a = server_ssl_context(cfg.ca_file, cfg.kme_a_cert, cfg.kme_a_key)
        ctx_b = server_ssl_context(cfg.ca_file, cfg.kme_b_cert, cfg.kme_b_key)
        admin = admin_app(self.pool, self.registry)
        admin_ctx: ssl.SSLContext | None = None
        if cfg.admin_mtls:
            admin_ctx = server_ssl_context(cfg.ca_file, cfg.kme_a_cert, cfg.kme_a_key)
            admin.middlewares.append(admin_mtls_middleware())
        port_a = await self._serve(self.kme_a.app(), cfg.host, cfg.port_a, ctx_a)
        port_b = await self._serve(self.kme_b.app(), cfg.host, cfg.port_b, ctx_b)
        # The switches and metrics have no SAE authentication: loopback only, always.
        port_admin = await self._serve(admin, "127.0.0.1", cfg.admin_port, admin_ctx)
        metrics_url = None
        if cfg.metrics_port is not None:
            port = await self._serve(
                metrics_app(self.registry), cfg.metrics_host, cfg.metrics_port, None
            )
            metrics_url = f"http://{_url_host(cfg.metrics_host)}:{port}"
        scheme = "https" if admin_ctx else "http"
        return PairEndpoints(
            kme_a_url=f"https://{_url_host(cfg.host)}:{port_a}",
            kme_b_url=f"https://{_url_host(cfg.host)}:{port_b}",
            admin_url=f"{scheme}://127.0.0.1:{port_admin}",
            metrics_url=metrics_url,
        )

    async def _serve(
        self, app: web.Application, host: str, port: int, ctx: ssl.SSLContext | None
    ) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        self._runners.append(runner)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
        site = web.SockSite(runner, sock, ssl_context=ctx)
        await site.start()
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        self.pool.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve_pair(
    config: KMEPairConfig,
    stop: asyncio.Event,
    on_ready: Callable[[PairEndpoints], None] | None = None,
) -> None:
    """Run both KMEs until ``stop`` is set, then close every listener (and the state dir)."""
    pair = KMEPair(config)
    try:
        endpoints = await pair.start()
        if on_ready is not None:
            on_ready(endpoints)
        await stop.wait()
    finally:
        await pair.stop()
