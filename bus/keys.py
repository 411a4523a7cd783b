"""Key-provider and signer interfaces, key paths and security profiles (the API side).

Processors only ever call ``KeyPath`` / ``SecurityProfile`` and ``Signer`` / ``Verifier``; raw
KEM, KDF and AEAD calls stay inside ``fleetbus.providers``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from fleetbus.bus.errors import FleetbusError, ReasonCode

if TYPE_CHECKING:
    from fleetbus.bus.settings import FleetbusSettings


class KeyAlgorithm(StrEnum):
    """Public-key algorithms a key-directory record may carry, by their wire name."""

    X25519 = "x25519"
    MLKEM768 = "mlkem768"
    XWING = "xwing"  # MLKEM768-X25519, HPKE KEM id 0x647a
    ED25519 = "ed25519"
    MLDSA65 = "mldsa65"


@dataclass(frozen=True)
class RecipientKeys:
    """What a sender knows about a recipient: its id, public keys and capabilities.

    ``public_keys`` maps a ``KeyAlgorithm`` to raw public-key bytes; ``key_ids`` maps the same
    algorithm to the key id (kid) that names that key in the key directory.
    """

    principal_id: str
    public_keys: Mapping[str, bytes]
    key_ids: Mapping[str, str]
    qkd_sae_id: str | None = None
    capabilities: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PrivateKeySet:
    """A principal's own private keys, by ``KeyAlgorithm`` wire name, as raw private bytes.

    ``repr`` never shows key material.
    """

    principal_id: str
    private_keys: Mapping[str, bytes] = field(repr=False)
    key_ids: Mapping[str, str] = field(default_factory=dict)
    qkd_sae_id: str | None = None


@dataclass(frozen=True)
class Encapsulation:
    """One provider's contribution to a message key.

    ``key_ref`` is what the envelope carries so that the recipient can recover the secret: an
    HPKE ``enc||ct`` for KEM providers, a QKD key_ID for ``qkd-etsi014``. ``key_id`` names the
    recipient key (or QKD key) used. ``shared_secret`` never leaves the process.
    """

    provider: str
    key_id: str
    key_ref: bytes
    shared_secret: bytes = field(repr=False)


@dataclass(frozen=True)
class ProviderTraits:
    """What a key provider is, declared once on its class and read without instantiating it
    (``fleetbus.bus.registry.key_provider_traits``). Every consumer (downgrade ordering, the
    worker, the vehicle agent, the key directory, the CLI) asks this instead of keeping a table.
    """

    #: Contributes a KEM believed to resist a quantum adversary (ML-KEM, X-Wing, a liboqs KEM).
    post_quantum_kem: bool = False
    #: Contributes a classical KEM (X25519, or the X25519 half of X-Wing).
    classical_kem: bool = False
    #: Contributes a QKD key (information-theoretic between *trusted* KMEs; docs/qkd.md).
    qkd: bool = False
    #: The key-establishment components it covers for ``is_at_least``; empty means just itself
    #: (X-Wing covers ``mlkem768`` and ``x25519`` because it is their hybrid).
    components: frozenset[str] = frozenset()
    #: The ``KeyAlgorithm`` of the recipient key pair in the key directory, or a family prefix
    #: ending in ``:`` (``oqs:`` + KEM name), or None when there is no recipient key (QKD).
    key_algorithm: str | None = None
    #: The recipient's key record must carry an ETSI 014 SAE id, and one instance speaks for one
    #: SAE (so the vehicle agent takes it as its own ``qkd_provider``, never from the settings).
    needs_sae_id: bool = False
    #: Loaded by every worker and agent without a key path naming it (cheap, always present).
    default: bool = False

    @property
    def quantum_safe(self) -> bool:
        """Its secret rests on no assumption a quantum computer is known to break."""
        return self.post_quantum_kem or self.qkd

    def covers(self, name: str) -> frozenset[str]:
        """The components of the provider registered as ``name``."""
        return self.components or frozenset({name})

    def owns_algorithm(self, algorithm: str) -> bool:
        """Whether a directory key of ``algorithm`` is this provider's recipient key."""
        if self.key_algorithm is None:
            return False
        if self.key_algorithm.endswith(":"):
            return algorithm.startswith(self.key_algorithm) and algorithm != self.key_algorithm
        return algorithm == self.key_algorithm


