"""Regenerate the signed telemetry batch vector in this folder. Run deliberately, never from
tests:

    .venv/bin/python tests/vectors/telemetry/generate.py

Ed25519 is deterministic, so a regeneration writes the same file: the vector pins the signing
input (docs/wire-format.md, "V2.3.1 Signed telemetry batch") and the encoding byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fleetbus.bus.commands import SignedTelemetryBatch, TelemetryBatch
from fleetbus.providers.signers import Ed25519Suite

HERE = Path(__file__).parent
AT = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def main() -> None:
    private = hashlib.sha256(b"fleetbus telemetry test vector/V-17/ed25519").digest()  # test key
    public = (
        ed25519.Ed25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    key_id = "V-17/sig/1"
    signer = Ed25519Suite().signer({"ed25519": private}, key_id)
    batch = TelemetryBatch(
        "V-17",
        (
            (AT, {"speed_kmh": 42, "soc_pct": 81.5, "door": "closed"}),
            (AT + 1.25, {"speed_kmh": 44, "soc_pct": 81.4, "door": "closed"}),
        ),
    )
    signed = SignedTelemetryBatch.sign(batch, signer)
    vector = {
        "description": "a TelemetryBatch of V-17 signed with its Ed25519 key "
        "(docs/wire-format.md, V2.3.1)",
        "vehicle_id": "V-17",
        "suite": "ed25519",
        "key_id": key_id,
        "private_key": private.hex(),
        "public_key": public.hex(),
        "batch": batch.encode().hex(),
        "to_be_signed": signed.to_be_signed().hex(),
        "signature": signed.signature.hex(),
        "signed_batch": signed.encode().hex(),
        "sha256": signed.digest().hex(),
    }
    path = HERE / "signed-batch-ed25519.json"
    path.write_text(json.dumps(vector, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
