"""One contract suite for every key provider registered under ``fleetbus.key_providers``.

Providers are loaded by entry-point name through ``fleetbus.bus.registry``. ``oqs`` skips with
the detector's reason when liboqs is absent; ``qkd-etsi014`` uses the ``qkd_provider_sides``
fixture (a real ETSI 014 KME pair, from ``tests/support/fixtures_kme.py``).
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetbus.bus.errors import ConfigError, ReasonCode
from fleetbus.bus.keys import KeyProviderError, PrivateKeySet, RecipientKeys
from fleetbus.bus.registry import KEY_PROVIDER_GROUP, available, load_key_provider
from fleetbus.providers.oqs import liboqs_available
from tests.support.sides import ProviderSides

PROVIDERS = available(KEY_PROVIDER_GROUP)
# Parametrised from the registry: a new entry point is tested automatically. A provider with a
# recipient key pair (``traits.key_algorithm``) runs against itself; one that needs a server
# names its sides fixture here; an optional provider (not ``traits.default``) that cannot run
# here skips with its own reason (``oqs`` without liboqs).
#: Providers that need a server (no recipient key pair): the fixture that builds both sides.
SIDES_FIXTURES = {"qkd-etsi014": "qkd_provider_sides"}
QKD = "qkd-etsi014"
KEY_ID = "vehicle-0001/kem/1"
CONTEXT = b"fleetbus/v1 protected header of command 1"


def _kem_sides(name: str) -> ProviderSides:
    from fleetbus.bus.registry import key_provider_traits

    try:
        provider = load_key_provider(name)
    except ConfigError as exc:
        if key_provider_traits(name).default:
            raise  # a default provider must run everywhere
        pytest.skip(str(exc))
    assert provider.algorithm is not None
    private, public = provider.generate_keypair()
    alg = provider.algorithm
    return ProviderSides(
        sender=provider,
        receiver=provider,
        recipient=RecipientKeys("vehicle-0001", {alg: public}, {alg: KEY_ID}),
        own=PrivateKeySet("vehicle-0001", {alg: private}, {alg: KEY_ID}),
    )


@pytest.fixture(params=PROVIDERS)
def provider_sides(request: pytest.FixtureRequest) -> ProviderSides:
    name: str = request.param
    if name in SIDES_FIXTURES:
        try:
            sides = request.getfixturevalue(SIDES_FIXTURES[name])
        except pytest.FixtureLookupError:
            pytest.skip("qkd fixture not available yet")
        assert isinstance(sides, ProviderSides)
        return sides
    return _kem_sides(name)


def test_every_registered_provider_is_covered() -> None:
    from fleetbus.bus.registry import key_provider_traits

    assert set(available(KEY_PROVIDER_GROUP)) == set(PROVIDERS)
    for name in PROVIDERS:
        # Either it has a recipient key pair to run against itself, or a fixture builds it.
        assert key_provider_traits(name).key_algorithm is not None or name in SIDES_FIXTURES, name


def test_round_trip(provider_sides: ProviderSides) -> None:
    s = provider_sides
    enc = s.sender.establish(s.recipient, context=CONTEXT)
    assert enc.provider == s.sender.name
    assert len(enc.shared_secret) >= 32
    assert s.receiver.recover(enc.key_ref, enc.key_id, s.own, context=CONTEXT) == (
        enc.shared_secret
    )


def test_fresh_secret_and_ref_each_time(provider_sides: ProviderSides) -> None:
    s = provider_sides
    first = s.sender.establish(s.recipient, context=CONTEXT)
    second = s.sender.establish(s.recipient, context=CONTEXT)
    assert first.shared_secret != second.shared_secret
    assert first.key_ref != second.key_ref


def test_wrong_context_is_rejected(provider_sides: ProviderSides) -> None:
    s = provider_sides
    if s.sender.name == QKD:
        pytest.skip("a QKD key is bound only to its key_ID; the combiner binds the context")
    enc = s.sender.establish(s.recipient, context=CONTEXT)
    with pytest.raises(KeyProviderError) as info:
        s.receiver.recover(enc.key_ref, enc.key_id, s.own, context=CONTEXT + b"!")
    assert info.value.reason is ReasonCode.TAMPERED


@pytest.mark.parametrize("position", [0, -1, "middle"])
def test_tampered_key_ref(provider_sides: ProviderSides, position: int | str) -> None:
    s = provider_sides
    enc = s.sender.establish(s.recipient, context=CONTEXT)
    ref = bytearray(enc.key_ref)
    index = len(ref) // 2 if position == "middle" else int(position)
    ref[index] ^= 0x01
    with pytest.raises(KeyProviderError) as info:
        s.receiver.recover(bytes(ref), enc.key_id, s.own, context=CONTEXT)
    if s.sender.name == QKD:
        assert info.value.reason in {ReasonCode.UNKNOWN_KEY_ID, ReasonCode.MALFORMED}
    else:
        assert info.value.reason is ReasonCode.TAMPERED


def test_truncated_key_ref(provider_sides: ProviderSides) -> None:
    s = provider_sides
    enc = s.sender.establish(s.recipient, context=CONTEXT)
    for ref in (enc.key_ref[:-1], enc.key_ref[:1], b""):
        with pytest.raises(KeyProviderError) as info:
            s.receiver.recover(ref, enc.key_id, s.own, context=CONTEXT)
        assert info.value.reason in {
            ReasonCode.MALFORMED,
            ReasonCode.TAMPERED,
            ReasonCode.UNKNOWN_KEY_ID,
        }


def test_unknown_key_id(provider_sides: ProviderSides) -> None:
    s = provider_sides
    enc = s.sender.establish(s.recipient, context=CONTEXT)
    with pytest.raises(KeyProviderError) as info:
        s.receiver.recover(enc.key_ref, enc.key_id + "-other", s.own, context=CONTEXT)
    assert info.value.reason in {ReasonCode.UNKNOWN_KEY_ID, ReasonCode.MALFORMED}


def test_wrong_recipient_private_key(provider_sides: ProviderSides) -> None:
    s = provider_sides
    if s.receiver.algorithm is None:
        pytest.skip("no recipient key pair (QKD): a foreign SAE is covered by the KME tests")
    enc = s.sender.establish(s.recipient, context=CONTEXT)
    other_private, _ = s.receiver.generate_keypair()
    alg = s.receiver.algorithm
    stranger = dataclasses.replace(s.own, private_keys={**s.own.private_keys, alg: other_private})
    with pytest.raises(KeyProviderError) as info:
        s.receiver.recover(enc.key_ref, enc.key_id, stranger, context=CONTEXT)
    assert info.value.reason is ReasonCode.TAMPERED


def test_no_secret_in_reprs(provider_sides: ProviderSides) -> None:
    s = provider_sides
    enc = s.sender.establish(s.recipient, context=CONTEXT)
    secret_hex = enc.shared_secret.hex()
    for text in (repr(enc), str(enc), repr(s.own), repr(s.sender), repr(s.receiver)):
        assert secret_hex not in text
        assert enc.shared_secret.hex().upper() not in text
        for private in s.own.private_keys.values():
            assert private.hex() not in text


def test_errors_carry_no_secret(provider_sides: ProviderSides) -> None:
    s = provider_sides
    enc = s.sender.establish(s.recipient, context=CONTEXT)
    ref = bytearray(enc.key_ref)
    ref[-1] ^= 0xFF
    with pytest.raises(KeyProviderError) as info:
        s.receiver.recover(bytes(ref), enc.key_id, s.own, context=CONTEXT)
    assert enc.shared_secret.hex() not in str(info.value)


_PROPERTY = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_PROPERTY
@given(context=st.binary(max_size=256))
def test_property_round_trip(provider_sides: ProviderSides, context: bytes) -> None:
    s = provider_sides
    enc = s.sender.establish(s.recipient, context=context)
    assert s.receiver.recover(enc.key_ref, enc.key_id, s.own, context=context) == (
        enc.shared_secret
    )


@_PROPERTY
@given(junk=st.binary(max_size=2048), context=st.binary(max_size=64))
def test_property_random_refs_only_raise_key_provider_error(
    provider_sides: ProviderSides, junk: bytes, context: bytes
) -> None:
    s = provider_sides
    key_id = s.own.key_ids.get(s.receiver.algorithm or "", "")
    with pytest.raises(KeyProviderError) as info:  # anything else fails the test
        s.receiver.recover(junk, key_id, s.own, context=context)
    assert isinstance(info.value.reason, ReasonCode)


# -- oqs detection (runs whether or not liboqs is installed) ---------------------------------


def test_oqs_absent_is_a_clear_config_error_without_importing_oqs() -> None:
    ok, reason = liboqs_available()
    if ok:
        pytest.skip("liboqs is installed here")
    assert reason
    with pytest.raises(ConfigError, match="'oqs' is unavailable"):
        load_key_provider("oqs")
    assert "oqs" not in sys.modules  # importing it would try to build liboqs and exit


def test_oqs_detector_looks_for_the_shared_library(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_find_spec = importlib.util.find_spec

    def pretend_bindings(name: str, *args: Any) -> Any:
        if name == "oqs":
            return object()  # liboqs-python "installed"
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", pretend_bindings)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path / "oqs"))
    ok, reason = liboqs_available()
    assert not ok
    assert "shared library not found" in reason
    (tmp_path / "oqs" / "lib").mkdir(parents=True)
    (tmp_path / "oqs" / "lib" / "liboqs.so.0.14.0").write_bytes(b"")
    ok, reason = liboqs_available()
    assert ok
    assert str(tmp_path / "oqs" / "lib") in reason
