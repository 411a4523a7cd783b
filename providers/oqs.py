"""Optional liboqs-backed key provider for a KEM that ``cryptography`` lacks (default FrodoKEM).

``import oqs`` without an installed liboqs waits, tries to clone and build liboqs, and exits the
process, so liboqs is detected here first without importing ``oqs``, and ``oqs`` is imported
lazily only once the shared library is known to exist.

Construction (KEM-DEM, as HPKE does it): ``(ct, ss) = Encaps(pk)``;
``key || nonce = HKDF-SHA256(ikm=ss, salt=none, info=INFO_PREFIX || "oqs/" || kem_name || 0x00 ||
context, L=44)``; ``key_ref = ct || AES-256-GCM(key, nonce, secret, aad=ct)``.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetbus.bus.errors import ConfigError, ReasonCode
from fleetbus.bus.keys import (
    Encapsulation,
    KeyProvider,
    KeyProviderError,
    PrivateKeySet,
    ProviderTraits,
    RecipientKeys,
)
from fleetbus.providers.hpke import INFO_PREFIX, SECRET_LENGTH

if TYPE_CHECKING:
    from fleetbus.bus.settings import FleetbusSettings

__all__ = ["DEFAULT_KEM", "OQSConfig", "OQSProvider", "liboqs_available"]

DEFAULT_KEM = "FrodoKEM-640-AES"
_TAG = 16


def _candidate_dirs() -> list[Path]:
    dirs = []
    if install := os.environ.get("OQS_INSTALL_PATH"):
        dirs.append(Path(install) / "lib")
    home = Path.home()
    dirs += [home / "_oqs" / "lib", home / "oqs" / "lib"]  # liboqs-python's default locations
    return dirs


def liboqs_available() -> tuple[bool, str]:
    """Whether liboqs-python and the liboqs shared library are both present, and why not.

    Never imports ``oqs`` (which would try to download and build liboqs, then exit).
    """
    if importlib.util.find_spec("oqs") is None:
        return False, "liboqs-python is not installed (pip install 'fleetbus[oqs]')"
    for directory in _candidate_dirs():
        found = sorted(
            glob.glob(str(directory / "liboqs.so*")) + glob.glob(str(directory / "liboqs*.dylib"))
        )
        if found:
            return True, f"liboqs found at {found[0]}"
    if library := ctypes.util.find_library("oqs"):
        return True, f"liboqs found as {library}"
    return False, (
        "liboqs shared library not found (looked in $OQS_INSTALL_PATH/lib, ~/_oqs/lib, ~/oqs/lib "
        "and the system library path); build liboqs with -DBUILD_SHARED_LIBS=ON and set "
        "OQS_INSTALL_PATH"
    )


@dataclass(frozen=True)
class OQSConfig:
    """What ``OQSProvider`` takes: the liboqs KEM (no setting names another yet)."""

    kem_name: str = DEFAULT_KEM


def _import_oqs() -> Any:
    """The ``oqs`` module, typed ``Any`` (it ships no stubs); call only after the check."""
    return importlib.import_module("oqs")


class OQSProvider(KeyProvider):
    """Wraps a random 32-byte secret with a liboqs KEM + HKDF-SHA256 + AES-256-GCM.

    Keys are liboqs' raw secret / public key bytes for ``kem_name``. The recipient key is looked
    up under the algorithm name ``"oqs:" + kem_name``.
    """

    name = "oqs"
    traits = ProviderTraits(post_quantum_kem=True, key_algorithm="oqs:")

    @classmethod
    def config_from_settings(cls, settings: FleetbusSettings) -> OQSConfig:
        return OQSConfig()

    def __init__(self, kem_name: str = DEFAULT_KEM) -> None:
        ok, reason = liboqs_available()
        if not ok:
            raise ConfigError(f"key provider 'oqs' is unavailable: {reason}")
        self._oqs = _import_oqs()
        enabled = list(self._oqs.get_enabled_kem_mechanisms())
        if kem_name not in enabled:
            raise ConfigError(f"liboqs does not enable KEM {kem_name!r}")
        self.kem_name = kem_name
        self._alg = f"oqs:{kem_name}"
        self.algorithm = self._alg
        with self._oqs.KeyEncapsulation(kem_name) as kem:
            details: dict[str, Any] = dict(kem.details)
        self._ct_length = int(details["length_ciphertext"])
        self._pk_length = int(details["length_public_key"])
        self._sk_length = int(details["length_secret_key"])

    def _derive(self, shared: bytes, ciphertext: bytes, context: bytes) -> tuple[bytes, bytes]:
        info = INFO_PREFIX + b"oqs/" + self.kem_name.encode("ascii") + b"\x00" + context
        okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=None, info=info).derive(shared)
        return okm[:32], okm[32:]

    def generate_keypair(self) -> tuple[bytes, bytes]:
        with self._oqs.KeyEncapsulation(self.kem_name) as kem:
            public = bytes(kem.generate_keypair())
            secret = bytes(kem.export_secret_key())
        return secret, public

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        public = recipient.public_keys.get(self._alg)
        key_id = recipient.key_ids.get(self._alg)
        if public is None or key_id is None:
            raise KeyProviderError(
                f"oqs: recipient {recipient.principal_id!r} has no {self.algorithm} key",
                reason=ReasonCode.UNKNOWN_KEY_ID,
            )
        if len(public) != self._pk_length:
            raise KeyProviderError(
                "oqs: public key has the wrong length", reason=ReasonCode.MALFORMED
            )
        with self._oqs.KeyEncapsulation(self.kem_name) as kem:
            ciphertext, shared = kem.encap_secret(public)
        if not isinstance(shared, bytes) or len(ciphertext) != self._ct_length:
            raise KeyProviderError("oqs: encapsulation failed")
        key, nonce = self._derive(shared, bytes(ciphertext), context)
        secret = os.urandom(SECRET_LENGTH)
        sealed = AESGCM(key).encrypt(nonce, secret, bytes(ciphertext))
        return Encapsulation(
            provider=self.name,
            key_id=key_id,
            key_ref=bytes(ciphertext) + sealed,
            shared_secret=secret,
        )

    def recover(self, key_ref: bytes, key_id: str, own: PrivateKeySet, *, context: bytes) -> bytes:
        own_id = own.key_ids.get(self._alg)
        private = own.private_keys.get(self._alg)
        if own_id is None or private is None or own_id != key_id:
            raise KeyProviderError(
                f"oqs: no {self.algorithm} private key with id {key_id!r}",
                reason=ReasonCode.UNKNOWN_KEY_ID,
            )
        if len(key_ref) != self._ct_length + SECRET_LENGTH + _TAG:
            raise KeyProviderError("oqs: key_ref has the wrong length", reason=ReasonCode.MALFORMED)
        if len(private) != self._sk_length:
            raise KeyProviderError(
                "oqs: own private key has the wrong length", reason=ReasonCode.CONFIG
            )
        ciphertext, sealed = key_ref[: self._ct_length], key_ref[self._ct_length :]
        with self._oqs.KeyEncapsulation(self.kem_name, private) as kem:
            shared = kem.decap_secret(ciphertext)
        if not isinstance(shared, bytes):
            raise KeyProviderError("oqs: decapsulation failed", reason=ReasonCode.TAMPERED)
        key, nonce = self._derive(shared, ciphertext, context)
        try:
            return AESGCM(key).decrypt(nonce, sealed, ciphertext)
        except InvalidTag:
            raise KeyProviderError(
                "oqs: decryption failed (key_ref, key or context changed)",
                reason=ReasonCode.TAMPERED,
            ) from None
