"""fleetbus.kmesim: an ETSI GS QKD 014 key server (KME) simulator and its throw-away test PKI.

A server, not a key provider: the ``qkd-etsi014`` provider (``fleetbus.providers.qkd``) is its
client. The demo, the compose stack and the tests run it; a real deployment points the provider
at real KMEs instead.
"""

import importlib as _importlib
import typing as _typing

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


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
