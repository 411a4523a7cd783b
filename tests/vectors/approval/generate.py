"""Regenerate the approval known-answer vector in this folder. Run deliberately, never from
tests:

    .venv/bin/python tests/vectors/approval/generate.py

Ed25519 is deterministic and every input is fixed, so a regeneration writes the same file: the
vector pins the command digest and the approval's signing input (docs/wire-format.md,
"Approvals") byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fleetbus.bus.commands import (
    Approval,
    Command,
    Decision,
    SignedApproval,
    SignedCommand,
    Target,
)
from fleetbus.providers.signers import Ed25519Suite

HERE = Path(__file__).parent
AT = 1_767_225_600.0  # 2026-01-01T00:00:00Z
COMMAND_ID = "019b76da-a800-7000-8000-000000000017"  # UUIDv7 of AT


def _key(label: bytes) -> tuple[bytes, bytes]:
    private = hashlib.sha256(b"fleetbus approval test vector/" + label).digest()  # test key
    public = (
        ed25519.Ed25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    return private, public


def main() -> None:
    issuer_private, issuer_public = _key(b"dispatch-1")
    approver_private, approver_public = _key(b"dispatch-2")
    command = Command(
        id=COMMAND_ID,
        issuer="dispatch-1",
        target=Target(vehicle="V-0017"),
        action="unlock_doors",
        params={"door": "driver"},
        issued_at=AT,
        expires_at=AT + 60,
    )
    signed_command = SignedCommand.sign(
        command, Ed25519Suite().signer({"ed25519": issuer_private}, "dispatch-1/sig/1")
    )
    approval = Approval.for_command(
        signed_command, approver="dispatch-2", decision=Decision.APPROVE, issued_at=AT + 5
    )
    signed = SignedApproval.sign(
        approval, Ed25519Suite().signer({"ed25519": approver_private}, "dispatch-2/sig/1")
    )
    vector = {
        "description": "dispatch-2 approves exactly one signed command of dispatch-1 "
        "(docs/wire-format.md, Approvals); Ed25519 test keys",
        "suite": "ed25519",
        "issuer_key_id": "dispatch-1/sig/1",
        "issuer_private_key": issuer_private.hex(),
        "issuer_public_key": issuer_public.hex(),
        "approver_key_id": "dispatch-2/sig/1",
        "approver_private_key": approver_private.hex(),
        "approver_public_key": approver_public.hex(),
        "signed_command": signed_command.encode().hex(),
        "command_to_be_signed": signed_command.to_be_signed().hex(),
        "command_digest": signed_command.digest().hex(),
        "approval_to_be_signed": signed.to_be_signed().hex(),
        "approval_signature": signed.signature.hex(),
        "signed_approval": signed.encode().hex(),
    }
    path = HERE / "approval-ed25519.json"
    path.write_text(json.dumps(vector, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
