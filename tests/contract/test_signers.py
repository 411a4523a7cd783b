"""One contract suite for every signature suite registered under ``fleetbus.signers``.

Known-answer vectors live in tests/vectors/sig/ and say where they come from.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetbus.bus.keys import SignatureSuite
from fleetbus.bus.registry import SIGNER_GROUP, available, load_signature_suite
from fleetbus.providers import signers

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "sig"
SUITES = available(SIGNER_GROUP)
COMPOSITE = "composite-mldsa65-ed25519"
MESSAGE = b"open door 3 of vehicle VIN-0001"


def _vector(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def _b64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def test_all_declared_suites_are_registered() -> None:
    assert set(SUITES) >= {"ed25519", "mldsa65", COMPOSITE}


@pytest.fixture(scope="module", params=SUITES)
def suite(request: pytest.FixtureRequest) -> SignatureSuite:
    loaded = load_signature_suite(request.param)
    assert loaded.name == request.param
    return loaded


@pytest.fixture(scope="module")
def keys(suite: SignatureSuite) -> tuple[dict[str, bytes], dict[str, bytes]]:
    return suite.generate()


@pytest.fixture(scope="module")
def signature(suite: SignatureSuite, keys: tuple[dict[str, bytes], dict[str, bytes]]) -> bytes:
    return suite.signer(keys[0], "kid-test").sign(MESSAGE)


def test_round_trip(
    suite: SignatureSuite, keys: tuple[dict[str, bytes], dict[str, bytes]], signature: bytes
) -> None:
    signer = suite.signer(keys[0], "kid-test")
    assert signer.suite == suite.name
    assert signer.key_id == "kid-test"
    verifier = suite.verifier(keys[1])
    assert verifier.suite == suite.name
    assert verifier.verify(MESSAGE, signature) is True
    assert verifier.verify(b"", signer.sign(b"")) is True


def test_wrong_message_fails(
    suite: SignatureSuite, keys: tuple[dict[str, bytes], dict[str, bytes]], signature: bytes
) -> None:
    verifier = suite.verifier(keys[1])
    assert verifier.verify(MESSAGE + b"!", signature) is False
    assert verifier.verify(MESSAGE[:-1], signature) is False
    assert verifier.verify(b"", signature) is False


@pytest.mark.parametrize("position", [0, 1, 31, 32, 63, -64, -33, -32, -1])
def test_flipped_bit_fails(
    suite: SignatureSuite,
    keys: tuple[dict[str, bytes], dict[str, bytes]],
    signature: bytes,
    position: int,
) -> None:
    tampered = bytearray(signature)
    tampered[position] ^= 0x01
    assert suite.verifier(keys[1]).verify(MESSAGE, bytes(tampered)) is False


def test_flipped_bit_in_message_fails(
    suite: SignatureSuite, keys: tuple[dict[str, bytes], dict[str, bytes]], signature: bytes
) -> None:
    message = bytearray(MESSAGE)
    message[5] ^= 0x80
    assert suite.verifier(keys[1]).verify(bytes(message), signature) is False


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda s: b"", id="empty"),
        pytest.param(lambda s: s[:-1], id="truncated-by-one"),
        pytest.param(lambda s: s[: len(s) // 2], id="truncated-half"),
        pytest.param(lambda s: s + b"\x00", id="extended"),
        pytest.param(lambda s: bytes(len(s)), id="zeros"),
        pytest.param(lambda s: b"\xff" * len(s), id="ones"),
        pytest.param(lambda s: b"garbage", id="garbage"),
    ],
)
def test_bad_signature_returns_false(
    suite: SignatureSuite,
    keys: tuple[dict[str, bytes], dict[str, bytes]],
    signature: bytes,
    mangle: Any,
) -> None:
    assert suite.verifier(keys[1]).verify(MESSAGE, mangle(signature)) is False


def test_non_bytes_input_returns_false(
    suite: SignatureSuite, keys: tuple[dict[str, bytes], dict[str, bytes]], signature: bytes
) -> None:
    verifier = suite.verifier(keys[1])
    assert verifier.verify(MESSAGE, None) is False  # type: ignore[arg-type]
    assert verifier.verify("text", signature) is False  # type: ignore[arg-type]


def test_other_key_fails(suite: SignatureSuite, signature: bytes) -> None:
    _, other_public = suite.generate()
    assert suite.verifier(other_public).verify(MESSAGE, signature) is False


def test_keys_round_trip_through_bytes(
    suite: SignatureSuite, keys: tuple[dict[str, bytes], dict[str, bytes]]
) -> None:
    private, public = keys
    copied_private = {alg: bytes(bytearray(raw)) for alg, raw in private.items()}
    copied_public = {alg: bytes(bytearray(raw)) for alg, raw in public.items()}
    assert set(private) == set(public)
    signature = suite.signer(copied_private, "kid-copy").sign(MESSAGE)
    assert suite.verifier(copied_public).verify(MESSAGE, signature) is True
    assert suite.verifier(public).verify(MESSAGE, signature) is True


def test_signer_repr_shows_no_key_material(
    suite: SignatureSuite, keys: tuple[dict[str, bytes], dict[str, bytes]]
) -> None:
    signer = suite.signer(keys[0], "kid-repr")
    text = repr(signer) + str(signer)
    assert "kid-repr" in text
    for raw in keys[0].values():
        assert raw.hex() not in text
        assert base64.b64encode(raw).decode() not in text
        assert repr(raw) not in text


def test_signer_rejects_wrong_key_lengths(
    suite: SignatureSuite, keys: tuple[dict[str, bytes], dict[str, bytes]]
) -> None:
    from fleetbus.bus.errors import FleetbusError, ReasonCode

    for alg in keys[0]:
        broken = dict(keys[0])
        broken[alg] = broken[alg][:-1]
        with pytest.raises(FleetbusError) as excinfo:
            suite.signer(broken, "kid")
        assert excinfo.value.reason is ReasonCode.MALFORMED
        assert broken[alg].hex() not in str(excinfo.value)
    for alg in keys[1]:
        broken = dict(keys[1])
        del broken[alg]
        with pytest.raises(FleetbusError):
            suite.verifier(broken)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(message=st.binary(max_size=64), garbage=st.binary(max_size=4000))
def test_verify_never_raises_on_random_bytes(
    suite: SignatureSuite,
    keys: tuple[dict[str, bytes], dict[str, bytes]],
    message: bytes,
    garbage: bytes,
) -> None:
    assert suite.verifier(keys[1]).verify(message, garbage) is False


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_verify_never_raises_on_right_sized_random_bytes(
    suite: SignatureSuite,
    keys: tuple[dict[str, bytes], dict[str, bytes]],
    signature: bytes,
    data: st.DataObject,
) -> None:
    garbage = data.draw(st.binary(min_size=len(signature), max_size=len(signature)))
    assert suite.verifier(keys[1]).verify(MESSAGE, garbage) is (garbage == signature)


# --- composite-specific: both halves must verify ------------------------------------------

SPLIT = signers.MLDSA65_SIGNATURE_SIZE


@pytest.fixture(scope="module")
def composite() -> SignatureSuite:
    return load_signature_suite(COMPOSITE)


@pytest.fixture(scope="module")
def composite_keys(composite: SignatureSuite) -> tuple[dict[str, bytes], dict[str, bytes]]:
    return composite.generate()


@pytest.fixture(scope="module")
def composite_sig(
    composite: SignatureSuite, composite_keys: tuple[dict[str, bytes], dict[str, bytes]]
) -> bytes:
    sig = composite.signer(composite_keys[0], "kid").sign(MESSAGE)
    assert len(sig) == signers.COMPOSITE_SIGNATURE_SIZE == 3373
    return sig


def test_composite_parts_alone_fail(
    composite: SignatureSuite,
    composite_keys: tuple[dict[str, bytes], dict[str, bytes]],
    composite_sig: bytes,
) -> None:
    verifier = composite.verifier(composite_keys[1])
    mldsa_part, ed_part = composite_sig[:SPLIT], composite_sig[SPLIT:]
    assert verifier.verify(MESSAGE, mldsa_part) is False
    assert verifier.verify(MESSAGE, ed_part) is False
    assert verifier.verify(MESSAGE, ed_part + mldsa_part) is False  # swapped
    assert verifier.verify(MESSAGE, mldsa_part + bytes(64)) is False  # Ed25519 part stripped
    assert verifier.verify(MESSAGE, bytes(SPLIT) + ed_part) is False  # ML-DSA part stripped


def test_composite_with_one_half_from_another_valid_signature_fails(
    composite: SignatureSuite,
    composite_keys: tuple[dict[str, bytes], dict[str, bytes]],
    composite_sig: bytes,
) -> None:
    verifier = composite.verifier(composite_keys[1])
    signer = composite.signer(composite_keys[0], "kid")
    other_message = signer.sign(b"another command")
    assert verifier.verify(b"another command", other_message) is True
    # Halves from a valid signature of a different message.
    assert verifier.verify(MESSAGE, composite_sig[:SPLIT] + other_message[SPLIT:]) is False
    assert verifier.verify(MESSAGE, other_message[:SPLIT] + composite_sig[SPLIT:]) is False
    # Halves from a valid signature by another composite key over the same message.
    other_private, _ = composite.generate()
    other_key = composite.signer(other_private, "other").sign(MESSAGE)
    assert verifier.verify(MESSAGE, composite_sig[:SPLIT] + other_key[SPLIT:]) is False
    assert verifier.verify(MESSAGE, other_key[:SPLIT] + composite_sig[SPLIT:]) is False
    # A fresh ML-DSA half of the same message (ML-DSA is randomized) does verify together.
    again = signer.sign(MESSAGE)
    assert again[:SPLIT] != composite_sig[:SPLIT]
    assert verifier.verify(MESSAGE, again[:SPLIT] + composite_sig[SPLIT:]) is True


def test_composite_components_are_not_standalone_signatures(
    composite: SignatureSuite,
    composite_keys: tuple[dict[str, bytes], dict[str, bytes]],
    composite_sig: bytes,
) -> None:
    """Stripping the composite leaves halves that plain Ed25519 / ML-DSA verifiers reject."""
    ed = load_signature_suite("ed25519").verifier(composite_keys[1])
    ml = load_signature_suite("mldsa65").verifier(composite_keys[1])
    assert ed.verify(MESSAGE, composite_sig[SPLIT:]) is False
    assert ml.verify(MESSAGE, composite_sig[:SPLIT]) is False


def test_component_signatures_do_not_pass_as_composite(
    composite: SignatureSuite, composite_keys: tuple[dict[str, bytes], dict[str, bytes]]
) -> None:
    ed_sig = load_signature_suite("ed25519").signer(composite_keys[0], "k").sign(MESSAGE)
    ml_sig = load_signature_suite("mldsa65").signer(composite_keys[0], "k").sign(MESSAGE)
    assert composite.verifier(composite_keys[1]).verify(MESSAGE, ml_sig + ed_sig) is False


# --- known-answer tests --------------------------------------------------------------------


@pytest.mark.parametrize(
    "vector", _vector("ed25519_rfc8032.json")["vectors"], ids=lambda v: v["name"]
)
def test_ed25519_rfc8032(vector: dict[str, str]) -> None:
    suite = load_signature_suite("ed25519")
    private = {"ed25519": bytes.fromhex(vector["secret_key"])}
    public = {"ed25519": bytes.fromhex(vector["public_key"])}
    message = bytes.fromhex(vector["message"])
    expected = bytes.fromhex(vector["signature"])
    assert suite.signer(private, "rfc8032").sign(message) == expected
    assert suite.verifier(public).verify(message, expected) is True
    assert suite.verifier(public).verify(message + b"\x00", expected) is False


def test_mldsa65_keygen_from_published_seed() -> None:
    from cryptography.hazmat.primitives.asymmetric import mldsa

    vector = _vector("mldsa65_lamps.json")
    key = mldsa.MLDSA65PrivateKey.from_seed_bytes(_b64(vector["sk"]))
    assert key.public_key().public_bytes_raw() == _b64(vector["pk"])


def test_mldsa65_verifies_published_signature() -> None:
    vector = _vector("mldsa65_lamps.json")
    verifier = load_signature_suite("mldsa65").verifier({"mldsa65": _b64(vector["pk"])})
    message, sig = _b64(vector["m"]), _b64(vector["s"])
    assert verifier.verify(message, sig) is True
    assert verifier.verify(message + b".", sig) is False


def test_mldsa65_signer_from_published_seed_signs_verifiably() -> None:
    vector = _vector("mldsa65_lamps.json")
    suite = load_signature_suite("mldsa65")
    signer = suite.signer({"mldsa65": _b64(vector["sk"])}, "lamps")
    sig = signer.sign(MESSAGE)
    assert suite.verifier({"mldsa65": _b64(vector["pk"])}).verify(MESSAGE, sig) is True


def test_composite_message_representative_matches_draft_example() -> None:
    vector = _vector("composite_message_representative_lamps.json")
    assert bytes.fromhex(vector["prefix"]) == signers.COMPOSITE_PREFIX
    got = signers.composite_message_representative(
        bytes.fromhex(vector["m"]), bytes.fromhex(vector["ctx"]), label=vector["label"].encode()
    )
    assert got.hex() == vector["m_prime"]


def test_composite_label_and_representative_layout() -> None:
    assert signers.COMPOSITE_LABEL == b"COMPSIG-MLDSA65-Ed25519-SHA512"
    rep = signers.composite_message_representative(b"abc")
    assert rep.startswith(b"CompositeAlgorithmSignatures2025COMPSIG-MLDSA65-Ed25519-SHA512\x00")
    assert len(rep) == 32 + 30 + 1 + 64


def test_composite_key_layout_from_draft_vector() -> None:
    """The draft's sk (seed || ed25519 sk) yields its pk (mldsa pk || ed25519 pk)."""
    vector = _vector("composite_mldsa65_ed25519_keys_lamps.json")
    sk, pk = _b64(vector["sk"]), _b64(vector["pk"])
    private = {"mldsa65": sk[:32], "ed25519": sk[32:]}
    public = {"mldsa65": pk[: signers.MLDSA65_PUBLIC_KEY_SIZE], "ed25519": pk[1952:]}
    suite = load_signature_suite(COMPOSITE)
    sig = suite.signer(private, "lamps").sign(MESSAGE)
    assert suite.verifier(public).verify(MESSAGE, sig) is True


def test_composite_self_generated_regression_vector() -> None:
    vector = _vector("composite_mldsa65_ed25519_selfgenerated.json")
    assert "SELF-GENERATED" in vector["source"]
    public = {alg: _b64(raw) for alg, raw in vector["public_keys"].items()}
    verifier = load_signature_suite(COMPOSITE).verifier(public)
    message, sig = _b64(vector["m"]), _b64(vector["signature"])
    assert verifier.verify(message, sig) is True
    assert verifier.verify(message + b"x", sig) is False


@pytest.mark.parametrize("position", [0, SPLIT // 2, SPLIT - 1, SPLIT, SPLIT + 32, -1])
def test_composite_flipped_bit_in_either_half_fails(
    composite: SignatureSuite,
    composite_keys: tuple[dict[str, bytes], dict[str, bytes]],
    composite_sig: bytes,
    position: int,
) -> None:
    tampered = bytearray(composite_sig)
    tampered[position] ^= 0x04
    assert composite.verifier(composite_keys[1]).verify(MESSAGE, bytes(tampered)) is False
