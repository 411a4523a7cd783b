"""Regenerate the wire format v2 vectors in this folder. Run deliberately, never from tests:

    .venv/bin/python tests/vectors/envelope_v2/generate.py

Keys come from fixed labels (test keys only); HPKE encapsulations and epoch ids are fresh each
run, so a regeneration changes the files. Every derived value (context, epoch key, epoch secret,
ToBeSigned, per-message key and nonce, AAD, plaintext, ciphertext) is recorded with the private
keys needed to open the records (and, for commands, the dispatcher's key that signed the command
a `cmd` message carries); see docs/wire-format.md, "V2.11 Test vectors".
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem, x25519

from fleetbus.bus.commands import Command, SignedCommand, Target
from fleetbus.bus.envelope import BatchSignature, SingleSignature, batch_root_to_be_signed
from fleetbus.bus.envelope_v2 import (
    Direction,
    Message,
    ParsedEstablishment,
    ParsedStatus,
    StatusCode,
    decode_record,
    epoch_context_v2,
    message_aad,
    signed_to_be_signed,
)
from fleetbus.bus.keys import KeyPath, PrivateKeySet, RecipientKeys, SecurityProfile
from fleetbus.devtools.qkd_recording import QKDRecording, RecordedQKD
from fleetbus.providers.hpke import MLKEM768Provider, X25519Provider, XWingProvider
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
from fleetbus.providers.merkle import leaf_hash, merkle_root
from fleetbus.providers.sealing import EpochPolicy, SealRequest
from fleetbus.providers.sealing_v2 import (
    EpochSealer,
    derive_epoch_secret,
    derive_message_key_nonce,
    make_status,
    sign_status,
)
from fleetbus.providers.signers import CompositeMLDSA65Ed25519Suite, Ed25519Suite, MLDSA65Suite

HERE = Path(__file__).parent
ISSUED_AT = 1_767_225_600.0  # 2026-01-01T00:00:00Z
OPEN_AT = ISSUED_AT + 5
SUITES = {
    "ed25519": Ed25519Suite,
    "mldsa65": MLDSA65Suite,
    "composite-mldsa65-ed25519": CompositeMLDSA65Ed25519Suite,
}


def seed(label: str, size: int = 32) -> bytes:
    """Fixed key material: SHA-256 (or two) of a label. Test keys only."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"fleetbus v2 test vector/{label}/{counter}".encode()).digest()
        counter += 1
    return out[:size]


#: The QKD side of the qkd-etsi014 vector: the bus's SAE (master), the vehicle's (slave), and
#: one recorded ETSI GS QKD 014 key.
QKD = QKDRecording(
    "sae-bus-sealer-1", "sae-V-17", "7f3e9b20-8c4d-4a15-b6e2-91d05c3a4f88", seed("qkd/key")
)


def kem_keys(principal: str) -> tuple[dict[str, bytes], dict[str, bytes], dict[str, str]]:
    private = {
        "x25519": seed(f"{principal}/x25519"),
        "mlkem768": seed(f"{principal}/mlkem768", 64),
        "xwing": seed(f"{principal}/xwing"),
    }
    public = {
        "x25519": x25519.X25519PrivateKey.from_private_bytes(private["x25519"])
        .public_key()
        .public_bytes_raw(),
        "mlkem768": mlkem.MLKEM768PrivateKey.from_seed_bytes(private["mlkem768"])
        .public_key()
        .public_bytes_raw(),
        "xwing": XWingProvider.public_from_seed(private["xwing"]),
    }
    return private, public, {name: f"{principal}/{name}/1" for name in private}


