"""An approval binds exactly one command: the known-answer vector (Ed25519) recomputed from
docs/wire-format.md ("Approvals") alone, and tamper tests of the command digest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fleetbus.bus.commands import (
    APPROVAL_CONTEXT,
    COMMAND_DIGEST_CONTEXT,
    Approval,
    Command,
    SignedApproval,
    SignedCommand,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.providers.signers import Ed25519Suite

VECTOR = Path(__file__).parents[1] / "vectors" / "approval" / "approval-ed25519.json"
V: dict[str, str] = json.loads(VECTOR.read_text())


def _verifies(signed: SignedApproval) -> bool:
    verifier = Ed25519Suite().verifier({"ed25519": bytes.fromhex(V["approver_public_key"])})
    return bool(verifier.verify(signed.to_be_signed(), signed.signature))


def test_known_answer_recomputed_from_the_document_alone() -> None:
    """cbor2, hashlib and cryptography only: what a third-party verifier does."""
    command_wire = cbor2.loads(bytes.fromhex(V["signed_command"]))
    tbs = cbor2.dumps(
        ["fleetbus-command-v1", V["issuer_key_id"], V["suite"], command_wire[1]], canonical=True
    )
    assert tbs.hex() == V["command_to_be_signed"]
    digest = hashlib.sha256(cbor2.dumps(["fleetbus-command-digest-v1", tbs], canonical=True))
    assert digest.hexdigest() == V["command_digest"]
    approval_wire = cbor2.loads(bytes.fromhex(V["signed_approval"]))
    body = approval_wire[1]
    assert set(body) == {"command_id", "command_digest", "approver", "decision", "issued_at"}
    assert body["command_id"] == command_wire[1]["id"]
    assert body["command_digest"] == digest.digest()
    approval_tbs = cbor2.dumps(
        ["fleetbus-approval-v2", V["approver_key_id"], V["suite"], body], canonical=True
    )
    assert approval_tbs.hex() == V["approval_to_be_signed"]
    private = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(V["approver_private_key"]))
    assert private.sign(approval_tbs).hex() == V["approval_signature"]  # deterministic
    public = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(V["approver_public_key"]))
    public.verify(bytes.fromhex(V["approval_signature"]), approval_tbs)


def test_known_answer_is_what_the_sdk_computes() -> None:
    assert (APPROVAL_CONTEXT, COMMAND_DIGEST_CONTEXT) == (
        "fleetbus-approval-v2",
        "fleetbus-command-digest-v1",
    )
    command = SignedCommand.decode(bytes.fromhex(V["signed_command"]))
    assert command.digest().hex() == V["command_digest"]
    signed = SignedApproval.decode(bytes.fromhex(V["signed_approval"]))
    assert signed.encode().hex() == V["signed_approval"]
    assert signed.to_be_signed().hex() == V["approval_to_be_signed"]
    assert _verifies(signed)
    assert signed.approval.is_for(command)
    signer = Ed25519Suite().signer(
        {"ed25519": bytes.fromhex(V["approver_private_key"])}, V["approver_key_id"]
    )
    again = Approval.for_command(
        command, approver="dispatch-2", issued_at=signed.approval.issued_at
    )
    assert SignedApproval.sign(again, signer).encode().hex() == V["signed_approval"]


def _with_body(change: Callable[[dict[str, Any]], None]) -> bytes:
    items = cbor2.loads(bytes.fromhex(V["signed_approval"]))
    body = dict(items[1])
    change(body)
    return cbor2.dumps([items[0], body, *items[2:]], canonical=True)


def test_a_changed_digest_does_not_verify() -> None:
    digest = bytes.fromhex(V["command_digest"])
    changed = _with_body(
        lambda b: b.__setitem__("command_digest", bytes([digest[0] ^ 1]) + digest[1:])
    )
    assert not _verifies(SignedApproval.decode(changed))


def test_an_approval_is_not_for_another_command_under_the_same_id() -> None:
    """A re-signature of the same command keeps the digest; any change of what the issuer
    signed (a parameter, the expiry, the signing key id) changes it."""
    command = SignedCommand.decode(bytes.fromhex(V["signed_command"]))
    approval = SignedApproval.decode(bytes.fromhex(V["signed_approval"])).approval
    issuer = bytes.fromhex(V["issuer_private_key"])
    same = SignedCommand.sign(
        command.command, Ed25519Suite().signer({"ed25519": issuer}, V["issuer_key_id"])
    )
    assert approval.is_for(same)
    c = command.command
    others = [
        Command(c.id, c.issuer, c.target, c.action, {"door": "all"}, c.issued_at, c.expires_at),
        Command(c.id, c.issuer, c.target, c.action, dict(c.params), c.issued_at, c.expires_at + 1),
    ]
    for other in others:
        signed = SignedCommand.sign(
            other, Ed25519Suite().signer({"ed25519": issuer}, V["issuer_key_id"])
        )
        assert not approval.is_for(signed)
    rekeyed = SignedCommand.sign(c, Ed25519Suite().signer({"ed25519": issuer}, "dispatch-1/sig/2"))
    assert not approval.is_for(rekeyed)


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.__setitem__("command_digest", bytes(31)),
        lambda b: b.__setitem__("command_digest", bytes(33)),
        lambda b: b.__setitem__("command_digest", "00" * 32),
        lambda b: b.pop("command_digest") and b.__setitem__("extra", 1),
    ],
)
def test_a_malformed_digest_is_malformed(change: Callable[[dict[str, Any]], None]) -> None:
    with pytest.raises(FleetbusError) as exc:
        SignedApproval.decode(_with_body(change))
    assert exc.value.reason is ReasonCode.MALFORMED


def test_an_approval_of_the_old_format_is_unsupported_version() -> None:
    """Fail closed: a v1 approval (command id only) is never read as approving anything."""
    with pytest.raises(FleetbusError) as exc:
        SignedApproval.decode(_with_body(lambda b: b.pop("command_digest")))
    assert exc.value.reason is ReasonCode.UNSUPPORTED_VERSION
