"""Regenerate the envelope test vectors in this folder. Run deliberately, never from tests:

    .venv/bin/python tests/vectors/envelope/generate.py

Keys are derived from fixed labels, so they are the same on every run; the HPKE encapsulations,
IVs and epoch ids are fresh each run (HPKE has no deterministic API), so a regeneration changes
the stored envelopes. Every derived value (protected header, AAD, message key, ciphertext,
ToBeSigned, signature, Merkle root) is recorded so an independent implementation can check each
step; see docs/wire-format.md, "Test vectors".
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem, x25519

from fleetbus.bus.envelope import (
    BatchSignature,
    SingleSignature,
    batch_root_to_be_signed,
    decode_envelope,
    enc_structure,
    epoch_context,
    to_be_signed,
)
from fleetbus.bus.keys import KeyPath, PrivateKeySet, RecipientKeys, SecurityProfile
from fleetbus.devtools.qkd_recording import QKDRecording, RecordedQKD
from fleetbus.providers.hpke import MLKEM768Provider, X25519Provider, XWingProvider
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
from fleetbus.providers.merkle import leaf_hash, merkle_root
from fleetbus.providers.sealing import (
    EnvelopeSealer,
    EpochPolicy,
    SealRequest,
    derive_message_key,
)
from fleetbus.providers.signers import (
    CompositeMLDSA65Ed25519Suite,
    Ed25519Suite,
    MLDSA65Suite,
)

HERE = Path(__file__).parent
ISSUED_AT = 1_767_225_600.0  # 2026-01-01T00:00:00Z
OPEN_AT = ISSUED_AT + 5
TOPIC = "fleet.commands.outbound"


def seed(label: str, size: int = 32) -> bytes:
    """Fixed key material: SHA-256 (or two) of a label. Test keys only."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"fleetbus test vector/{label}/{counter}".encode()).digest()
        counter += 1
    return out[:size]


#: The QKD side of the qkd-etsi014 vectors: the bus's SAE (master), the vehicle's (slave), and
#: one recorded ETSI GS QKD 014 key (what the KME pair handed both SAEs).
QKD = QKDRecording(
    "sae-bus-sealer-1", "sae-V-17", "0b1c7e4a-5d2f-4e61-9a83-2f6c0d9e1a57", seed("qkd/key")
)


def vehicle_keys(principal: str) -> tuple[dict[str, bytes], dict[str, bytes], dict[str, str]]:
    x_priv = seed(f"{principal}/x25519")
    ml_priv = seed(f"{principal}/mlkem768", 64)
    xw_priv = seed(f"{principal}/xwing")
    private = {"x25519": x_priv, "mlkem768": ml_priv, "xwing": xw_priv}
    public = {
        "x25519": x25519.X25519PrivateKey.from_private_bytes(x_priv)
        .public_key()
        .public_bytes_raw(),
        "mlkem768": mlkem.MLKEM768PrivateKey.from_seed_bytes(ml_priv)
        .public_key()
        .public_bytes_raw(),
        "xwing": XWingProvider.public_from_seed(xw_priv),
    }
    ids = {name: f"{principal}/{name}/1" for name in private}
    return private, public, ids


