"""Known-answer tests of wire format v2 (tests/vectors/envelope_v2): every derived value is
recomputed from docs/wire-format.md ("version 2") with cbor2, hashlib and cryptography only,
the Ed25519 signatures are re-made byte for byte, and the records open with ``EpochOpener``."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetbus.bus.envelope_v2 import Direction, StatusCode
from fleetbus.bus.keys import KeyPath, PrivateKeySet
from fleetbus.devtools.kme_pki import TestPKI
from fleetbus.providers.keypath import KeyPathRunner
from fleetbus.providers.sealing_v2 import AcceptedEpoch, EpochOpener, open_status
from fleetbus.providers.signers import (
    CompositeMLDSA65Ed25519Suite,
    Ed25519Suite,
    MLDSA65Suite,
)
from tests.support.envelope import Clock, RecordedKME, StaticDirectory, providers
from tests.support.independent import independent_verify

HERE = Path(__file__).parents[1] / "vectors" / "envelope_v2"
VECTORS = {p.stem: json.loads(p.read_text()) for p in sorted(HERE.glob("*.json"))}
SUITES = {
    "ed25519": Ed25519Suite,
    "mldsa65": MLDSA65Suite,
    "composite-mldsa65-ed25519": CompositeMLDSA65Ed25519Suite,
}


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def dcbor(value: object) -> bytes:
    return cbor2.dumps(value, canonical=True)


def hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def test_vector_files_are_present() -> None:
    assert set(VECTORS) == {
        "x25519-ed25519-downlink",
        "xwing-composite-downlink",
        "mlkem768-mldsa65-uplink",
        "qkd+xwing-composite-batch-downlink",
        "x25519-ed25519-uplink-recovery",
    }


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_independent_derivation(name: str) -> None:
    """Only the document's text: CBOR structures, KDF labels, AEAD inputs."""
    doc = VECTORS[name]
    est = doc["establishment"]
    f = est["fields"]
    est_map = {
        1: 2,
        2: f["topic"],
        3: f["sender"],
        4: f["sender_key_id"],
        5: f["signature_suite"],
        6: f["recipient"],
        7: f["direction"],
        8: h(f["epoch_id"]),
        9: f["key_path"],
        10: [[p, k, h(r)] for p, k, r in f["key_refs"]],
        11: f["not_before_ms"],
        12: f["not_after_ms"],
        13: f["max_messages"],
        14: 3,
    }
    assert dcbor(est_map) == h(est["est"])
    tbs = dcbor(["Signature1", h(est["est"]), b"", b""])
    assert tbs == h(est["to_be_signed"])
    context = dcbor(
        ["fleetbus/v2/epoch", f["sender"], f["recipient"], f["direction"], h(f["epoch_id"])]
    )
    assert context == h(est["epoch_context"])
    secret = hkdf(
        h(est["epoch_key"]),
        b"fleetbus/v2/epoch-secret" + hashlib.sha256(h(est["est"])).digest(),
        32,
    )
    assert secret == h(est["epoch_secret"])
    signature = est["signature"]
    if signature["mode"] == 0:
        block = [0, h(signature["signature"])]
    else:
        block = [1, h(signature["root_signature"]), signature["tree_size"],
                 signature["leaf_index"], [h(p) for p in signature["path"]]]  # fmt: skip
    record = cbor2.CBORTag(0x66627573, [2, 0, h(est["est"]), block])
    assert dcbor(record) == h(est["record"])
    for message in doc["messages"]:
        hd = message["header"]
        seq = hd["sequence"]
        piv = seq.to_bytes(max(1, (seq.bit_length() + 7) // 8), "big")
        protected = dcbor(
            {
                1: 3,
                4: h(hd["epoch_id"]),
                6: piv,
                -65538: hd["kind"],
                -65540: hd["recipient"],
                -65544: hd["expires_at_ms"],
            }
        )
        assert protected == h(message["protected"])
        okm = hkdf(secret, b"fleetbus/v2/message" + seq.to_bytes(8, "big"), 44)
        assert okm[:32] == h(message["message_key"])
        assert okm[32:] == h(message["nonce"])
        aad = dcbor(["Encrypt0", protected, b""])
        assert aad == h(message["aad"])
        plaintext = AESGCM(okm[:32]).decrypt(okm[32:], h(message["ciphertext"]), aad)
        assert plaintext == h(message["plaintext"])
        if hd["kind"] == "cmd":
            # The plaintext is the dispatcher-signed command itself, which alone names the
            # command id, action and times; its expiry is the header's.
            assert plaintext == h(message["payload"])
            version, body, key_id, suite, signature = cbor2.loads(plaintext)
            assert (version, suite) == (1, "ed25519")
            assert body["expires_at"] == hd["expires_at_ms"]
            assert body["target"]["vehicle"] == hd["recipient"]
            dispatcher = doc["dispatcher"]
            assert key_id == dispatcher["key_id"]
            signed = cbor2.dumps(["fleetbus-command-v1", key_id, suite, body], canonical=True)
            Ed25519PrivateKey.from_private_bytes(
                h(dispatcher["private"]["ed25519"])
            ).public_key().verify(signature, signed)
        else:
            fields = cbor2.loads(plaintext)
            assert fields[3] == h(message["payload"])
            assert dcbor(fields) == plaintext
        encrypt0 = cbor2.CBORTag(16, [protected, {}, h(message["ciphertext"])])
        wire = cbor2.CBORTag(0x66627573, [2, 1, encrypt0])
        assert dcbor(wire) == h(message["record"])


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_signatures_verify_and_ed25519_is_remade(name: str) -> None:
    doc = VECTORS[name]
    sender = doc["sender"]
    suite = SUITES[sender["suite"]]()
    verifier = suite.verifier({k: h(v) for k, v in sender["public"].items()})
    tbs = h(doc["establishment"]["to_be_signed"])
    block = doc["establishment"]["signature"]
    if block["mode"] == 1:
        tbs, signature = _batch_root_to_be_signed(doc), h(block["root_signature"])
    else:
        signature = h(block["signature"])
    assert verifier.verify(tbs, signature)
    public = {k: h(v) for k, v in sender["public"].items()}
    independent_verify(sender["suite"], public, tbs, signature)
    if doc["deterministic_signature"]:
        key = Ed25519PrivateKey.from_private_bytes(h(sender["private"]["ed25519"]))
        assert key.sign(tbs) == signature


def _leaf(est: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + dcbor(["Signature1", est, b"", b""])).digest()


def _batch_root_to_be_signed(doc: dict[str, Any]) -> bytes:
    """A batch-signed establishment, from the document alone: RFC 6962 leaf hashes of this
    establishment's and the peer's ToBeSigned, their root by the inclusion path, and the
    root's ToBeSigned (wire-format "Batch signing")."""
    est, batch = doc["establishment"], doc["batch"]
    block = est["signature"]
    peer = cbor2.loads(h(batch["peer_establishment"])).value
    assert list(peer[:2]) == [2, 0]
    leaves = [_leaf(h(est["est"])), _leaf(peer[2])]
    assert [leaf.hex() for leaf in leaves] == batch["leaves"]
    assert block["tree_size"] == batch["tree_size"] == 2
    # Two leaves: the path is the other leaf, and the root hashes them in tree order.
    (sibling,) = (h(p) for p in block["path"])
    assert sibling == leaves[1 - block["leaf_index"]]
    root = hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest()
    assert root.hex() == batch["root"]
    # The peer's block carries the same root signature, at the other index.
    assert list(peer[3][:4]) == [1, h(block["root_signature"]), 2, 1 - block["leaf_index"]]
    root_tbs = dcbor(["fleetbus-batch-v1", root, 2])
    assert root_tbs.hex() == batch["root_to_be_signed"]
    return root_tbs


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


@pytest.mark.parametrize("name", [n for n, d in VECTORS.items() if "secrets" in d["establishment"]])
def test_independent_catkdf(name: str) -> None:
    """The epoch key from docs/key-paths.md section 2 alone: CatKDF over the recorded
    per-provider secrets (for QKD, the recorded ETSI 014 key itself)."""
    doc = VECTORS[name]
    est = doc["establishment"]
    refs, secrets = est["fields"]["key_refs"], [h(s) for s in est["secrets"]]
    if "qkd" in doc:
        recorded = doc["qkd"]["dec_keys_response"]["keys"][0]
        assert refs[0] == ["qkd-etsi014", recorded["key_ID"], recorded["key_ID"].encode().hex()]
        assert secrets[0] == base64.b64decode(recorded["key"]) == h(doc["qkd"]["key"])
    label = b"fleetbus-catkdf-v1"
    info = _lp(label) + (32).to_bytes(2, "big") + len(refs).to_bytes(2, "big")
    for (provider, key_id, key_ref), secret in zip(refs, secrets, strict=True):
        info += _lp(provider.encode()) + _lp(key_id.encode()) + _lp(h(key_ref))
        info += len(secret).to_bytes(2, "big")
    info += _lp(h(est["epoch_context"]))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=label, info=info).derive(
        b"".join(secrets)
    )
    assert key.hex() == est["epoch_key"]


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_records_open_with_the_stored_keys(name: str, kme_pki: TestPKI) -> None:
    doc = VECTORS[name]
    sender, recipient = doc["sender"], doc["recipient"]
    suite = SUITES[sender["suite"]]()
    directory = StaticDirectory()
    directory.add(
        sender["principal"],
        sender["key_id"],
        suite.verifier({k: h(v) for k, v in sender["public"].items()}),
    )
    own = PrivateKeySet(
        recipient["principal"],
        {k: h(v) for k, v in recipient["private"].items()},
        recipient["key_ids"],
        qkd_sae_id=recipient.get("qkd_sae_id"),
    )
    fields = doc["establishment"]["fields"]
    found = providers()
    if "qkd" in doc:  # QKDProvider itself, its KME answered by the vector's recording
        found["qkd-etsi014"] = RecordedKME(doc["qkd"], kme_pki)
    opener = EpochOpener(
        own,
        directory,
        KeyPathRunner(found),
        KeyPath.parse(fields["key_path"]),
        direction=Direction(doc["direction"]),
        clock=Clock(doc["open_at"]),
    )
    accepted = opener.open(h(doc["establishment"]["record"]), topic=doc["topic"])
    assert isinstance(accepted, AcceptedEpoch)
    if "qkd" in doc:
        kme = found["qkd-etsi014"]
        assert isinstance(kme, RecordedKME)
        path = f"/api/v1/keys/{doc['qkd']['master_sae_id']}/dec_keys"
        assert kme.requests == [("POST", path, doc["qkd"]["dec_keys_request"])]
    for message in doc["messages"]:
        opened: Any = opener.open(h(message["record"]), topic=doc["topic"])
        assert opened.payload == h(message["payload"])
        assert opened.epoch_seq == message["header"]["sequence"]
    status = doc.get("status")
    if status is not None:
        signer = status["signer"]
        directory.add(
            signer["principal"],
            signer["key_id"],
            SUITES[signer["suite"]]().verifier({k: h(v) for k, v in signer["public"].items()}),
        )
        opened_status = open_status(
            h(status["record"]),
            topic=status["topic"],
            own_id=sender["principal"],
            directory=directory,
            clock=Clock(doc["open_at"]),
            code=StatusCode(status.get("code", 0)),
        )
        assert opened_status.sender == signer["principal"]
        assert opened_status.epoch_id == h(fields["epoch_id"])
        key = Ed25519PrivateKey.from_private_bytes(h(signer["private"]["ed25519"]))
        assert key.sign(h(status["to_be_signed"])) == h(status["signature"]["signature"])
