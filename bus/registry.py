"""Finds key providers and signature suites by entry-point name, at start-up, never at import.

A key provider class declares its ``traits`` and its ``config_from_settings``; this module
answers both from the class, without instantiating it, for every consumer (docs/key-paths.md §0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.keys import KeyProvider, ProviderTraits, SignatureSuite

if TYPE_CHECKING:
    from fleetbus.bus.settings import FleetbusSettings

__all__ = [
    "KEY_PROVIDER_GROUP",
    "SIGNER_GROUP",
    "available",
    "configure_key_provider",
    "default_key_providers",
    "is_kem_algorithm",
    "kem_provider_for_algorithm",
    "kem_providers",
    "key_provider_class",
    "key_provider_traits",
    "load_key_provider",
    "load_key_providers",
    "load_signature_suite",
    "provider_traits_or_none",
]

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


@cache
def key_provider_class(name: str) -> type[KeyProvider]:
    """The class registered as ``name`` (imports its module, instantiates nothing)."""
    cls = _load(KEY_PROVIDER_GROUP, name)
    if not (isinstance(cls, type) and issubclass(cls, KeyProvider)):
        raise ConfigError(f"entry point {name!r} is not a KeyProvider")
    return cls


def key_provider_traits(name: str) -> ProviderTraits:
    """The traits the provider registered as ``name`` declares; ConfigError if none is."""
    return key_provider_class(name).traits


def provider_traits_or_none(name: str) -> ProviderTraits | None:
    """The traits of ``name`` when it is registered, else None (an unknown or in-process name)."""
    if name not in _entry_points(KEY_PROVIDER_GROUP):
        return None
    return key_provider_traits(name)


def default_key_providers() -> list[str]:
    """Providers every worker and agent loads without a key path naming them, sorted."""
    return [n for n in available(KEY_PROVIDER_GROUP) if key_provider_traits(n).default]


def kem_providers() -> list[str]:
    """Providers with a recipient key pair in the key directory (``keys issue --kem``), sorted."""
    return [n for n in available(KEY_PROVIDER_GROUP) if key_provider_traits(n).key_algorithm]


@cache
def kem_provider_for_algorithm(algorithm: str) -> str | None:
    """The provider whose recipient key is a directory key of ``algorithm``, or None."""
    for name in available(KEY_PROVIDER_GROUP):
        if key_provider_traits(name).owns_algorithm(algorithm):
            return name
    return None


def is_kem_algorithm(algorithm: str) -> bool:
    """Whether a directory key of ``algorithm`` is some provider's recipient (KEM) key."""
    return kem_provider_for_algorithm(algorithm) is not None


def load_key_provider(name: str, **config: Any) -> KeyProvider:
    """Instantiate the key provider registered as ``name`` with its ``config``."""
    provider = key_provider_class(name)(**config)
    if not isinstance(provider, KeyProvider):
        raise ConfigError(f"entry point {name!r} is not a KeyProvider")
    return provider


def configure_key_provider(name: str, settings: FleetbusSettings) -> KeyProvider | None:
    """The provider ``name`` built from its own typed configuration, or None when the settings
    do not configure it. A provider that is configured but cannot run raises (ConfigError)."""
    config = key_provider_class(name).config_from_settings(settings)
    if config is None:
        return None
    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return load_key_provider(name, **kwargs)


def load_key_providers(
    settings: FleetbusSettings, named: Iterable[str] = (), *, own_sae: bool = True
) -> dict[str, KeyProvider]:
    """The providers a process loads: the defaults plus every registered provider ``named``
    (by a key path) that the settings configure. ``own_sae`` False leaves out providers that
    speak for one SAE (the agent brings its own). Unregistered names are left to the caller's
    own checks (``servable_profiles`` logs them), as unconfigured ones are."""
    wanted = set(default_key_providers())
    wanted.update(n for n in named if n in _entry_points(KEY_PROVIDER_GROUP))
    providers: dict[str, KeyProvider] = {}
    for name in sorted(wanted):
        if not own_sae and key_provider_traits(name).needs_sae_id:
            continue
        provider = configure_key_provider(name, settings)
        if provider is not None:
            providers[name] = provider
    return providers


def load_signature_suite(name: str) -> SignatureSuite:
    """Instantiate the signature suite registered as ``name``."""
    suite = _load(SIGNER_GROUP, name)()
    if not isinstance(suite, SignatureSuite):
        raise ConfigError(f"entry point {name!r} is not a SignatureSuite")
    return suite