def signing_keys(principal: str, suite: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    private: dict[str, bytes] = {}
    public: dict[str, bytes] = {}
    if suite in ("ed25519", "composite-mldsa65-ed25519"):
        private["ed25519"] = seed(f"{principal}/ed25519")
        public["ed25519"] = (
            ed25519.Ed25519PrivateKey.from_private_bytes(private["ed25519"])
            .public_key()
            .public_bytes_raw()
        )
    if suite in ("mldsa65", "composite-mldsa65-ed25519"):
        private["mldsa65"] = seed(f"{principal}/mldsa65")
        public["mldsa65"] = (
            mldsa.MLDSA65PrivateKey.from_seed_bytes(private["mldsa65"])
            .public_key()
            .public_bytes_raw()
        )
    return private, public


DISPATCHER = "dispatch-1"


def command(message_id: str, action: str, params: dict[str, Any], vehicle: str = "V-17") -> bytes:
    """A `cmd` message's payload and whole plaintext: a command signed by the dispatcher."""
    private, _ = signing_keys(DISPATCHER, "ed25519")
    signer = Ed25519Suite().signer(private, f"{DISPATCHER}/sig/1")
    cmd = Command(
        id=message_id,
        issuer=DISPATCHER,
        target=Target(vehicle=vehicle),
        action=action,
        params=params,
        issued_at=ISSUED_AT,
        expires_at=ISSUED_AT + 300,
    )
    return SignedCommand.sign(cmd, signer).encode()


def hexmap(values: dict[str, bytes]) -> dict[str, str]:
    return {k: v.hex() for k, v in sorted(values.items())}


def block_json(block: object) -> dict[str, Any]:
    if isinstance(block, SingleSignature):
        return {"mode": 0, "signature": block.signature.hex()}
    assert isinstance(block, BatchSignature)
    return {
        "mode": 1,
        "root_signature": block.root_signature.hex(),
        "tree_size": block.tree_size,
        "leaf_index": block.leaf_index,
        "path": [n.hex() for n in block.path],
    }


def build(
    name: str,
    description: str,
    *,
    path: str,
    suite_name: str,
    direction: Direction,
    topic: str,
    messages: list[tuple[str, str, str, bytes]],  # kind, message id, action, payload
    status_suite: str | None = None,
    batch_peer: str | None = None,
) -> None:
    """``batch_peer``: the establishment is batch-signed (one Merkle root) together with the
    establishment of an epoch to ``batch_peer``, sealed in the same batch (wire-format V2.4)."""
    suite = SUITES[suite_name]()
    down = direction is Direction.DOWNLINK
    sender, recipient_id = ("bus-sealer-1", "V-17") if down else ("V-17", "bus-sealer-1")
    sender_private, sender_public = signing_keys(sender, suite_name)
    signer = suite.signer(sender_private, f"{sender}/sig/1")
    r_private, r_public, r_ids = kem_keys(recipient_id)
    key_path = KeyPath.parse(path)
    qkd = RecordedQKD.name in key_path.providers
    sae = QKD.slave_sae_id if qkd else None
    recipient = RecipientKeys(recipient_id, r_public, r_ids, qkd_sae_id=sae)
    own = PrivateKeySet(recipient_id, r_private, r_ids, qkd_sae_id=sae)
    runner = KeyPathRunner(
        {
            "x25519": X25519Provider(),
            "mlkem768": MLKEM768Provider(),
            "xwing": XWingProvider(),
            RecordedQKD.name: RecordedQKD(QKD),
        }
    )
    profile = SecurityProfile("vectors", [key_path], suite_name, False, key_path)
    sealer = EpochSealer(
        sender,
        signer,
        ProfileSealer(runner, provider_timeout_s=None),
        direction=direction,
        epochs=EpochPolicy(max_age_s=300, max_messages=1000),
        batch_signing=batch_peer is not None,
        clock=lambda: ISSUED_AT,
    )
    requests = [
        SealRequest(kind, topic, recipient, message_id, action, payload, ISSUED_AT,
                    ISSUED_AT + 300, profile)
        for kind, message_id, action, payload in messages
    ]  # fmt: skip
    records: list[bytes] = []
    peer_record = b""
    if batch_peer is not None:
        _, p_public, p_ids = kem_keys(batch_peer)
        peer = RecipientKeys(batch_peer, p_public, p_ids)
        peer_request = SealRequest(
            "cmd", topic, peer, "0190f3a0-0000-7000-8000-0000000000ff", "doors.lock",
            command("0190f3a0-0000-7000-8000-0000000000ff", "doors.lock", {}, batch_peer),
            ISSUED_AT, ISSUED_AT + 300,
            # The peer has no QKD link: one batch signs epochs of different profiles.
            SecurityProfile("vectors-peer", [KeyPath.parse("xwing")], suite_name, False,
                            KeyPath.parse("xwing")),
        )  # fmt: skip
        prepared = [sealer.prepare(r) for r in [requests[0], peer_request]]
        batch = sealer.records_for(prepared)
        sealer.announced([p.epoch_id for p in prepared])
        records += batch[0]
        peer_record = batch[1][0]
        requests = requests[1:]
    for request in requests:
        records += sealer.seal(request)
    est = decode_record(records[0])
    assert isinstance(est, ParsedEstablishment)
    e = est.establishment
    context = epoch_context_v2(e.sender, e.recipient, e.direction, e.epoch_id)
    epoch_key = runner.recover(
        key_path, [(r.provider, r.key_id, r.key_ref) for r in e.key_refs], own, context
    )
    secret = derive_epoch_secret(epoch_key, est.body)
    refs = [(r.provider, r.key_id, r.key_ref) for r in e.key_refs]
    secrets = [runner.provider(p).recover(r, k, own, context=context) for p, k, r in refs]
    document: dict[str, Any] = {
        "description": description,
        "open_at": OPEN_AT,
        "topic": topic,
        "direction": int(direction),
        "deterministic_signature": suite_name == "ed25519",
        "sender": {
            "principal": sender,
            "key_id": signer.key_id,
            "suite": suite_name,
            "private": hexmap(sender_private),
            "public": hexmap(sender_public),
        },
        "recipient": {
            "principal": recipient_id,
            "key_ids": dict(sorted(r_ids.items())),
            "private": hexmap(r_private),
            "public": hexmap(r_public),
        },
        "establishment": {
            "fields": {
                "topic": e.topic,
                "sender": e.sender,
                "sender_key_id": e.sender_key_id,
                "signature_suite": e.signature_suite,
                "recipient": e.recipient,
                "direction": int(e.direction),
                "epoch_id": e.epoch_id.hex(),
                "key_path": e.key_path,
                "key_refs": [[r.provider, r.key_id, r.key_ref.hex()] for r in e.key_refs],
                "not_before_ms": e.not_before_ms,
                "not_after_ms": e.not_after_ms,
                "max_messages": e.max_messages,
            },
            "est": est.body.hex(),
            "to_be_signed": signed_to_be_signed(est.body).hex(),
            "signature": block_json(est.signature),
            "epoch_context": context.hex(),
            "secrets": [s.hex() for s in secrets],
            "epoch_key": epoch_key.hex(),
            "epoch_secret": secret.hex(),
            "record": records[0].hex(),
        },
        "messages": [],
    }
    if any(kind == "cmd" for kind, *_ in messages):
        d_private, d_public = signing_keys(DISPATCHER, "ed25519")
        document["dispatcher"] = {
            "principal": DISPATCHER,
            "key_id": f"{DISPATCHER}/sig/1",
            "suite": "ed25519",
            "private": hexmap(d_private),
            "public": hexmap(d_public),
        }
    if qkd:
        document["recipient"]["qkd_sae_id"] = QKD.slave_sae_id
        document["qkd"] = QKD.to_json()
    if batch_peer is not None:
        peer_est = decode_record(peer_record)
        assert isinstance(peer_est, ParsedEstablishment)
        leaves = [leaf_hash(signed_to_be_signed(b)) for b in (est.body, peer_est.body)]
        root = merkle_root(leaves)
        document["batch"] = {
            "tree_size": len(leaves),
            "leaves": [leaf.hex() for leaf in leaves],
            "root": root.hex(),
            "root_to_be_signed": batch_root_to_be_signed(root, len(leaves)).hex(),
            "peer_establishment": peer_record.hex(),
        }
    for record, (_kind, _mid, _action, payload) in zip(records[1:], messages, strict=True):
        parsed = decode_record(record)
        assert isinstance(parsed, Message)
        h = parsed.header
        key, nonce = derive_message_key_nonce(secret, h.sequence)
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        plaintext = AESGCM(key).decrypt(nonce, parsed.ciphertext, message_aad(parsed.protected))
        document["messages"].append(
            {
                "header": {
                    "epoch_id": h.epoch_id.hex(),
                    "sequence": h.sequence,
                    "kind": str(h.kind),
                    "recipient": h.recipient,
                    "expires_at_ms": h.expires_at_ms,
                },
                "payload": payload.hex(),
                "plaintext": plaintext.hex(),
                "protected": parsed.protected.hex(),
                "message_key": key.hex(),
                "nonce": nonce.hex(),
                "aad": message_aad(parsed.protected).hex(),
                "ciphertext": parsed.ciphertext.hex(),
                "record": record.hex(),
            }
        )
    if status_suite is not None:
        s_suite = SUITES[status_suite]()
        s_private, s_public = signing_keys(recipient_id, status_suite)
        s_signer = s_suite.signer(s_private, f"{recipient_id}/sig/1")
        # The recipient of the epoch reports it unknown to its sender: a vehicle on the
        # responses topic (code 0), the bus on commands.outbound (code 1, wire-format V2.7.1).
        status_topic = "fleet.commands.responses" if down else "fleet.commands.outbound"
        code = StatusCode.EPOCH_UNKNOWN if down else StatusCode.UPLINK_EPOCH_UNKNOWN
        record = sign_status(
            s_signer,
            recipient_id,
            make_status(
                topic=status_topic,
                recipient=sender,
                epoch_id=e.epoch_id,
                sequence=1 if down else 0,
                at=OPEN_AT,
                code=code,
            ),
        )
        parsed_status = decode_record(record)
        assert isinstance(parsed_status, ParsedStatus)
        document["status"] = {
            "topic": status_topic,
            "code": int(code),
            "signer": {
                "principal": recipient_id,
                "key_id": s_signer.key_id,
                "suite": status_suite,
                "private": hexmap(s_private),
                "public": hexmap(s_public),
            },
            "sts": parsed_status.body.hex(),
            "to_be_signed": signed_to_be_signed(parsed_status.body).hex(),
            "signature": block_json(parsed_status.signature),
            "record": record.hex(),
        }
    (HERE / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {name}.json ({len(records)} records)")


CMD1, CMD2, CMD3, CMD4, CMD5, CMD6 = (
    f"0190f3a0-0000-7000-8000-00000000000{i}" for i in range(1, 7)
)


def main(names: list[str]) -> None:
    """Build every vector file, or only those named (adding a file must not rewrite the
    others: their HPKE encapsulations would change)."""
    for name, (args, kwargs) in VECTORS.items():
        if not names or name in names:
            build(name, *args, **kwargs)


VECTORS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "x25519-ed25519-downlink": (
        ("Downlink epoch on x25519, Ed25519 (deterministic) establishment, three commands "
         "(sequence 0..2), and the vehicle's epoch_unknown status (Ed25519).",),
        {"path": "x25519", "suite_name": "ed25519", "direction": Direction.DOWNLINK,
         "topic": "fleet.commands.outbound",
         "messages": [
             ("cmd", CMD1, "doors.unlock", command(CMD1, "doors.unlock", {"doors": "all"})),
             ("cmd", CMD2, "route.push", command(CMD2, "route.push", {"route": "R-42"})),
             ("cmd", CMD3, "doors.lock", command(CMD3, "doors.lock", {})),
         ],
         "status_suite": "ed25519"}),
    "xwing-composite-downlink": (
        ("Downlink epoch on xwing, composite ML-DSA-65+Ed25519 establishment (randomized "
         "ML-DSA: verify only), one command.",),
        {"path": "xwing", "suite_name": "composite-mldsa65-ed25519",
         "direction": Direction.DOWNLINK, "topic": "fleet.commands.outbound",
         "messages": [
             ("cmd", CMD4, "route.push", command(CMD4, "route.push", {"route": "R-42"})),
         ]}),
    "mlkem768-mldsa65-uplink": (
        ("Uplink epoch of vehicle V-17 to the bus on mlkem768, ML-DSA-65 establishment (verify "
         "only), one telemetry batch and one response.",),
        {"path": "mlkem768", "suite_name": "mldsa65", "direction": Direction.UPLINK,
         "topic": "fleet.telemetry.raw",
         "messages": [
             ("tel", "tel-V-17-1", "", b"\x82\xa2aa\x01ab\x02\xa2aa\x03ab\x04"),
             ("rsp", CMD1, "doors.unlock", b"ok"),
         ]}),
}  # fmt: skip


# -- issue 13: the QKD + X-Wing combined path; a batch-signed (composite) establishment -------
VECTORS.update(
    {
        "qkd+xwing-composite-batch-downlink": (
            ("Downlink epoch on qkd-etsi014+xwing (a recorded ETSI 014 QKD key and an X-Wing "
             "encapsulation, combined by CatKDF), its establishment batch-signed with one "
             "composite ML-DSA-65+Ed25519 root signature over itself and the establishment of "
             "an xwing epoch to V-18 sealed in the same batch (randomized: verify only); two "
             "commands.",),
            {"path": "qkd-etsi014+xwing", "suite_name": "composite-mldsa65-ed25519",
             "direction": Direction.DOWNLINK, "topic": "fleet.commands.outbound",
             "messages": [
                 ("cmd", CMD5, "doors.lock", command(CMD5, "doors.lock", {"doors": "all"})),
                 ("cmd", CMD6, "doors.unlock", command(CMD6, "doors.unlock", {})),
             ],
             "batch_peer": "V-18"}),
    }
)  # fmt: skip


# -- issue 13, uplink recovery: the bus's uplink_epoch_unknown status (wire-format V2.7.1) ----
VECTORS.update(
    {
        "x25519-ed25519-uplink-recovery": (
            ("Uplink epoch of vehicle V-17 to the bus on x25519, Ed25519 (deterministic) "
             "establishment, one response, and the bus sealer's uplink_epoch_unknown status "
             "(code 1, Ed25519) asking V-17 for a new epoch.",),
            {"path": "x25519", "suite_name": "ed25519", "direction": Direction.UPLINK,
             "topic": "fleet.commands.responses",
             "messages": [("rsp", CMD2, "", b"ok")],
             "status_suite": "ed25519"}),
    }
)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