def sender_keys(principal: str, suite: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    ed_priv = seed(f"{principal}/ed25519")
    private = {"ed25519": ed_priv}
    public = {
        "ed25519": ed25519.Ed25519PrivateKey.from_private_bytes(ed_priv)
        .public_key()
        .public_bytes_raw()
    }
    if suite in ("composite-mldsa65-ed25519", "mldsa65"):
        ml_priv = seed(f"{principal}/mldsa65")
        private["mldsa65"] = ml_priv
        public["mldsa65"] = (
            mldsa.MLDSA65PrivateKey.from_seed_bytes(ml_priv).public_key().public_bytes_raw()
        )
    return private, public


def hexmap(values: dict[str, bytes]) -> dict[str, str]:
    return {k: v.hex() for k, v in sorted(values.items())}


SUITES = {
    "ed25519": Ed25519Suite,
    "mldsa65": MLDSA65Suite,
    "composite-mldsa65-ed25519": CompositeMLDSA65Ed25519Suite,
}


def build(
    name: str,
    description: str,
    path: str,
    suite_name: str,
    payloads: list[bytes],
    batch: bool,
    *,
    kind: str = "cmd",
    topic: str = TOPIC,
    action: str = "doors.unlock",
) -> None:
    suite = SUITES[suite_name]()
    sender = "bus-sealer-1"
    sender_private, sender_public = sender_keys(sender, suite_name)
    signer = suite.signer(sender_private, f"{sender}/sig/1")
    v_private, v_public, v_ids = vehicle_keys("V-17")
    key_path = KeyPath.parse(path)
    qkd = RecordedQKD.name in key_path.providers
    sae = QKD.slave_sae_id if qkd else None
    recipient = RecipientKeys("V-17", v_public, v_ids, qkd_sae_id=sae)
    own = PrivateKeySet("V-17", v_private, v_ids, qkd_sae_id=sae)
    runner = KeyPathRunner(
        {
            "x25519": X25519Provider(),
            "mlkem768": MLKEM768Provider(),
            "xwing": XWingProvider(),
            RecordedQKD.name: RecordedQKD(QKD),
        }
    )
    profile = SecurityProfile("vectors", [key_path], suite_name, False, key_path)
    sealer = EnvelopeSealer(
        sender,
        signer,
        ProfileSealer(runner, provider_timeout_s=None),
        epochs=EpochPolicy(max_age_s=3600, max_messages=1000),
        batch_signing=batch,
        clock=lambda: ISSUED_AT,
    )
    requests = [
        SealRequest(
            kind,
            topic,
            recipient,
            f"{kind}-{i + 1:04d}",
            action,
            payload,
            ISSUED_AT,
            ISSUED_AT + 300,
            profile,
        )
        for i, payload in enumerate(payloads)
    ]
    envelopes = sealer.seal_batch(requests)
    cases: list[dict[str, Any]] = []
    epoch_key = b""
    for envelope, payload in zip(envelopes, payloads, strict=True):
        parsed = decode_envelope(envelope)
        h = parsed.header
        context = epoch_context(h.sender, h.recipient, h.epoch_id)
        refs = [(r.provider, r.key_id, r.key_ref) for r in h.key_refs]
        epoch_key = runner.recover(key_path, refs, own, context)
        secrets = [runner.provider(p).recover(r, k, own, context=context) for p, k, r in refs]
        tbs = to_be_signed(parsed.protected, parsed.ciphertext)
        case: dict[str, Any] = {
            "header": {
                "version": h.version,
                "kind": str(h.kind),
                "topic": h.topic,
                "recipient": h.recipient,
                "message_id": h.message_id,
                "action": h.action,
                "issued_at_ms": h.issued_at_ms,
                "expires_at_ms": h.expires_at_ms,
                "key_path": h.key_path,
                "key_refs": [[r.provider, r.key_id, r.key_ref.hex()] for r in h.key_refs],
                "sender": h.sender,
                "sender_key_id": h.sender_key_id,
                "signature_suite": h.signature_suite,
                "epoch_id": h.epoch_id.hex(),
                "epoch_seq": h.epoch_seq,
                "iv": h.iv.hex(),
            },
            "payload": payload.hex(),
            "epoch_context": context.hex(),
            "secrets": [secret.hex() for secret in secrets],
            "epoch_key": epoch_key.hex(),
            "protected": parsed.protected.hex(),
            "enc_structure": enc_structure(parsed.protected).hex(),
            "message_key": derive_message_key(epoch_key, parsed.protected).hex(),
            "ciphertext": parsed.ciphertext.hex(),
            "to_be_signed": tbs.hex(),
            "envelope": envelope.hex(),
        }
        block = parsed.signature
        if isinstance(block, SingleSignature):
            case["signature"] = {"mode": 0, "signature": block.signature.hex()}
        else:
            assert isinstance(block, BatchSignature)
            case["signature"] = {
                "mode": 1,
                "leaf_hash": leaf_hash(tbs).hex(),
                "leaf_index": block.leaf_index,
                "tree_size": block.tree_size,
                "path": [node.hex() for node in block.path],
                "root_signature": block.root_signature.hex(),
            }
        cases.append(case)
    document: dict[str, Any] = {
        "description": description,
        "open_at": OPEN_AT,
        "topic": topic,
        "deterministic_signature": suite_name == "ed25519",
        "sender": {
            "principal": sender,
            "key_id": signer.key_id,
            "suite": suite_name,
            "private": hexmap(sender_private),
            "public": hexmap(sender_public),
        },
        "recipient": {
            "principal": "V-17",
            "key_ids": dict(sorted(v_ids.items())),
            "private": hexmap(v_private),
            "public": hexmap(v_public),
        },
        "cases": cases,
    }
    if qkd:
        document["recipient"]["qkd_sae_id"] = QKD.slave_sae_id
        document["qkd"] = QKD.to_json()
    if batch:
        first = decode_envelope(envelopes[0]).signature
        assert isinstance(first, BatchSignature)
        leaves = [bytes.fromhex(c["signature"]["leaf_hash"]) for c in cases]

        root = merkle_root(leaves)
        document["batch"] = {
            "tree_size": len(leaves),
            "root": root.hex(),
            "root_to_be_signed": batch_root_to_be_signed(root, len(leaves)).hex(),
            "root_signature": first.root_signature.hex(),
        }
    (HERE / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {name}.json ({len(cases)} envelope(s))")


def main(names: list[str]) -> None:
    """Build every vector file, or only those named (adding a file must not rewrite the
    others: their HPKE encapsulations would change)."""
    for name, (args, kwargs) in VECTORS.items():
        if not names or name in names:
            build(name, *args, **kwargs)


VECTORS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}


VECTORS.update(
    {
        "x25519-ed25519": (
            ("One command, key path x25519, Ed25519 (deterministic) single signature.",
             "x25519", "ed25519", [b'{"doors":"unlock"}'], False), {}),
        "xwing-composite": (
            ("One command, key path xwing, composite ML-DSA-65+Ed25519 single signature.",
             "xwing", "composite-mldsa65-ed25519", [b'{"route":"R-42"}'], False), {}),
        "batch-x25519-ed25519": (
            ("Three commands of one key epoch (seq 0..2), batch-signed: one Ed25519 signature "
             "over the Merkle root.", "x25519", "ed25519", [b"first", b"second", b""], True),
            {}),
        "mlkem768-mldsa65-rsp": (
            ("One response (kind rsp), key path mlkem768 (ML-KEM-768 only), ML-DSA-65 single "
             "signature (randomized: verify only).", "mlkem768", "mldsa65",
             [b'{"status":200}'], False),
            {"kind": "rsp", "topic": "fleet.commands.responses", "action": "response"}),
        "x25519-ed25519-tel": (
            ("One telemetry envelope (kind tel), key path x25519, Ed25519 single signature.",
             "x25519", "ed25519", [b'{"speed_kmh":42}'], False),
            {"kind": "tel", "topic": "fleet.telemetry.raw", "action": "telemetry"}),
        "batch-xwing-composite": (
            ("Two commands of one key epoch on xwing, batch-signed with one composite "
             "ML-DSA-65+Ed25519 root signature (randomized: verify only).", "xwing",
             "composite-mldsa65-ed25519", [b"one", b"two"], True), {}),
    }
)  # fmt: skip


# -- issue 13: the QKD + X-Wing combined path, and ML-KEM-768 with X25519 as two providers ----
VECTORS.update(
    {
        "qkd+xwing-composite": (
            ("One high-criticality command on key path qkd-etsi014+xwing (the enclave profile): "
             "a recorded ETSI 014 QKD key and an X-Wing encapsulation, combined by CatKDF; "
             "composite ML-DSA-65+Ed25519 single signature (randomized: verify only).",
             "qkd-etsi014+xwing", "composite-mldsa65-ed25519", [b'{"doors":"lock"}'], False),
            {"action": "doors.lock"}),
        "mlkem768+x25519-ed25519": (
            ("One command on key path mlkem768+x25519: ML-KEM-768 and X25519 as two providers, "
             "combined by CatKDF (a profile for vehicles issued with both keys, "
             "docs/key-paths.md section 3); Ed25519 single signature.",
             "mlkem768+x25519", "ed25519", [b'{"route":"R-7"}'], False), {}),
    }
)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
