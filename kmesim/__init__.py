"""fleetbus.kmesim: an ETSI GS QKD 014 key server (KME) simulator and its throw-away test PKI.

A server, not a key provider: the ``qkd-etsi014`` provider (``fleetbus.providers.qkd``) is its
client. The demo, the compose stack and the tests run it; a real deployment points the provider
at real KMEs instead.
"""

import typing as _typing

from fleetbus.bus.exports import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from fleetbus.kmesim.pki import make_test_pki
    from fleetbus.kmesim.server import KeyPool, KMEPairConfig, serve_pair

__all__ = [
    "KMEPairConfig",
    "KeyPool",
    "make_test_pki",
    "serve_pair",
]

#: Where each public name lives; imported on first use (PEP 562).
_MODULE_OF: dict[str, str] = {
    "make_test_pki": "fleetbus.kmesim.pki",
    "KMEPairConfig": "fleetbus.kmesim.server",
    "KeyPool": "fleetbus.kmesim.server",
    "serve_pair": "fleetbus.kmesim.server",
}

__getattr__, __dir__ = _lazy_exports(__name__, _MODULE_OF)
