"""Every registered key provider declares what it is; every consumer gets the same answer.

The plugin model (docs/key-paths.md §0): a provider class carries ``traits`` (a frozen
``ProviderTraits``) and ``config_from_settings``; ``fleetbus.bus.registry`` reads both without
instantiating it, and the worker, the vehicle agent, the key directory, the CLI and the key-path
ordering ask the registry instead of keeping tables of their own.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetbus.bus.directory import FleetRoot, KeyDirectory, issue_key
from fleetbus.bus.directory import trust as directory_module
from fleetbus.bus.errors import ConfigError
from fleetbus.bus.keys import KeyPath, NoConfig, ProviderTraits
from fleetbus.bus.registry import (
    KEY_PROVIDER_GROUP,
    available,
    default_key_providers,
    is_kem_algorithm,
    kem_provider_for_algorithm,
    kem_providers,
    key_provider_class,
    key_provider_traits,
    load_key_providers,
)
from fleetbus.bus.settings import FleetbusSettings, ProfileSettings
from fleetbus.providers import oqs as oqs_module
from fleetbus.providers.keypath import is_at_least, path_strength

PROVIDERS = available(KEY_PROVIDER_GROUP)
REPO = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000.0


@pytest.mark.parametrize("name", PROVIDERS)
def test_every_provider_declares_its_own_traits(name: str) -> None:
    cls = key_provider_class(name)
    assert isinstance(cls.__dict__.get("traits"), ProviderTraits), f"{name} inherits its traits"
    assert cls.traits != ProviderTraits(), f"{name} declares no traits"
    assert cls.name == name
    # At least one thing it contributes to a key path.
    assert cls.traits.post_quantum_kem or cls.traits.classical_kem or cls.traits.qkd


@pytest.mark.parametrize("name", PROVIDERS)
def test_configuration_is_typed_and_read_without_instantiating(name: str) -> None:
    config = key_provider_class(name).config_from_settings(FleetbusSettings())
    assert config is None or dataclasses.is_dataclass(config)
    if key_provider_traits(name).default:
        assert isinstance(config, NoConfig), "a default provider needs nothing from the settings"


@pytest.mark.parametrize("name", PROVIDERS)
def test_key_path_ordering_reads_the_traits(name: str) -> None:
    traits = key_provider_traits(name)
    path = KeyPath((name,))
    assert (
        path_strength(path) == 4 * traits.qkd + 2 * traits.post_quantum_kem + traits.classical_kem
    )
    for part in traits.covers(name):
        assert is_at_least(path, KeyPath((part,)))


@pytest.mark.parametrize("name", PROVIDERS)
def test_directory_and_cli_read_the_traits(name: str) -> None:
    traits = key_provider_traits(name)
    if traits.key_algorithm is None:
        assert name not in kem_providers()
        return
    assert name in kem_providers()
    algorithm = traits.key_algorithm + (
        "FrodoKEM-640-AES" if traits.key_algorithm[-1] == ":" else ""
    )
    assert is_kem_algorithm(algorithm)
    assert kem_provider_for_algorithm(algorithm) == name


def test_the_declared_traits() -> None:
    """The answers, written down once (docs/key-paths.md §0 has the same table)."""
    table = {
        n: (t.post_quantum_kem, t.classical_kem, t.qkd, t.needs_sae_id, t.default)
        for n in PROVIDERS
        for t in [key_provider_traits(n)]
    }
    assert table == {
        "x25519": (False, True, False, False, True),
        "mlkem768": (True, False, False, False, True),
        "xwing": (True, True, False, False, True),
        "oqs": (True, False, False, False, False),
        "qkd-etsi014": (False, False, True, True, False),
    }
    # QKD is quantum-safe (no computational assumption) but not a post-quantum KEM: before the
    # traits, its class said post_quantum=True while the key-path table said it was not.
    assert key_provider_traits("qkd-etsi014").quantum_safe
    assert key_provider_traits("xwing").covers("xwing") == {"mlkem768", "x25519"}


def test_worker_and_agent_load_the_defaults_and_what_a_path_names() -> None:
    settings = FleetbusSettings()
    assert set(load_key_providers(settings)) == set(default_key_providers())
    # QKD is named by the default profiles but not configured here: not loaded.
    named = {"qkd-etsi014", "xwing", "not-registered"}
    assert set(load_key_providers(settings, named)) == {"x25519", "mlkem768", "xwing"}


def test_a_configured_qkd_provider_is_not_loaded_by_an_agent(tmp_path: Path) -> None:
    settings = FleetbusSettings(
        qkd_kme_url="https://kme.invalid:8443",
        qkd_kme_id="KME_A",
        qkd_ca_file=str(tmp_path / "ca.pem"),
        qkd_cert_file=str(tmp_path / "c.pem"),
        qkd_key_file=str(tmp_path / "k.pem"),
    )
    config = key_provider_class("qkd-etsi014").config_from_settings(settings)
    assert config is not None
    assert config.sae_id == settings.sealer_principal
    assert config.timeout_s == min(settings.provider_timeout_s, 5.0)
    # The agent brings its own SAE's provider (qkd_provider); the bus's settings never build it.
    assert "qkd-etsi014" not in load_key_providers(settings, {"qkd-etsi014"}, own_sae=False)


def test_oqs_named_by_a_key_path_is_chosen_and_fails_clearly_without_liboqs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the registry, no worker or agent ever loaded ``oqs``: a path naming it was
    silently unservable. Now it is loaded where a key path names it, and without liboqs the
    process stops with the detector's reason, without importing ``oqs`` (which would hang)."""
    monkeypatch.setattr(oqs_module, "liboqs_available", lambda: (False, "no liboqs here"))
    settings = FleetbusSettings(
        profiles={"frodo": ProfileSettings(key_paths=["oqs+xwing"], minimum_path="xwing")},
        profile_rules=[],
    )
    named = {n for spec in settings.profiles.values() for p in spec.key_paths for n in p.split("+")}
    with pytest.raises(ConfigError, match="'oqs' is unavailable: no liboqs here"):
        load_key_providers(settings, named)
    with pytest.raises(ConfigError, match="'oqs' is unavailable"):
        load_key_providers(settings, {"oqs"}, own_sae=False)
    assert "oqs" not in sys.modules
    # Not named: not loaded, nothing to fail.
    assert "oqs" not in load_key_providers(settings, {"xwing"})


