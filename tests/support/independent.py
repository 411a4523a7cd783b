"""Signature checks written from the documents alone (cbor2, hashlib and cryptography; nothing
from fleetbus), for the known-answer tests of tests/vectors/envelope*/."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PublicKey

MLDSA65_SIGNATURE_SIZE = 3309


def independent_verify(suite: str, public: dict[str, bytes], message: bytes, sig: bytes) -> None:
    """Raises InvalidSignature unless ``sig`` verifies; the composite as
    draft-ietf-lamps-pq-composite-sigs id-MLDSA65-Ed25519-SHA512 with the empty context."""
    if suite == "ed25519":
        Ed25519PublicKey.from_public_bytes(public["ed25519"]).verify(sig, message)
    elif suite == "mldsa65":
        MLDSA65PublicKey.from_public_bytes(public["mldsa65"]).verify(sig, message)
    else:
        assert suite == "composite-mldsa65-ed25519"
        label = b"COMPSIG-MLDSA65-Ed25519-SHA512"
        representative = (
            b"CompositeAlgorithmSignatures2025" + label + b"\x00" + hashlib.sha512(message).digest()
        )
        ml, ed = sig[:MLDSA65_SIGNATURE_SIZE], sig[MLDSA65_SIGNATURE_SIZE:]
        MLDSA65PublicKey.from_public_bytes(public["mldsa65"]).verify(ml, representative, label)
        Ed25519PublicKey.from_public_bytes(public["ed25519"]).verify(ed, representative)
