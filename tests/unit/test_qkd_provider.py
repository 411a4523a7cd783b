"""The qkd-etsi014 provider without a KME: the key_ID pattern, the KME ID it requires and reads
from a certificate, and how it maps 014 error codes to reasons. Over TLS: tests/integration."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import KeyProviderError, PrivateKeySet
from fleetbus.devtools.kme_pki import TestPKI
from fleetbus.providers.qkd import QKDProvider, kme_id_of_certificate


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def provider(pki: TestPKI, **overrides: Any) -> QKDProvider:
    pair = pki.saes["sae-edge-1"]
    kwargs: dict[str, Any] = {
        # Nothing listens there: a test that reached the network would fail as qkd_unavailable.
        "kme_url": f"https://127.0.0.1:{closed_port()}",
        "kme_id": "KME-B",
        "sae_id": "sae-edge-1",
        "master_sae_id": "sae-hub",
        "ca_file": pki.ca_cert,
        "cert_file": pair.cert,
        "key_file": pair.key,
    }
    kwargs.update(overrides)
    return QKDProvider(**kwargs)


@pytest.mark.parametrize("key_id", ["abc\n", "abc\r\n", "\nabc", "a" * 128 + "\n", "a b", ""])
def test_a_key_id_must_match_the_pattern_in_full(kme_pki: TestPKI, key_id: str) -> None:
    with pytest.raises(KeyProviderError) as err:
        provider(kme_pki).recover(key_id.encode(), "", PrivateKeySet("edge", {}), context=b"")
    assert err.value.reason is ReasonCode.MALFORMED
    container = {"keys": [{"key_ID": key_id, "key": "AAAA"}]}
    with pytest.raises(KeyProviderError, match="no usable key_ID"):
        QKDProvider._one_key(container, None, 24)


def test_a_printable_key_id_of_up_to_128_characters_is_accepted() -> None:
    container = {"keys": [{"key_ID": "k" * 128, "key": "AAAA"}]}
    assert QKDProvider._one_key(container, None, 24) == ("k" * 128, b"\0\0\0")


@pytest.mark.parametrize("kme_id", [None, ""])
def test_without_a_kme_id_the_provider_refuses_to_start(kme_pki: TestPKI, kme_id: Any) -> None:
    with pytest.raises(KeyProviderError, match="kme_id is required") as err:
        provider(kme_pki, kme_id=kme_id)
    assert err.value.reason is ReasonCode.CONFIG


@pytest.mark.parametrize(
    ("operation", "status", "reason"),
    [
        ("dec_keys", 401, ReasonCode.UNKNOWN_KEY_ID),  # not the key's slave (014 Table 7)
        ("dec_keys", 400, ReasonCode.UNKNOWN_KEY_ID),
        ("enc_keys", 401, ReasonCode.CONFIG),  # this SAE is not attached to that KME
        ("status", 401, ReasonCode.CONFIG),
        ("enc_keys", 400, ReasonCode.CONFIG),
        ("dec_keys", 503, ReasonCode.QKD_UNAVAILABLE),
        ("dec_keys", 500, ReasonCode.KEY_PROVIDER_FAILED),
    ],
)
def test_014_error_codes_map_to_reasons(
    kme_pki: TestPKI, operation: str, status: int, reason: ReasonCode
) -> None:
    err = provider(kme_pki)._fail(status, {"message": "refused"}, operation)
    assert err.reason is reason
    assert f"HTTP {status}" in str(err)


def _cert(*common_names: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names])
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_the_kme_id_is_the_one_subject_common_name(kme_pki: TestPKI) -> None:
    a = x509.load_pem_x509_certificate(kme_pki.kmes["kme-a"].cert.read_bytes())
    b = x509.load_pem_x509_certificate(kme_pki.kmes["kme-b"].cert.read_bytes())
    assert kme_id_of_certificate(a) == "KME-A"
    assert kme_id_of_certificate(b) == "KME-B"
    assert kme_id_of_certificate(a.public_bytes(Encoding.DER)) == "KME-A"
    assert kme_id_of_certificate(_cert("KME-A", "KME-B")) is None  # ambiguous: names none
    assert kme_id_of_certificate(_cert()) is None
    assert kme_id_of_certificate(b"not DER") is None