class _FakeOQS:
    name = "oqs"
    algorithm = "oqs:FrodoKEM-640-AES"

    def generate_keypair(self) -> tuple[bytes, bytes]:
        return b"s" * 16, b"p" * 16


def test_directory_keeps_oqs_keys_and_counts_them_post_quantum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: ``keys issue --kem oqs`` was refused, an oqs key was dropped from
    ``recipient_keys`` and did not earn ``pqc`` (the directory kept its own KEM table)."""
    real = directory_module.load_key_provider

    def load(name: str, **config: Any) -> Any:
        return _FakeOQS() if name == "oqs" else real(name, **config)

    monkeypatch.setattr(directory_module, "load_key_provider", load)
    root = FleetRoot.generate()
    issued = issue_key(
        root,
        principal_id="veh-oqs",
        kind="vehicle",
        signature_suite="ed25519",
        kems=["x25519", "oqs"],
        not_before=T0,
        not_after=T0 + 3600,
    )
    assert "pqc" in issued.signed.record.capabilities
    directory = KeyDirectory(root.public)
    directory.ingest(issued.signed)
    keys = directory.recipient_keys("veh-oqs", at=T0 + 1)
    assert set(keys.public_keys) == {"x25519", "oqs:FrodoKEM-640-AES"}


def _provider_name_tables(tree: ast.AST, names: set[str]) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        elements: list[ast.expr | None] = []
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            elements = list(node.elts)
        elif isinstance(node, ast.Dict):
            elements = list(node.keys)
        found = {e.value for e in elements if isinstance(e, ast.Constant) and e.value in names}
        if len(found) >= 3:
            lines.append(node.lineno)
    return lines


def test_no_consumer_keeps_its_own_table_of_providers() -> None:
    """A literal listing three or more provider names is a table that can disagree with what
    the providers declare (as ``KEM_PROVIDERS``, ``DEFAULT_KEM_PROVIDERS`` and the key-path
    ``_PROPERTIES`` did). Two names (``kems=("xwing", "x25519")``) are a choice of keys, not a
    table."""
    names = set(PROVIDERS)
    offenders = []
    for folder in ("bus", "sdk", "cli", "processors", "providers", "devtools", "kmesim"):
        for path in sorted((REPO / folder).rglob("*.py")):
            lines = _provider_name_tables(ast.parse(path.read_text()), names)
            offenders += [f"{path.relative_to(REPO)}:{line}" for line in lines]
    assert offenders == []
