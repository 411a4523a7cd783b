"""HPKE key providers: DHKEM(X25519), ML-KEM-768 and X-Wing (MLKEM768-X25519).

Each provider contributes a fresh random 32-byte secret, wrapped to the recipient's public key
with single-shot HPKE base mode (RFC 9180) from ``cryptography``. Key formats and the exact
``info`` string are written down in ``docs/key-paths.md``.
"""

from __future__ import annotations

import os
from typing import ClassVar

from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import (
    Encapsulation,
    KeyAlgorithm,
    KeyProvider,
    KeyProviderError,
    PrivateKeySet,
    ProviderTraits,
    RecipientKeys,
)

__all__ = [
    "INFO_PREFIX",
    "SECRET_LENGTH",
    "MLKEM768Provider",
    "X25519Provider",
    "XWingProvider",
    "xwing_expand_seed",
]

#: Prefix of the HPKE ``info``: ``INFO_PREFIX || provider name || context``.
INFO_PREFIX = b"fleetbus/v1/"
#: Length of the random secret each provider contributes.
SECRET_LENGTH = 32
_AES_GCM_TAG = 16

_HPKEPrivateKey = x25519.X25519PrivateKey | mlkem.MLKEM768PrivateKey | hpke.MLKEM768X25519PrivateKey
_HPKEPublicKey = x25519.X25519PublicKey | mlkem.MLKEM768PublicKey | hpke.MLKEM768X25519PublicKey


def xwing_expand_seed(
    seed: bytes,
) -> tuple[mlkem.MLKEM768PrivateKey, x25519.X25519PrivateKey]:
    """Expand a 32-byte X-Wing decapsulation key as draft-connolly-cfrg-xwing-kem section 5.2.

    ``expanded = SHAKE256(seed, 96)``; ``expanded[0:64]`` is the ML-KEM-768 seed ``d || z``
    (FIPS 203 ``KeyGen_internal``) and ``expanded[64:96]`` the X25519 private key.
    """
    if len(seed) != 32:
        raise ValueError("an X-Wing decapsulation key is 32 bytes")
    shake = hashes.Hash(hashes.SHAKE256(digest_size=96))
    shake.update(seed)
    expanded = shake.finalize()
    return (
        mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64]),
        x25519.X25519PrivateKey.from_private_bytes(expanded[64:96]),
    )


