"""The ETSI GS QKD 014 (v1.1.1) HTTP API of one KME: status, enc_keys, dec_keys, with the
caller identified by its client certificate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from fleetbus.kmesim.config import API_PREFIX, MAX_BODY_BYTES, KMEPairConfig
from fleetbus.kmesim.errors import KMEBadRequest, KMEError, KMEUnauthorized, KMEUnavailable
from fleetbus.kmesim.pool import KeyPool
from fleetbus.kmesim.state import b64_text


def _json(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", charset="utf-8"
    )


def caller_sae_id(peercert: Mapping[str, Any] | None) -> str | None:
    """The SAE id of a verified TLS peer: its certificate's subject commonName."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                return str(value)
    return None


def _int_field(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KMEBadRequest(f"{name} must be an integer", [{"parameter": name}])
    return value


def _int_query(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        return int(raw, 10)
    except ValueError:
        raise KMEBadRequest(f"{name} must be an integer", [{"parameter": name}]) from None


async def json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise KMEBadRequest("request body is not JSON") from None
    if not isinstance(body, dict):
        raise KMEBadRequest("request body must be a JSON object")
    return body


class KMEService:
    """One KME: the SAEs attached to it, its peer, and the shared pool."""

    def __init__(
        self,
        *,
        kme_id: str,
        peer_kme_id: str,
        local_saes: Iterable[str],
        remote_saes: Iterable[str],
        pool: KeyPool,
        config: KMEPairConfig,
        requests_total: Counter | None = None,
    ) -> None:
        self.kme_id = kme_id
        self.peer_kme_id = peer_kme_id
        self.local_saes = frozenset(local_saes)
        self.remote_saes = frozenset(remote_saes)
        self.pool = pool
        self.config = config
        self._requests_total = requests_total

    # -- checks --------------------------------------------------------------------------

    def _caller(self, request: web.Request) -> str:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        sae = caller_sae_id(peercert)
        if sae is None or sae not in self.local_saes:
            raise KMEUnauthorized(
                f"client certificate does not name an SAE attached to {self.kme_id}"
            )
        return sae

    def _remote(self, sae_id: str, role: str) -> str:
        if sae_id not in self.remote_saes:
            raise KMEBadRequest(
                f"{role} SAE {sae_id!r} is not reachable over the link of {self.kme_id}",
                [{"parameter": f"{role}_SAE_ID"}],
            )
        return sae_id

    def _size(self, size: int | None) -> int:
        cfg = self.config
        size = cfg.key_size if size is None else size
        details = [{"parameter": "size", "value": size}]
        if size % 8:
            # The message is the one 014 clause 6.4 gives, word for word: clients match on it.
            raise KMEBadRequest("size shall be a multiple of 8", details)
        if not cfg.min_key_size <= size <= cfg.max_key_size:
            raise KMEBadRequest(
                f"size shall be between {cfg.min_key_size} and {cfg.max_key_size}", details
            )
        return size

    def _number(self, number: int | None) -> int:
        number = 1 if number is None else number
        if not 1 <= number <= self.config.max_key_per_request:
            raise KMEBadRequest(
                f"number must be between 1 and {self.config.max_key_per_request}",
                [{"parameter": "number", "value": number}],
            )
        return number

    async def _in_pool(
        self, operation: Callable[..., list[tuple[str, bytes]]], **kwargs: Any
    ) -> list[tuple[str, bytes]]:
        """Run a key hand-out. A durable pool writes its state file on every change (two
        fsyncs, 4-15 ms): that runs in a worker thread, so the event loop goes on serving other
        requests and /metrics meanwhile; the pool's lock orders the operations."""
        if self.pool.state_file is None:
            return operation(**kwargs)
        return await asyncio.to_thread(operation, **kwargs)

    # -- handlers ------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        master = self._caller(request)
        slave = self._remote(request.match_info["slave_SAE_ID"], "slave")
        if not self.pool.link_up:
            raise KMEUnavailable("QKD link down", [{"reason": "link_down", "kme": self.kme_id}])
        cfg = self.config
        return _json(
            {
                "source_KME_ID": self.kme_id,
                "target_KME_ID": self.peer_kme_id,
                "master_SAE_ID": master,
                "slave_SAE_ID": slave,
                "key_size": cfg.key_size,
                "stored_key_count": self.pool.stored_key_count(),
                "max_key_count": cfg.max_key_count,
                "max_key_per_request": cfg.max_key_per_request,
                "max_key_size": cfg.max_key_size,
                "min_key_size": cfg.min_key_size,
                "max_SAE_ID_count": 0,
            }
        )

    async def enc_keys(self, request: web.Request) -> web.Response:
        master = self._caller(request)
        slave = self._remote(request.match_info["slave_SAE_ID"], "slave")
        if request.method == "GET":
            number = _int_query(request.query, "number")
            size = _int_query(request.query, "size")
        else:
            body = await json_body(request)
            number = None if body.get("number") is None else _int_field(body["number"], "number")
            size = None if body.get("size") is None else _int_field(body["size"], "size")
            extra = body.get("additional_slave_SAE_IDs") or []
            if not isinstance(extra, list):
                raise KMEBadRequest("additional_slave_SAE_IDs must be an array")
            if extra:
                raise KMEBadRequest(
                    "key multicast is not supported (max_SAE_ID_count is 0)",
                    [{"parameter": "additional_slave_SAE_IDs"}],
                )
            mandatory = body.get("extension_mandatory") or []
            if not isinstance(mandatory, list):
                raise KMEBadRequest("extension_mandatory must be an array")
            if mandatory:
                names = sorted(str(k) for ext in mandatory if isinstance(ext, dict) for k in ext)
                raise KMEBadRequest(
                    "not all extension_mandatory parameters are supported",  # 014 clause 6.4
                    [{"extension_mandatory_unsupported": names}],
                )
            optional = body.get("extension_optional") or []
            if not isinstance(optional, list):
                raise KMEBadRequest("extension_optional must be an array")
            # Optional extensions may be ignored (014 clause 6.2); this KME supports none.
        keys = await self._in_pool(
            self.pool.reserve,
            source_kme=self.kme_id,
            target_kme=self.peer_kme_id,
            master=master,
            slave=slave,
            number=self._number(number),
            size_bits=self._size(size),
        )
        return _json({"keys": [{"key_ID": k, "key": b64_text(m)} for k, m in keys]})

    async def dec_keys(self, request: web.Request) -> web.Response:
        slave = self._caller(request)
        master = self._remote(request.match_info["master_SAE_ID"], "master")
        key_ids: list[str]
        if request.method == "GET":
            key_ids = request.query.getall("key_ID", [])
        else:
            body = await json_body(request)
            entries = body.get("key_IDs")
            if not isinstance(entries, list) or not entries:
                raise KMEBadRequest("key_IDs must be a non-empty array", [{"parameter": "key_IDs"}])
            key_ids = []
            for entry in entries:
                if not isinstance(entry, dict) or not isinstance(entry.get("key_ID"), str):
                    raise KMEBadRequest("each key_IDs entry needs a string key_ID")
                key_ids.append(entry["key_ID"])
        if not key_ids:
            raise KMEBadRequest("key_ID is required", [{"parameter": "key_ID"}])
        if len(key_ids) > self.config.max_key_per_request:
            raise KMEBadRequest(f"at most {self.config.max_key_per_request} key_IDs per request")
        keys = await self._in_pool(
            self.pool.deliver, target_kme=self.kme_id, master=master, slave=slave, key_ids=key_ids
        )
        return _json({"keys": [{"key_ID": k, "key": b64_text(m)} for k, m in keys]})

    # -- the application ----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors_middleware])
        app.router.add_get(API_PREFIX + "/{slave_SAE_ID}/status", self.status)
        app.router.add_route("GET", API_PREFIX + "/{slave_SAE_ID}/enc_keys", self.enc_keys)
        app.router.add_route("POST", API_PREFIX + "/{slave_SAE_ID}/enc_keys", self.enc_keys)
        app.router.add_route("GET", API_PREFIX + "/{master_SAE_ID}/dec_keys", self.dec_keys)
        app.router.add_route("POST", API_PREFIX + "/{master_SAE_ID}/dec_keys", self.dec_keys)
        return app

    @web.middleware
    async def _errors_middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        endpoint = request.path.rsplit("/", 1)[-1]
        if endpoint not in ("status", "enc_keys", "dec_keys"):
            endpoint = "other"
        try:
            response = await handler(request)
        except KMEError as exc:
            response = _json(exc.body(), exc.status)
        except web.HTTPException as exc:
            # 404 / 405 / 413 as 014 error bodies too, so clients parse one shape.
            response = _json({"message": exc.reason}, exc.status)
        if self._requests_total is not None:
            self._requests_total.labels(self.kme_id, endpoint, str(response.status)).inc()
        return response
