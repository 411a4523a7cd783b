"""fleetbus.kmesim: an ETSI GS QKD 014 key server (KME) simulator.

A server, not a key provider: the ``qkd-etsi014`` provider (``fleetbus.providers.qkd``) is its
client. The demo, the compose stack and the tests run it; a real deployment points the provider
at real KMEs instead. Its throw-away test PKI (``fleetbus kme certs``) is dev tooling:
``fleetbus.devtools.kme_pki``.
"""

import typing as _typing

from fleetbus.bus.exports import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from fleetbus.kmesim.server import KeyPool, KMEPairConfig, serve_pair

__all__ = [
    "KMEPairConfig",
    "KeyPool",
    "serve_pair",
]

#: Where each public name lives; imported on first use (PEP 562).
_MODULE_OF: dict[str, str] = {
    "KMEPairConfig": "fleetbus.kmesim.server",
    "KeyPool": "fleetbus.kmesim.server",
    "serve_pair": "fleetbus.kmesim.server",
}

__getattr__, __dir__ = _lazy_exports(__name__, _MODULE_OF)