@dataclass(frozen=True)
class NoConfig:
    """The configuration of a provider that needs nothing from the settings."""


class KeyProvider(abc.ABC):
    """A source of shared secrets between the sealer and one recipient.

    A provider class declares ``traits`` (what it is) and ``config_from_settings`` (what it
    needs); both are read by the registry without instantiating it (docs/key-paths.md §0).
    """

    #: Entry-point name, e.g. ``"xwing"``; also the name used in key paths and envelopes.
    name: str
    #: What the provider is; see ``ProviderTraits``.
    traits: ClassVar[ProviderTraits] = ProviderTraits()
    #: The ``KeyAlgorithm`` of the recipient key pair, or None when there is none (QKD).
    algorithm: str | None = None
    #: False only for a pure in-process computation (no I/O, nothing to wait on): the sealer
    #: then calls it inline instead of in a thread under the provider timeout.
    may_block: bool = True

    @classmethod
    def config_from_settings(cls, settings: FleetbusSettings) -> Any:
        """The typed keyword configuration (a dataclass) this provider takes from ``settings``,
        or None when the settings do not configure it (then no process loads it). The default:
        it needs nothing."""
        return NoConfig()

    def generate_keypair(self) -> tuple[bytes, bytes]:
        """Return ``(private_bytes, public_bytes)`` in the raw form the provider reads."""
        raise KeyProviderError(f"provider {self.name!r} has no recipient key pair")

    @abc.abstractmethod
    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        """Sender side: create a fresh secret for ``recipient``, bound to ``context``."""

    @abc.abstractmethod
    def recover(self, key_ref: bytes, key_id: str, own: PrivateKeySet, *, context: bytes) -> bytes:
        """Receiver side: recover the secret from the envelope's ``key_ref``.

        Raises ``KeyProviderError`` with a reason code; never returns a wrong secret silently.
        """

    def healthy(self) -> bool:
        """Cheap health probe for circuit breakers and the provider-health metric."""
        return True


class Signer(abc.ABC):
    """Signs bytes with a principal's private key(s) for one signature suite."""

    suite: str  # "ed25519" | "mldsa65" | "composite-mldsa65-ed25519"
    key_id: str

    @abc.abstractmethod
    def sign(self, message: bytes) -> bytes: ...


class Verifier(abc.ABC):
    """Verifies a signature of one suite against a principal's public key(s)."""

    suite: str

    @abc.abstractmethod
    def verify(self, message: bytes, signature: bytes) -> bool:
        """True only when the signature is valid (for composite: every part is)."""


class SignatureSuite(abc.ABC):
    """Key generation plus signer/verifier construction for one suite (an entry point)."""

    name: str
    #: Whether forging needs a break of a post-quantum algorithm.
    post_quantum: bool = False

    @abc.abstractmethod
    def generate(self) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """Return ``(private_keys, public_keys)`` keyed by ``KeyAlgorithm`` wire name."""

    @abc.abstractmethod
    def signer(self, private_keys: Mapping[str, bytes], key_id: str) -> Signer: ...

    @abc.abstractmethod
    def verifier(self, public_keys: Mapping[str, bytes]) -> Verifier: ...


class KeyProviderError(FleetbusError):
    """A provider could not establish or recover a secret."""

    reason = ReasonCode.KEY_PROVIDER_FAILED


@dataclass(frozen=True)
class KeyPath:
    """An ordered combination of providers whose secrets are combined into one message key.

    Named by joining provider names with ``+``, e.g. ``qkd-etsi014+xwing``.
    """

    providers: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(self.providers)

    @classmethod
    def parse(cls, name: str) -> KeyPath:
        parts = tuple(p.strip() for p in name.split("+") if p.strip())
        if not parts:
            raise FleetbusError(f"empty key path {name!r}", reason=ReasonCode.CONFIG)
        return cls(parts)


@dataclass(frozen=True)
class SecurityProfile:
    """Key paths in preference order, the signature suite, and the recipient's minimum.

    ``allow_fallback`` False means: only ``key_paths[0]`` is ever used; when it fails the
    sealer retries with backoff and then rejects with a clear reason.
    """

    name: str
    key_paths: Sequence[KeyPath]
    signature_suite: str
    allow_fallback: bool
    minimum_path: KeyPath
