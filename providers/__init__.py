"""fleetbus.providers: the implementations behind the ``fleetbus.bus`` interfaces.

Key providers and signature suites (found by entry point through ``fleetbus.bus.registry``; each
key provider declares its traits and configuration, docs/key-paths.md §0), the resilience layers
around a provider, key paths with failover, and the sealing and opening engines of both wire
formats. Lower-level pieces (Merkle trees, HKDF derivations, epoch windows) stay in their
modules.
"""

from fleetbus.providers.combiner import combine
from fleetbus.providers.hpke import MLKEM768Provider, X25519Provider, XWingProvider
from fleetbus.providers.keypath import (
    REASON_CIRCUIT_OPEN,
    REASON_NOT_CONFIGURED,
    REASON_RECIPIENT_INCAPABLE,
    REASON_TIMEOUT,
    FailoverEvent,
    KeyPathResult,
    KeyPathRunner,
    ProfileSealer,
    is_at_least,
    path_strength,
)
from fleetbus.providers.oqs import OQSConfig, OQSProvider, liboqs_available
from fleetbus.providers.qkd import QKDConfig, QKDProvider, kme_id_of_certificate
from fleetbus.providers.resilience import (
    BreakerState,
    CircuitBreaker,
    InstrumentedProvider,
    ProviderUnavailable,
    ProviderWrapper,
    ResilientProvider,
)
from fleetbus.providers.sealing import (
    EnvelopeOpener,
    EnvelopeSealer,
    EpochPolicy,
    OpenedEnvelope,
    ReplayCache,
    SealRequest,
    SignerDirectory,
    VerifiedRoots,
)
from fleetbus.providers.sealing_v2 import (
    AcceptedEpoch,
    AuthenticatedRejectError,
    EpochOpener,
    EpochSealer,
    EpochStore,
    EpochUnknownError,
    MemoryEpochStore,
    SqliteEpochStore,
)
from fleetbus.providers.signers import (
    CompositeMLDSA65Ed25519Suite,
    Ed25519Suite,
    MLDSA65Suite,
)

__all__ = [
    "REASON_CIRCUIT_OPEN",
    "REASON_NOT_CONFIGURED",
    "REASON_RECIPIENT_INCAPABLE",
    "REASON_TIMEOUT",
    "AcceptedEpoch",
    "AuthenticatedRejectError",
    "BreakerState",
    "CircuitBreaker",
    "CompositeMLDSA65Ed25519Suite",
    "Ed25519Suite",
    "EnvelopeOpener",
    "EnvelopeSealer",
    "EpochOpener",
    "EpochPolicy",
    "EpochSealer",
    "EpochStore",
    "EpochUnknownError",
    "FailoverEvent",
    "InstrumentedProvider",
    "KeyPathResult",
    "KeyPathRunner",
    "MLDSA65Suite",
    "MLKEM768Provider",
    "MemoryEpochStore",
    "OQSConfig",
    "OQSProvider",
    "OpenedEnvelope",
    "ProfileSealer",
    "ProviderUnavailable",
    "ProviderWrapper",
    "QKDConfig",
    "QKDProvider",
    "ReplayCache",
    "ResilientProvider",
    "SealRequest",
    "SignerDirectory",
    "SqliteEpochStore",
    "VerifiedRoots",
    "X25519Provider",
    "XWingProvider",
    "combine",
    "is_at_least",
    "kme_id_of_certificate",
    "liboqs_available",
    "path_strength",
]
