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
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem, x25519

from fleetbus.bus.commands import Command, SignedCommand, Target
from fleetbus.bus.envelope import BatchSignature, SingleSignature
from fleetbus.bus.envelope_v2 import (
    Direction,
    Message,
    ParsedEstablishment,
    ParsedStatus,
    decode_record,
    epoch_context_v2,
    message_aad,
    signed_to_be_signed,
)
from fleetbus.bus.keys import KeyPath, PrivateKeySet, RecipientKeys, SecurityProfile
from fleetbus.providers.hpke import MLKEM768Provider, X25519Provider, XWingProvider
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
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


def command(message_id: str, action: str, params: dict[str, Any]) -> bytes:
    """A `cmd` message's payload and whole plaintext: a command signed by the dispatcher."""
    private, _ = signing_keys(DISPATCHER, "ed25519")
    signer = Ed25519Suite().signer(private, f"{DISPATCHER}/sig/1")
    cmd = Command(
        id=message_id,
        issuer=DISPATCHER,
        target=Target(vehicle="V-17"),
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
) -> None:
    suite = SUITES[suite_name]()
    down = direction is Direction.DOWNLINK
    sender, recipient_id = ("bus-sealer-1", "V-17") if down else ("V-17", "bus-sealer-1")
    sender_private, sender_public = signing_keys(sender, suite_name)
    signer = suite.signer(sender_private, f"{sender}/sig/1")
    r_private, r_public, r_ids = kem_keys(recipient_id)
    recipient = RecipientKeys(recipient_id, r_public, r_ids)
    own = PrivateKeySet(recipient_id, r_private, r_ids)
    runner = KeyPathRunner(
        {"x25519": X25519Provider(), "mlkem768": MLKEM768Provider(), "xwing": XWingProvider()}
    )
    key_path = KeyPath.parse(path)
    profile = SecurityProfile("vectors", [key_path], suite_name, False, key_path)
    sealer = EpochSealer(
        sender,
        signer,
        ProfileSealer(runner, provider_timeout_s=None),
        direction=direction,
        epochs=EpochPolicy(max_age_s=300, max_messages=1000),
        clock=lambda: ISSUED_AT,
    )
    records: list[bytes] = []
    for kind, message_id, action, payload in messages:
        records += sealer.seal(
            SealRequest(
                kind, topic, recipient, message_id, action, payload, ISSUED_AT, ISSUED_AT + 300,
                profile,
            )
        )  # fmt: skip
    est = decode_record(records[0])
    assert isinstance(est, ParsedEstablishment)
    e = est.establishment
    context = epoch_context_v2(e.sender, e.recipient, e.direction, e.epoch_id)
    epoch_key = runner.recover(
        key_path, [(r.provider, r.key_id, r.key_ref) for r in e.key_refs], own, context
    )
    secret = derive_epoch_secret(epoch_key, est.body)
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
        status_topic = "fleet.commands.responses"
        record = sign_status(
            s_signer,
            recipient_id,
            make_status(
                topic=status_topic, recipient=sender, epoch_id=e.epoch_id, sequence=1, at=OPEN_AT
            ),
        )
        parsed_status = decode_record(record)
        assert isinstance(parsed_status, ParsedStatus)
        document["status"] = {
            "topic": status_topic,
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


CMD1, CMD2, CMD3, CMD4 = (f"0190f3a0-0000-7000-8000-00000000000{i}" for i in range(1, 5))


def main() -> None:
    build(
        "x25519-ed25519-downlink",
        "Downlink epoch on x25519, Ed25519 (deterministic) establishment, three commands "
        "(sequence 0..2), and the vehicle's epoch_unknown status (Ed25519).",
        path="x25519",
        suite_name="ed25519",
        direction=Direction.DOWNLINK,
        topic="fleet.commands.outbound",
        messages=[
            ("cmd", CMD1, "doors.unlock", command(CMD1, "doors.unlock", {"doors": "all"})),
            ("cmd", CMD2, "route.push", command(CMD2, "route.push", {"route": "R-42"})),
            ("cmd", CMD3, "doors.lock", command(CMD3, "doors.lock", {})),
        ],
        status_suite="ed25519",
    )
    build(
        "xwing-composite-downlink",
        "Downlink epoch on xwing, composite ML-DSA-65+Ed25519 establishment (randomized "
        "ML-DSA: verify only), one command.",
        path="xwing",
        suite_name="composite-mldsa65-ed25519",
        direction=Direction.DOWNLINK,
        topic="fleet.commands.outbound",
        messages=[("cmd", CMD4, "route.push", command(CMD4, "route.push", {"route": "R-42"}))],
    )
    build(
        "mlkem768-mldsa65-uplink",
        "Uplink epoch of vehicle V-17 to the bus on mlkem768, ML-DSA-65 establishment (verify "
        "only), one telemetry batch and one response.",
        path="mlkem768",
        suite_name="mldsa65",
        direction=Direction.UPLINK,
        topic="fleet.telemetry.raw",
        messages=[
            ("tel", "tel-V-17-1", "", b"\x82\xa2aa\x01ab\x02\xa2aa\x03ab\x04"),
            ("rsp", CMD1, "doors.unlock", b"ok"),
        ],
    )


if __name__ == "__main__":
    main()
