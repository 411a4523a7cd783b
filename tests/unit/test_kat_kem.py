"""Known-answer tests for the KEM key formats, from published vectors in tests/vectors/kem/.

- X-Wing: draft-connolly-cfrg-xwing-kem-10 Appendix C (seed -> public key, and decapsulation of
  the published ciphertext through our seed expansion) and Appendix D (X.509 example key).
- ML-KEM-768: the draft-ietf-lamps-kyber-certificates example key (seed 00..3f -> public key).
- DHKEM(X25519): RFC 9180 A.1.1 (skRm -> pkRm, skEm -> pkEm; the aad-less public HPKE API must
  not open the vector's ciphertext, which was sealed with aad "Count-0").
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from fleetbus.bus.keys import PrivateKeySet, RecipientKeys
from fleetbus.providers.hpke import (
    MLKEM768Provider,
    X25519Provider,
    XWingProvider,
    xwing_expand_seed,
)

VECTORS = Path(__file__).parent.parent / "vectors" / "kem"


def _json(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


XWING = _json("xwing.json")
MLKEM = _json("mlkem768.json")
RFC9180 = _json("rfc9180_a1.json")


@pytest.mark.parametrize("vector", XWING["vectors"], ids=lambda v: v["name"])
def test_xwing_seed_gives_published_public_key(vector: dict[str, Any]) -> None:
    seed = bytes.fromhex(vector["seed"])
    assert XWingProvider.public_from_seed(seed).hex() == vector["pk"]


@pytest.mark.parametrize("vector", XWING["vectors"], ids=lambda v: v["name"])
def test_xwing_expanded_key_decapsulates_published_ciphertext(vector: dict[str, Any]) -> None:
    # Only a check of our seed expansion: decapsulate the components and apply the draft's
    # combiner SHA3-256(ss_M || ss_X || ct_X || pk_X || label); sealing itself uses HPKE.
    mlkem_key, x25519_key = xwing_expand_seed(bytes.fromhex(vector["seed"]))
    ct = bytes.fromhex(vector["ct"])
    ss_m = mlkem_key.decapsulate(ct[:1088])
    ss_x = x25519_key.exchange(x25519.X25519PublicKey.from_public_bytes(ct[1088:]))
    pk_x = x25519_key.public_key().public_bytes_raw()
    label = bytes.fromhex(XWING["label"])
    ss = hashlib.sha3_256(ss_m + ss_x + ct[1088:] + pk_x + label).digest()
    assert ss.hex() == vector["ss"]


def test_xwing_x509_example_key() -> None:
    example = XWING["x509_example"]
    spki = base64.b64decode(example["spki_der_b64"])
    public = XWingProvider.public_from_seed(bytes.fromhex(example["seed"]))
    assert len(public) == 1216
    assert spki[-1216:] == public


def test_xwing_published_key_works_with_hpke_provider() -> None:
    vector = XWING["vectors"][0]
    provider = XWingProvider()
    recipient = RecipientKeys("v", {"xwing": bytes.fromhex(vector["pk"])}, {"xwing": "kid"})
    own = PrivateKeySet("v", {"xwing": bytes.fromhex(vector["seed"])}, {"xwing": "kid"})
    enc = provider.establish(recipient, context=b"kat")
    assert len(enc.key_ref) == hpke.KEM.MLKEM768_X25519.enc_length() + 32 + 16
    assert provider.recover(enc.key_ref, "kid", own, context=b"kat") == enc.shared_secret


@pytest.mark.parametrize("vector", MLKEM["vectors"], ids=lambda v: v["name"])
def test_mlkem768_seed_gives_published_public_key(vector: dict[str, Any]) -> None:
    key = mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes.fromhex(vector["seed"]))
    assert key.public_key().public_bytes_raw().hex() == vector["pk"]
    # And the provider's documented raw form is exactly that seed.
    provider = MLKEM768Provider()
    recipient = RecipientKeys("v", {"mlkem768": bytes.fromhex(vector["pk"])}, {"mlkem768": "k"})
    own = PrivateKeySet("v", {"mlkem768": bytes.fromhex(vector["seed"])}, {"mlkem768": "k"})
    enc = provider.establish(recipient, context=b"kat")
    assert provider.recover(enc.key_ref, "k", own, context=b"kat") == enc.shared_secret


def test_rfc9180_a1_key_pairs() -> None:
    for sk_name, pk_name in (("skRm", "pkRm"), ("skEm", "pkEm")):
        key = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(RFC9180[sk_name]))
        assert key.public_key().public_bytes_raw().hex() == RFC9180[pk_name]
    assert RFC9180["enc"] == RFC9180["pkEm"]


def test_rfc9180_a1_ciphertext_needs_its_aad() -> None:
    # The public single-shot API has no aad; the vector's first ciphertext used aad "Count-0",
    # so opening it with the right key and info must still fail. (We avoid private APIs.)
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
    sk = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(RFC9180["skRm"]))
    first = RFC9180["encryptions"][0]
    assert first["aad"] != ""
    sealed = bytes.fromhex(RFC9180["enc"]) + bytes.fromhex(first["ct"])
    with pytest.raises(InvalidTag):
        suite.decrypt(sealed, sk, bytes.fromhex(RFC9180["info"]))


def test_rfc9180_a1_recipient_key_with_x25519_provider() -> None:
    provider = X25519Provider()
    recipient = RecipientKeys("v", {"x25519": bytes.fromhex(RFC9180["pkRm"])}, {"x25519": "k"})
    own = PrivateKeySet("v", {"x25519": bytes.fromhex(RFC9180["skRm"])}, {"x25519": "k"})
    enc = provider.establish(recipient, context=b"kat")
    assert enc.key_ref[:32] != bytes.fromhex(RFC9180["enc"])  # fresh ephemeral per call
    assert provider.recover(enc.key_ref, "k", own, context=b"kat") == enc.shared_secret
