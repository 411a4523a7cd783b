"""Signature suites: Ed25519, ML-DSA-65 (FIPS 204) and the composite ML-DSA-65 + Ed25519.

The composite follows draft-ietf-lamps-pq-composite-sigs (id-MLDSA65-Ed25519-SHA512): both
component signatures are computed over the same message representative

    M' = Prefix || Label || len(ctx) || ctx || SHA-512(M)

with ML-DSA additionally taking ``Label`` as its FIPS 204 context, and the signature is the plain
concatenation ``mldsaSig (3309 bytes) || ed25519Sig (64 bytes)``. Both must verify.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import KeyAlgorithm, SignatureSuite, Signer, Verifier

ED25519 = KeyAlgorithm.ED25519.value
MLDSA65 = KeyAlgorithm.MLDSA65.value

ED25519_PUBLIC_KEY_SIZE = 32
ED25519_PRIVATE_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
MLDSA65_SEED_SIZE = 32
MLDSA65_PUBLIC_KEY_SIZE = 1952
MLDSA65_SIGNATURE_SIZE = 3309

#: draft-ietf-lamps-pq-composite-sigs, "CompositeAlgorithmSignatures2025" in ASCII.
COMPOSITE_PREFIX = b"CompositeAlgorithmSignatures2025"
#: The label (domain separator) of id-MLDSA65-Ed25519-SHA512.
COMPOSITE_LABEL = b"COMPSIG-MLDSA65-Ed25519-SHA512"
COMPOSITE_SIGNATURE_SIZE = MLDSA65_SIGNATURE_SIZE + ED25519_SIGNATURE_SIZE


def _key(keys: Mapping[str, bytes], algorithm: str, size: int, what: str) -> bytes:
    """Fetch one raw key by algorithm and check its length; the error never shows key bytes."""
    value = keys.get(algorithm)
    if not isinstance(value, bytes | bytearray | memoryview):
        raise FleetbusError(f"missing {algorithm} {what} key", reason=ReasonCode.MALFORMED)
    raw = bytes(value)
    if len(raw) != size:
        raise FleetbusError(
            f"{algorithm} {what} key must be {size} bytes, got {len(raw)}",
            reason=ReasonCode.MALFORMED,
        )
    return raw


def _ed25519_private(keys: Mapping[str, bytes]) -> ed25519.Ed25519PrivateKey:
    raw = _key(keys, ED25519, ED25519_PRIVATE_KEY_SIZE, "private")
    return ed25519.Ed25519PrivateKey.from_private_bytes(raw)


def _ed25519_public(keys: Mapping[str, bytes]) -> ed25519.Ed25519PublicKey:
    raw = _key(keys, ED25519, ED25519_PUBLIC_KEY_SIZE, "public")
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise FleetbusError("invalid ed25519 public key", reason=ReasonCode.MALFORMED) from exc


def _mldsa65_private(keys: Mapping[str, bytes]) -> mldsa.MLDSA65PrivateKey:
    seed = _key(keys, MLDSA65, MLDSA65_SEED_SIZE, "private (seed)")
    return mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)


def _mldsa65_public(keys: Mapping[str, bytes]) -> mldsa.MLDSA65PublicKey:
    raw = _key(keys, MLDSA65, MLDSA65_PUBLIC_KEY_SIZE, "public")
    try:
        return mldsa.MLDSA65PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise FleetbusError("invalid mldsa65 public key", reason=ReasonCode.MALFORMED) from exc


def _ed25519_generate() -> tuple[bytes, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def _mldsa65_generate() -> tuple[bytes, bytes]:
    key = mldsa.MLDSA65PrivateKey.generate()
    # private_bytes_raw() of ML-DSA in cryptography is the 32-byte seed (xi of FIPS 204).
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def _ed25519_verify(key: ed25519.Ed25519PublicKey, message: bytes, signature: bytes) -> bool:
    try:
        key.verify(signature, message)
    except Exception:
        return False
    return True


def _mldsa65_verify(
    key: mldsa.MLDSA65PublicKey, message: bytes, signature: bytes, context: bytes | None = None
) -> bool:
    try:
        key.verify(signature, message, context)
    except Exception:
        return False
    return True


def _as_bytes(value: object) -> bytes | None:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return None


# --- Ed25519 -------------------------------------------------------------------------------


class Ed25519Signer(Signer):
    suite = "ed25519"

    def __init__(self, private_keys: Mapping[str, bytes], key_id: str) -> None:
        self._key = _ed25519_private(private_keys)
        self.key_id = key_id

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"Ed25519Signer(key_id={self.key_id!r})"


class Ed25519Verifier(Verifier):
    suite = "ed25519"

    def __init__(self, public_keys: Mapping[str, bytes]) -> None:
        self._key = _ed25519_public(public_keys)

    def verify(self, message: bytes, signature: bytes) -> bool:
        msg, sig = _as_bytes(message), _as_bytes(signature)
        if msg is None or sig is None or len(sig) != ED25519_SIGNATURE_SIZE:
            return False
        return _ed25519_verify(self._key, msg, sig)

    def __repr__(self) -> str:
        return "Ed25519Verifier()"


class Ed25519Suite(SignatureSuite):
    """EdDSA over Ed25519 (RFC 8032), deterministic; classical only."""

    name = "ed25519"
    post_quantum = False

    def generate(self) -> tuple[dict[str, bytes], dict[str, bytes]]:
        private, public = _ed25519_generate()
        return {ED25519: private}, {ED25519: public}

    def signer(self, private_keys: Mapping[str, bytes], key_id: str) -> Signer:
        return Ed25519Signer(private_keys, key_id)

    def verifier(self, public_keys: Mapping[str, bytes]) -> Verifier:
        return Ed25519Verifier(public_keys)


# --- ML-DSA-65 -----------------------------------------------------------------------------


class MLDSA65Signer(Signer):
    suite = "mldsa65"

    def __init__(self, private_keys: Mapping[str, bytes], key_id: str) -> None:
        self._key = _mldsa65_private(private_keys)
        self.key_id = key_id

    def sign(self, message: bytes) -> bytes:
        # Pure ML-DSA with the empty context; hedged (randomized) signing as in FIPS 204.
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"MLDSA65Signer(key_id={self.key_id!r})"


class MLDSA65Verifier(Verifier):
    suite = "mldsa65"

    def __init__(self, public_keys: Mapping[str, bytes]) -> None:
        self._key = _mldsa65_public(public_keys)

    def verify(self, message: bytes, signature: bytes) -> bool:
        msg, sig = _as_bytes(message), _as_bytes(signature)
        if msg is None or sig is None or len(sig) != MLDSA65_SIGNATURE_SIZE:
            return False
        return _mldsa65_verify(self._key, msg, sig)

    def __repr__(self) -> str:
        return "MLDSA65Verifier()"


class MLDSA65Suite(SignatureSuite):
    """ML-DSA-65 (FIPS 204), pure mode, empty context; the private key is the 32-byte seed."""

    name = "mldsa65"
    post_quantum = True

    def generate(self) -> tuple[dict[str, bytes], dict[str, bytes]]:
        private, public = _mldsa65_generate()
        return {MLDSA65: private}, {MLDSA65: public}

    def signer(self, private_keys: Mapping[str, bytes], key_id: str) -> Signer:
        return MLDSA65Signer(private_keys, key_id)

    def verifier(self, public_keys: Mapping[str, bytes]) -> Verifier:
        return MLDSA65Verifier(public_keys)


# --- Composite ML-DSA-65 + Ed25519 ---------------------------------------------------------


def composite_message_representative(
    message: bytes, context: bytes = b"", *, label: bytes = COMPOSITE_LABEL
) -> bytes:
    """``M' = Prefix || Label || len(ctx) || ctx || SHA-512(M)`` (id-MLDSA65-Ed25519-SHA512).

    ``label`` is a parameter only so that the draft's published examples for other SHA-512
    composites can check this construction; the suite always uses ``COMPOSITE_LABEL``.
    """
    if len(context) > 255:
        raise FleetbusError("composite context longer than 255 bytes", reason=ReasonCode.MALFORMED)
    return (
        COMPOSITE_PREFIX
        + label
        + bytes([len(context)])
        + context
        + hashlib.sha512(message).digest()
    )


class CompositeMLDSA65Ed25519Signer(Signer):
    suite = "composite-mldsa65-ed25519"

    def __init__(
        self, private_keys: Mapping[str, bytes], key_id: str, *, context: bytes = b""
    ) -> None:
        self._mldsa = _mldsa65_private(private_keys)
        self._ed25519 = _ed25519_private(private_keys)
        self._context = bytes(context)
        self.key_id = key_id

    def sign(self, message: bytes) -> bytes:
        representative = composite_message_representative(message, self._context)
        mldsa_sig = self._mldsa.sign(representative, COMPOSITE_LABEL)
        ed_sig = self._ed25519.sign(representative)
        return mldsa_sig + ed_sig

    def __repr__(self) -> str:
        return f"CompositeMLDSA65Ed25519Signer(key_id={self.key_id!r})"


class CompositeMLDSA65Ed25519Verifier(Verifier):
    suite = "composite-mldsa65-ed25519"

    def __init__(self, public_keys: Mapping[str, bytes], *, context: bytes = b"") -> None:
        self._mldsa = _mldsa65_public(public_keys)
        self._ed25519 = _ed25519_public(public_keys)
        if len(context) > 255:
            raise FleetbusError("composite context longer than 255 bytes", reason=ReasonCode.CONFIG)
        self._context = bytes(context)

    def verify(self, message: bytes, signature: bytes) -> bool:
        msg, sig = _as_bytes(message), _as_bytes(signature)
        if msg is None or sig is None or len(sig) != COMPOSITE_SIGNATURE_SIZE:
            return False
        representative = composite_message_representative(msg, self._context)
        mldsa_ok = _mldsa65_verify(
            self._mldsa, representative, sig[:MLDSA65_SIGNATURE_SIZE], COMPOSITE_LABEL
        )
        ed_ok = _ed25519_verify(self._ed25519, representative, sig[MLDSA65_SIGNATURE_SIZE:])
        return mldsa_ok and ed_ok

    def __repr__(self) -> str:
        return "CompositeMLDSA65Ed25519Verifier()"


class CompositeMLDSA65Ed25519Suite(SignatureSuite):
    """id-MLDSA65-Ed25519-SHA512 from draft-ietf-lamps-pq-composite-sigs; both parts must verify.

    Keys are the component keys by algorithm: ``{"mldsa65": seed, "ed25519": seed}`` private and
    ``{"mldsa65": pk, "ed25519": pk}`` public (the draft's composite public key is
    ``mldsa65 pk || ed25519 pk``). Component keys must not be used on their own.
    """

    name = "composite-mldsa65-ed25519"
    post_quantum = True

    def __init__(self, *, context: bytes = b"") -> None:
        if len(context) > 255:
            raise FleetbusError("composite context longer than 255 bytes", reason=ReasonCode.CONFIG)
        self._context = bytes(context)

    def generate(self) -> tuple[dict[str, bytes], dict[str, bytes]]:
        mldsa_private, mldsa_public = _mldsa65_generate()
        ed_private, ed_public = _ed25519_generate()
        return (
            {MLDSA65: mldsa_private, ED25519: ed_private},
            {MLDSA65: mldsa_public, ED25519: ed_public},
        )

    def signer(self, private_keys: Mapping[str, bytes], key_id: str) -> Signer:
        return CompositeMLDSA65Ed25519Signer(private_keys, key_id, context=self._context)

    def verifier(self, public_keys: Mapping[str, bytes]) -> Verifier:
        return CompositeMLDSA65Ed25519Verifier(public_keys, context=self._context)
