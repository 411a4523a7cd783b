"""The fleet root of trust: its public key, the root key that signs records and heads, and
issuing a principal's keys under it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fleetbus.bus.directory.heads import DirectoryHead, SignedDirectoryHead, head_signing_input
from fleetbus.bus.directory.keyfiles import PrincipalKeyFile
from fleetbus.bus.directory.records import (
    POST_QUANTUM_SIGNATURE_ALGORITHMS,
    RECORD_SIGNING_PREFIX,
    ROOT_PUBLIC_FORMAT,
    ROOT_SUITE,
    KeyRecord,
    SignedKeyRecord,
    _loads,
    _malformed,
    canonical_cbor,
    derive_key_id,
)
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.bus.keys import (
    Signer,
    Verifier,
)
from fleetbus.bus.registry import (
    kem_provider_for_algorithm,
    kem_providers,
    key_provider_traits,
    load_key_provider,
    load_signature_suite,
)

# --- root of trust -------------------------------------------------------------------------


@dataclass(frozen=True)
class RootPublicKey:
    """The fleet root's public key(s), pinned by vehicles and every verifier of records."""

    key_id: str
    suite: str
    public_keys: dict[str, bytes]

    def verifier(self) -> Verifier:
        return load_signature_suite(self.suite).verifier(self.public_keys)

    def to_bytes(self) -> bytes:
        return canonical_cbor(
            {
                "fmt": ROOT_PUBLIC_FORMAT,
                "kid": self.key_id,
                "suite": self.suite,
                "keys": dict(self.public_keys),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RootPublicKey:
        outer = _loads(data, "root public key")
        if not isinstance(outer, dict) or set(outer) != {"fmt", "kid", "suite", "keys"}:
            raise _malformed("root public key: unexpected or missing fields")
        if outer["fmt"] != ROOT_PUBLIC_FORMAT:
            raise _malformed("root public key: unknown format")
        keys = outer["keys"]
        if not isinstance(keys, dict) or not all(
            isinstance(k, str) and isinstance(v, bytes) for k, v in keys.items()
        ):
            raise _malformed("root public key: keys must map algorithm names to bytes")
        if not isinstance(outer["kid"], str) or not isinstance(outer["suite"], str):
            raise _malformed("root public key: kid and suite must be text")
        if derive_key_id(keys) != outer["kid"]:
            raise _malformed("root public key: key id does not match the keys")
        return cls(outer["kid"], outer["suite"], dict(keys))


class FleetRoot:
    """The fleet root key (hybrid by default): signs key-directory records."""

    def __init__(self, private_keys: Mapping[str, bytes], public: RootPublicKey) -> None:
        self._signer: Signer = load_signature_suite(public.suite).signer(
            private_keys, public.key_id
        )
        self._private_keys = dict(private_keys)
        self.public = public

    @classmethod
    def generate(cls, suite: str = ROOT_SUITE) -> FleetRoot:
        private, public = load_signature_suite(suite).generate()
        return cls(private, RootPublicKey(derive_key_id(public), suite, public))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, record: KeyRecord) -> SignedKeyRecord:
        encoded = record.to_cbor()
        signature = self._signer.sign(RECORD_SIGNING_PREFIX + encoded)
        return SignedKeyRecord.encoded_as(record, signature, self.key_id, encoded)

    def sign_head(self, head: DirectoryHead) -> SignedDirectoryHead:
        return SignedDirectoryHead(head, self._signer.sign(head_signing_input(head)), self.key_id)

    def key_file(self) -> PrincipalKeyFile:
        return PrincipalKeyFile(
            principal_id="root",
            kind="root",
            key_id=self.key_id,
            signature_suite=self.public.suite,
            private_keys=dict(self._private_keys),
            public_keys=dict(self.public.public_keys),
        )

    @classmethod
    def from_key_file(cls, key_file: PrincipalKeyFile) -> FleetRoot:
        public = RootPublicKey(key_file.key_id, key_file.signature_suite, key_file.public_keys)
        if derive_key_id(public.public_keys) != public.key_id:
            raise _malformed("root key file: key id does not match the public keys")
        return cls(key_file.private_keys, public)

    def __repr__(self) -> str:
        return f"FleetRoot(key_id={self.key_id!r}, suite={self.public.suite!r})"


def verify_signed_record(
    signed: SignedKeyRecord, root: RootPublicKey, verifier: Verifier | None = None
) -> KeyRecord:
    """Check the root signature (``verifier``: the root's, if already parsed) and the key id;
    raise BAD_SIGNATURE / MALFORMED."""
    if signed.root_key_id != root.key_id or not (verifier or root.verifier()).verify(
        RECORD_SIGNING_PREFIX + signed.record_cbor, signed.signature
    ):
        raise FleetbusError(
            f"key record for {signed.record.principal_id!r} is not signed by the fleet root",
            reason=ReasonCode.BAD_SIGNATURE,
        )
    if derive_key_id(signed.record.public_keys) != signed.record.key_id:
        raise _malformed("key record: key id does not match its public keys")
    return signed.record


# --- issuing keys --------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedKey:
    """A freshly issued key: the signed record to publish and the private file to hand over."""

    signed: SignedKeyRecord
    key_file: PrincipalKeyFile


def generate_principal_keys(
    signature_suite: str, kems: Iterable[str]
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Fresh private/public keys: signature keys from the suite, KEM keys from the providers."""
    private, public = load_signature_suite(signature_suite).generate()
    for name in kems:
        if name not in kem_providers():
            raise ConfigError(f"unknown KEM {name!r}; choose from {', '.join(kem_providers())}")
        provider = load_key_provider(name)
        alg = provider.algorithm or name
        private[alg], public[alg] = provider.generate_keypair()
    return private, public


def _any_post_quantum(public: Mapping[str, bytes]) -> bool:
    for alg in public:
        if alg in POST_QUANTUM_SIGNATURE_ALGORITHMS:
            return True
        provider = kem_provider_for_algorithm(alg)
        if provider is not None and key_provider_traits(provider).post_quantum_kem:
            return True
    return False


def issue_key(
    root: FleetRoot,
    *,
    principal_id: str,
    kind: str,
    version: int = 1,
    signature_suite: str = ROOT_SUITE,
    kems: Iterable[str] = (),
    capabilities: Iterable[str] = (),
    qkd_sae_id: str | None = None,
    not_before: float,
    not_after: float,
    groups: Iterable[str] = (),
    overlap_s: float = 0.0,
) -> IssuedKey:
    """Generate a principal's keys and have the root sign its record.

    Capabilities get ``pqc`` when any key is post-quantum and ``qkd`` when a SAE id is given.
    """
    private, public = generate_principal_keys(signature_suite, kems)
    caps = set(capabilities)
    if _any_post_quantum(public):
        caps.add("pqc")
    if qkd_sae_id:
        caps.add("qkd")
    record = KeyRecord(
        principal_id=principal_id,
        kind=kind,
        version=version,
        key_id=derive_key_id(public),
        public_keys=public,
        signature_suite=signature_suite,
        capabilities=frozenset(caps),
        qkd_sae_id=qkd_sae_id,
        not_before=float(not_before),
        not_after=float(not_after),
        groups=frozenset(groups),
        overlap_s=float(overlap_s),
    )
    return IssuedKey(root.sign(record), PrincipalKeyFile.from_record(record, private))
