"""Finds key providers and signature suites by entry-point name, at start-up, never at import."""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.keys import KeyProvider, SignatureSuite

KEY_PROVIDER_GROUP = "fleetbus.key_providers"
SIGNER_GROUP = "fleetbus.signers"


@cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def available(group: str) -> list[str]:
    """The names registered in ``group``, sorted."""
    return sorted(_entry_points(group))


def _load(group: str, name: str) -> Any:
    eps = _entry_points(group)
    if name not in eps:
        raise ConfigError(
            f"no {group} entry point named {name!r}; available: {', '.join(sorted(eps)) or 'none'}"
        )
    return eps[name].load()


def load_key_provider(name: str, **config: Any) -> KeyProvider:
    """Instantiate the key provider registered as ``name`` with its ``config``."""
    cls = _load(KEY_PROVIDER_GROUP, name)
    provider = cls(**config)
    if not isinstance(provider, KeyProvider):
        raise ConfigError(f"entry point {name!r} is not a KeyProvider")
    return provider


def load_signature_suite(name: str) -> SignatureSuite:
    """Instantiate the signature suite registered as ``name``."""
    suite = _load(SIGNER_GROUP, name)()
    if not isinstance(suite, SignatureSuite):
        raise ConfigError(f"entry point {name!r} is not a SignatureSuite")
    return suite
