"""The simulator's admin endpoint (link, eavesdropper, key rate, flush, reset switches) and its
Prometheus metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetbus.kmesim.api import _json, caller_sae_id, json_body
from fleetbus.kmesim.config import ADMIN_CN, MAX_BODY_BYTES
from fleetbus.kmesim.errors import KMEError
from fleetbus.kmesim.pool import KeyPool


class PairCollector(Collector):
    """Reads the pool at scrape time, so gauges are never stale."""

    def __init__(self, pool: KeyPool, kme_ids: Sequence[str]) -> None:
        self._pool = pool
        self._kme_ids = tuple(kme_ids)

    def collect(self) -> Iterable[Metric]:
        pool = self._pool
        yield GaugeMetricFamily(
            "fleetbus_qkd_key_pool_keys",
            "Unreserved keys of the default size in the simulated link's key pool.",
            value=pool.stored_key_count(),
        )
        yield GaugeMetricFamily(
            "fleetbus_qkd_key_pool_capacity_keys",
            "Bound of the key pool (014 max_key_count).",
            value=pool.max_key_count,
        )
        yield GaugeMetricFamily(
            "fleetbus_qkd_key_reserved_keys",
            "Keys handed to a master SAE and not yet fetched by the slave SAE.",
            value=pool.reserved_key_count(),
        )
        yield GaugeMetricFamily(
            # Prometheus base unit: bytes (promtool check metrics refuses bits).
            "fleetbus_qkd_key_rate_bytes_per_second",
            "Current secret key rate of the link in bytes per second (0 while down or above "
            "the QBER threshold).",
            value=pool.key_rate_bps / 8 if pool.generating else 0.0,
        )
        yield GaugeMetricFamily(
            "fleetbus_qkd_link_up", "1 while the simulated QKD link is up.", value=pool.link_up
        )
        yield GaugeMetricFamily(
            "fleetbus_qkd_qber", "Quantum bit error rate of the link (ratio).", value=pool.qber
        )
        yield GaugeMetricFamily(
            "fleetbus_qkd_qber_threshold",
            "QBER above which key generation stops (ratio).",
            value=pool.qber_threshold,
        )
        delivered = CounterMetricFamily(
            "fleetbus_qkd_keys_delivered",
            "Keys handed to SAEs, by KME (enc_keys on the master side, dec_keys on the slave).",
            labels=["kme"],
        )
        for kme in self._kme_ids:
            delivered.add_metric([kme], pool.delivered.get(kme, 0))
        yield delivered


async def _admin_json(request: web.Request) -> dict[str, Any]:
    try:
        return await json_body(request)
    except KMEError as exc:
        raise web.HTTPBadRequest(text=exc.message) from None


def _admin_bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if not isinstance(value, bool):
        raise web.HTTPBadRequest(text=f'expected {{"{name}": true|false}}')
    return value


def admin_app(pool: KeyPool, registry: CollectorRegistry) -> web.Application:
    """The loopback-only control plane: link and eavesdropper switches, state, /metrics."""

    async def state(_: web.Request) -> web.Response:
        return _json(pool.snapshot())

    async def link(request: web.Request) -> web.Response:
        pool.set_link(_admin_bool(await _admin_json(request), "up"))
        return _json(pool.snapshot())

    async def eavesdropper(request: web.Request) -> web.Response:
        pool.set_eavesdropper(_admin_bool(await _admin_json(request), "on"))
        return _json(pool.snapshot())

    async def key_rate(request: web.Request) -> web.Response:
        value = (await _admin_json(request)).get("bits_per_second")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise web.HTTPBadRequest(text='expected {"bits_per_second": number >= 0}')
        pool.set_key_rate(float(value))
        return _json(pool.snapshot())

    async def flush(_: web.Request) -> web.Response:
        pool.flush()
        return _json(pool.snapshot())

    async def reset(_: web.Request) -> web.Response:
        pool.reset()
        return _json(pool.snapshot())

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/admin/state", state)
    app.router.add_post("/admin/link", link)
    app.router.add_post("/admin/eavesdropper", eavesdropper)
    app.router.add_post("/admin/key-rate", key_rate)
    app.router.add_post("/admin/flush", flush)
    app.router.add_post("/admin/reset", reset)
    app.router.add_get("/metrics", metrics)
    return app


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """The metrics-only listener: ``GET /metrics`` and nothing else (404), no switches, so it
    may bind to a non-loopback address for Prometheus while the admin listener stays local."""

    async def only_metrics(request: web.Request) -> web.Response:
        if request.path != "/metrics" or request.method not in ("GET", "HEAD"):
            raise web.HTTPNotFound()
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_route("*", "/{tail:.*}", only_metrics)
    return app


def admin_mtls_middleware() -> Any:
    @web.middleware
    async def check(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        if caller_sae_id(peercert) != ADMIN_CN:
            raise web.HTTPUnauthorized(text=f"admin needs a client certificate with CN {ADMIN_CN}")
        return await handler(request)

    return check