class _HPKEWrapProvider(KeyProvider):
    """Wraps a fresh random secret to the recipient with HPKE base mode (shared logic)."""

    algorithm: str
    #: A few hundred microseconds of computation, no I/O: called inline by the sealer.
    may_block = False
    kem: ClassVar[hpke.KEM]
    private_length: ClassVar[int]
    public_length: ClassVar[int]

    def __init__(self) -> None:
        self._suite = hpke.Suite(self.kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        #: Exact length of a valid ``key_ref``: enc || AES-256-GCM(secret) || tag.
        self.key_ref_length = self.kem.enc_length() + SECRET_LENGTH + _AES_GCM_TAG

    # Raw-key (de)serialisation, per KEM.
    def _load_public(self, raw: bytes) -> _HPKEPublicKey:
        raise NotImplementedError

    def _load_private(self, raw: bytes) -> _HPKEPrivateKey:
        raise NotImplementedError

    def _info(self, context: bytes) -> bytes:
        return INFO_PREFIX + self.name.encode("ascii") + context

    def _error(self, what: str, reason: ReasonCode) -> KeyProviderError:
        return KeyProviderError(f"{self.name}: {what}", reason=reason)

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        raw_public = recipient.public_keys.get(self.algorithm)
        key_id = recipient.key_ids.get(self.algorithm)
        if raw_public is None or key_id is None:
            raise self._error(
                f"recipient {recipient.principal_id!r} has no {self.algorithm} public key",
                ReasonCode.UNKNOWN_KEY_ID,
            )
        if len(raw_public) != self.public_length:
            raise self._error(
                f"a {self.algorithm} public key is {self.public_length} bytes, "
                f"got {len(raw_public)}",
                ReasonCode.MALFORMED,
            )
        try:
            public_key = self._load_public(raw_public)
        except ValueError as exc:
            raise self._error(
                f"recipient {recipient.principal_id!r} has an invalid {self.algorithm} key",
                ReasonCode.MALFORMED,
            ) from exc
        secret = os.urandom(SECRET_LENGTH)
        try:
            key_ref = self._suite.encrypt(secret, public_key, self._info(context))
        except ValueError as exc:  # e.g. a low-order X25519 point
            raise self._error(
                f"HPKE encapsulation to {recipient.principal_id!r} failed",
                ReasonCode.MALFORMED,
            ) from exc
        return Encapsulation(
            provider=self.name, key_id=key_id, key_ref=key_ref, shared_secret=secret
        )

    def recover(self, key_ref: bytes, key_id: str, own: PrivateKeySet, *, context: bytes) -> bytes:
        own_key_id = own.key_ids.get(self.algorithm)
        raw_private = own.private_keys.get(self.algorithm)
        if own_key_id is None or raw_private is None or own_key_id != key_id:
            # Key ids are public names, not secrets: a plain comparison is fine.
            raise self._error(
                f"no {self.algorithm} private key with id {key_id!r}", ReasonCode.UNKNOWN_KEY_ID
            )
        if len(key_ref) != self.key_ref_length:
            raise self._error(
                f"key_ref must be {self.key_ref_length} bytes, got {len(key_ref)}",
                ReasonCode.MALFORMED,
            )
        if len(raw_private) != self.private_length:
            raise self._error(
                f"own {self.algorithm} private key has the wrong length", ReasonCode.CONFIG
            )
        try:
            private_key = self._load_private(raw_private)
        except ValueError as exc:
            raise self._error(
                f"own {self.algorithm} private key is unusable", ReasonCode.CONFIG
            ) from exc
        try:
            secret = self._suite.decrypt(key_ref, private_key, self._info(context))
        except Exception as exc:  # InvalidTag, or ValueError for a malformed enc
            raise self._error(
                "HPKE decryption failed (key_ref, key or context changed)", ReasonCode.TAMPERED
            ) from exc
        if len(secret) != SECRET_LENGTH:
            raise self._error("decrypted secret has the wrong length", ReasonCode.TAMPERED)
        return secret


class X25519Provider(_HPKEWrapProvider):
    """HPKE DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM. Classical only.

    Keys: raw 32-byte private scalar, raw 32-byte public key (RFC 7748).
    """

    name = "x25519"
    algorithm = KeyAlgorithm.X25519.value
    traits = ProviderTraits(classical_kem=True, key_algorithm=algorithm, default=True)
    kem = hpke.KEM.X25519
    private_length = 32
    public_length = 32

    def generate_keypair(self) -> tuple[bytes, bytes]:
        key = x25519.X25519PrivateKey.generate()
        return key.private_bytes_raw(), key.public_key().public_bytes_raw()

    def _load_public(self, raw: bytes) -> _HPKEPublicKey:
        return x25519.X25519PublicKey.from_public_bytes(raw)

    def _load_private(self, raw: bytes) -> _HPKEPrivateKey:
        return x25519.X25519PrivateKey.from_private_bytes(raw)


class MLKEM768Provider(_HPKEWrapProvider):
    """HPKE ML-KEM-768 / HKDF-SHA256 / AES-256-GCM. Post-quantum only.

    Keys: 64-byte FIPS 203 seed ``d || z`` as the private key, 1184-byte encapsulation key.
    """

    name = "mlkem768"
    algorithm = KeyAlgorithm.MLKEM768.value
    traits = ProviderTraits(post_quantum_kem=True, key_algorithm=algorithm, default=True)
    kem = hpke.KEM.MLKEM768
    private_length = 64
    public_length = 1184

    def generate_keypair(self) -> tuple[bytes, bytes]:
        key = mlkem.MLKEM768PrivateKey.generate()
        return key.private_bytes_raw(), key.public_key().public_bytes_raw()

    def _load_public(self, raw: bytes) -> _HPKEPublicKey:
        return mlkem.MLKEM768PublicKey.from_public_bytes(raw)

    def _load_private(self, raw: bytes) -> _HPKEPrivateKey:
        return mlkem.MLKEM768PrivateKey.from_seed_bytes(raw)


class XWingProvider(_HPKEWrapProvider):
    """HPKE MLKEM768-X25519 (X-Wing, KEM id 0x647a) / HKDF-SHA256 / AES-256-GCM. Hybrid.

    Keys: the 32-byte X-Wing decapsulation key (seed, expanded by ``xwing_expand_seed``) as the
    private key; ``ML-KEM-768 public (1184) || X25519 public (32)`` = 1216 bytes as the public key.
    """

    name = "xwing"
    algorithm = KeyAlgorithm.XWING.value
    #: X-Wing is, by construction, ML-KEM-768 and X25519 combined, so it covers both.
    traits = ProviderTraits(
        post_quantum_kem=True,
        classical_kem=True,
        components=frozenset({"mlkem768", "x25519"}),
        key_algorithm=algorithm,
        default=True,
    )
    kem = hpke.KEM.MLKEM768_X25519
    private_length = 32
    public_length = 1216

    def generate_keypair(self) -> tuple[bytes, bytes]:
        seed = os.urandom(32)
        return seed, self.public_from_seed(seed)

    @staticmethod
    def public_from_seed(seed: bytes) -> bytes:
        """The 1216-byte X-Wing encapsulation key of a 32-byte decapsulation key."""
        mlkem_key, x25519_key = xwing_expand_seed(seed)
        return (
            mlkem_key.public_key().public_bytes_raw() + x25519_key.public_key().public_bytes_raw()
        )

    def _load_public(self, raw: bytes) -> _HPKEPublicKey:
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:1184]),
            x25519.X25519PublicKey.from_public_bytes(raw[1184:]),
        )

    def _load_private(self, raw: bytes) -> _HPKEPrivateKey:
        mlkem_key, x25519_key = xwing_expand_seed(raw)
        return hpke.MLKEM768X25519PrivateKey(mlkem_key, x25519_key)
