"""Known-answer tests: the stored envelopes in tests/vectors/envelope open, and every derived
value (protected header, AAD, message key, ciphertext, ToBeSigned, signature, Merkle root) is
recomputed byte for byte. ``test_independent_verifier`` uses only cbor2 + cryptography and the
constants of docs/wire-format.md, as a vehicle-side implementer would."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetbus.bus.envelope import (
    BatchSignature,
    KeyRef,
    MessageKind,
    ProtectedHeader,
    SingleSignature,
    batch_root_to_be_signed,
    enc_structure,
    encode_envelope,
    encode_protected,
    epoch_context,
    to_be_signed,
)
from fleetbus.bus.keys import KeyPath, KeyProvider, PrivateKeySet
from fleetbus.devtools.kme_pki import TestPKI
from fleetbus.providers.keypath import KeyPathRunner
from fleetbus.providers.merkle import leaf_hash, merkle_root, root_from_inclusion_proof
from fleetbus.providers.sealing import EnvelopeOpener, derive_message_key
from fleetbus.providers.signers import CompositeMLDSA65Ed25519Suite, Ed25519Suite, MLDSA65Suite
from tests.support.envelope import Clock, RecordedKME, StaticDirectory, providers
from tests.support.independent import independent_verify

HERE = Path(__file__).parents[1] / "vectors" / "envelope"
FILES = sorted(p for p in HERE.glob("*.json") if p.name != "merkle_rfc6962.json")
VECTORS = {p.stem: json.loads(p.read_text()) for p in FILES}
CASES = [(name, i) for name, doc in VECTORS.items() for i in range(len(doc["cases"]))]


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def suite_of(doc: dict[str, Any]) -> Ed25519Suite | MLDSA65Suite | CompositeMLDSA65Ed25519Suite:
    suites = {
        "ed25519": Ed25519Suite,
        "mldsa65": MLDSA65Suite,
        "composite-mldsa65-ed25519": CompositeMLDSA65Ed25519Suite,
    }
    return suites[doc["sender"]["suite"]]()


def header_of(case: dict[str, Any]) -> ProtectedHeader:
    f = case["header"]
    return ProtectedHeader(
        kind=MessageKind(f["kind"]),
        topic=f["topic"],
        recipient=f["recipient"],
        message_id=f["message_id"],
        action=f["action"],
        issued_at_ms=f["issued_at_ms"],
        expires_at_ms=f["expires_at_ms"],
        key_path=f["key_path"],
        key_refs=tuple(KeyRef(p, k, h(r)) for p, k, r in f["key_refs"]),
        sender=f["sender"],
        sender_key_id=f["sender_key_id"],
        signature_suite=f["signature_suite"],
        epoch_id=h(f["epoch_id"]),
        epoch_seq=f["epoch_seq"],
        iv=h(f["iv"]),
        version=f["version"],
    )


def test_vector_files_are_present() -> None:
    assert {
        "x25519-ed25519",
        "xwing-composite",
        "batch-x25519-ed25519",
        "mlkem768-mldsa65-rsp",
        "x25519-ed25519-tel",
        "batch-xwing-composite",
        "qkd+xwing-composite",
        "mlkem768+x25519-ed25519",
    } <= set(VECTORS)


@pytest.mark.parametrize(("name", "index"), CASES)
def test_derived_values_byte_for_byte(name: str, index: int) -> None:
    doc = VECTORS[name]
    case = doc["cases"][index]
    header = header_of(case)
    protected = encode_protected(header)
    assert protected.hex() == case["protected"]
    assert enc_structure(protected).hex() == case["enc_structure"]
    context = epoch_context(header.sender, header.recipient, header.epoch_id)
    assert context.hex() == case["epoch_context"]
    message_key = derive_message_key(h(case["epoch_key"]), protected)
    assert message_key.hex() == case["message_key"]
    ciphertext = AESGCM(message_key).encrypt(
        header.iv, h(case["payload"]), enc_structure(protected)
    )
    assert ciphertext.hex() == case["ciphertext"]
    tbs = to_be_signed(protected, ciphertext)
    assert tbs.hex() == case["to_be_signed"]

    suite = suite_of(doc)
    private = {k: h(v) for k, v in doc["sender"]["private"].items()}
    public = {k: h(v) for k, v in doc["sender"]["public"].items()}
    signer = suite.signer(private, doc["sender"]["key_id"])
    verifier = suite.verifier(public)
    sig = case["signature"]
    block: SingleSignature | BatchSignature
    if sig["mode"] == 0:
        block = SingleSignature(h(sig["signature"]))
        assert verifier.verify(tbs, block.signature)
        if doc["deterministic_signature"]:
            assert signer.sign(tbs) == block.signature
    else:
        batch = doc["batch"]
        assert leaf_hash(tbs).hex() == sig["leaf_hash"]
        path = tuple(h(p) for p in sig["path"])
        root = root_from_inclusion_proof(sig["leaf_index"], sig["tree_size"], leaf_hash(tbs), path)
        assert root.hex() == batch["root"]
        root_tbs = batch_root_to_be_signed(root, sig["tree_size"])
        assert root_tbs.hex() == batch["root_to_be_signed"]
        assert verifier.verify(root_tbs, h(sig["root_signature"]))
        if doc["deterministic_signature"]:
            assert signer.sign(root_tbs).hex() == sig["root_signature"]
        block = BatchSignature(h(sig["root_signature"]), sig["tree_size"], sig["leaf_index"], path)
    assert encode_envelope(protected, ciphertext, block).hex() == case["envelope"]


def test_batch_merkle_root_of_fixed_leaves() -> None:
    doc = VECTORS["batch-x25519-ed25519"]
    leaves = [h(c["signature"]["leaf_hash"]) for c in doc["cases"]]
    assert merkle_root(leaves).hex() == doc["batch"]["root"]
    assert doc["batch"]["tree_size"] == len(leaves) == 3
    assert [c["header"]["epoch_seq"] for c in doc["cases"]] == [0, 1, 2]
    assert len({c["header"]["epoch_id"] for c in doc["cases"]}) == 1


def _own(doc: dict[str, Any]) -> PrivateKeySet:
    r = doc["recipient"]
    return PrivateKeySet(
        r["principal"],
        {k: h(v) for k, v in r["private"].items()},
        dict(r["key_ids"]),
        qkd_sae_id=r.get("qkd_sae_id"),
    )


def _providers(doc: dict[str, Any], pki: TestPKI) -> dict[str, KeyProvider]:
    """The production providers; for a QKD vector, ``QKDProvider`` answered by its recording."""
    found = providers()
    if "qkd" in doc:
        found["qkd-etsi014"] = RecordedKME(doc["qkd"], pki)
    return found


@pytest.mark.parametrize(("name", "index"), CASES)
def test_key_path_recovers_the_stored_epoch_key(name: str, index: int, kme_pki: TestPKI) -> None:
    doc = VECTORS[name]
    case = doc["cases"][index]
    header = header_of(case)
    refs = [(r.provider, r.key_id, r.key_ref) for r in header.key_refs]
    found = _providers(doc, kme_pki)
    key = KeyPathRunner(found).recover(
        KeyPath(header.providers), refs, _own(doc), h(case["epoch_context"])
    )
    assert key.hex() == case["epoch_key"]
    if "secrets" in case:  # files from before issue 13 record only the epoch key
        context = h(case["epoch_context"])
        recovered = [found[p].recover(r, k, _own(doc), context=context) for p, k, r in refs]
        assert [secret.hex() for secret in recovered] == case["secrets"]


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_stored_envelopes_open(name: str, kme_pki: TestPKI) -> None:
    doc = VECTORS[name]
    directory = StaticDirectory()
    public = {k: h(v) for k, v in doc["sender"]["public"].items()}
    directory.add(
        doc["sender"]["principal"], doc["sender"]["key_id"], suite_of(doc).verifier(public)
    )
    first = header_of(doc["cases"][0])
    found = _providers(doc, kme_pki)
    opener = EnvelopeOpener(
        _own(doc),
        directory,
        KeyPathRunner(found),
        KeyPath(first.providers),
        clock=Clock(doc["open_at"]),
    )
    for case in doc["cases"]:
        opened = opener.open(h(case["envelope"]), topic=doc["topic"])
        assert opened.payload.hex() == case["payload"]
        assert opened.message_id == case["header"]["message_id"]
        assert opened.key_path.name == case["header"]["key_path"]
    if "qkd" in doc:
        kme = found["qkd-etsi014"]
        assert isinstance(kme, RecordedKME)
        master = doc["qkd"]["master_sae_id"]
        request = ("POST", f"/api/v1/keys/{master}/dec_keys", doc["qkd"]["dec_keys_request"])
        assert kme.requests == [request] * len(doc["cases"])


# --- an independent verifier: cbor2 + cryptography + the numbers in docs/wire-format.md ------

ENVELOPE_TAG = 0x66627573


@pytest.mark.parametrize(("name", "index"), CASES)
def test_independent_verifier(name: str, index: int) -> None:
    doc = VECTORS[name]
    case = doc["cases"][index]
    data = h(case["envelope"])
    outer = cbor2.loads(data)
    assert cbor2.dumps(outer, canonical=True) == data  # deterministic encoding
    assert outer.tag == ENVELOPE_TAG
    version, encrypt0, sig_block = outer.value
    assert version == 1
    assert encrypt0.tag == 16
    protected, unprotected, ciphertext = encrypt0.value
    assert dict(unprotected) == {}
    fields = dict(cbor2.loads(protected))
    assert fields[1] == 3  # A256GCM
    iv = fields[5]
    assert fields[-65537] == 1
    assert fields[-65540] == doc["recipient"]["principal"]
    assert fields[-65539] == doc["topic"]
    assert fields[-65545] == "+".join(ref[0] for ref in fields[-65546])

    # Signature: Ed25519, ML-DSA-65 or the LAMPS composite (docs/key-management.md).
    tbs = cbor2.dumps(["Signature1", protected, b"", ciphertext])
    public = {k: h(v) for k, v in doc["sender"]["public"].items()}
    suite = doc["sender"]["suite"]
    if sig_block[0] == 0:
        independent_verify(suite, public, tbs, sig_block[1])
    else:
        _, root_sig, size, index_, path = sig_block
        node = hashlib.sha256(b"\x00" + tbs).digest()
        fn, sn = index_, size - 1
        for p in path:
            if fn & 1 or fn == sn:
                node = hashlib.sha256(b"\x01" + p + node).digest()
                while not fn & 1 and fn:
                    fn, sn = fn >> 1, sn >> 1
            else:
                node = hashlib.sha256(b"\x01" + node + p).digest()
            fn, sn = fn >> 1, sn >> 1
        assert sn == 0
        independent_verify(suite, public, cbor2.dumps(["fleetbus-batch-v1", node, size]), root_sig)

    # AEAD layer, given the epoch key (the key path layer is in docs/key-paths.md).
    info = b"fleetbus/v1/message" + hashlib.sha256(protected).digest()
    message_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        h(case["epoch_key"])
    )
    aad = cbor2.dumps(["Encrypt0", protected, b""])
    assert AESGCM(message_key).decrypt(iv, ciphertext, aad).hex() == case["payload"]


SECRET_CASES = [(n, i) for n, i in CASES if "secrets" in VECTORS[n]["cases"][i]]


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


@pytest.mark.parametrize(("name", "index"), SECRET_CASES)
def test_independent_catkdf(name: str, index: int) -> None:
    """The key path layer from docs/key-paths.md section 2 alone: the epoch key is CatKDF over
    the recorded per-provider secrets (for QKD, the recorded 014 key itself)."""
    doc = VECTORS[name]
    case = doc["cases"][index]
    refs = case["header"]["key_refs"]
    secrets = [h(s) for s in case["secrets"]]
    if "qkd" in doc:
        (qkd_secret,) = [
            s for (p, _, _), s in zip(refs, secrets, strict=True) if p == "qkd-etsi014"
        ]
        recorded = doc["qkd"]["dec_keys_response"]["keys"][0]
        assert qkd_secret == base64.b64decode(recorded["key"]) == h(doc["qkd"]["key"])
        assert [r for r in refs if r[0] == "qkd-etsi014"] == [
            ["qkd-etsi014", recorded["key_ID"], recorded["key_ID"].encode().hex()]
        ]
    label = b"fleetbus-catkdf-v1"
    info = _lp(label) + (32).to_bytes(2, "big") + len(refs).to_bytes(2, "big")
    for (provider, key_id, key_ref), secret in zip(refs, secrets, strict=True):
        info += _lp(provider.encode()) + _lp(key_id.encode()) + _lp(h(key_ref))
        info += len(secret).to_bytes(2, "big")
    info += _lp(h(case["epoch_context"]))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=label, info=info).derive(
        b"".join(secrets)
    )
    assert key.hex() == case["epoch_key"]
