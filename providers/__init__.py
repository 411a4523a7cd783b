"""fleetbus.providers: key-provider and signer implementations (registered by entry point in
``pyproject.toml``, chosen by name through ``fleetbus.bus.registry``), key-path failover and the
envelope sealing engines. Loaded on first use: importing the package loads no provider.
"""

import typing as _typing

from fleetbus.bus.exports import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from fleetbus.providers.hpke import MLKEM768Provider, X25519Provider, XWingProvider
    from fleetbus.providers.keypath import (
        CircuitBreaker,
        FailoverEvent,
        KeyPathRunner,
        ProfileSealer,
    )
    from fleetbus.providers.oqs import OQSProvider
    from fleetbus.providers.qkd import QKDProvider
    from fleetbus.providers.sealing import EnvelopeOpener, EnvelopeSealer, EpochPolicy, SealRequest
    from fleetbus.providers.sealing_v2 import (
        EpochOpener,
        EpochSealer,
        MemoryEpochStore,
        SqliteEpochStore,
    )
    from fleetbus.providers.signers import CompositeMLDSA65Ed25519Suite, Ed25519Suite, MLDSA65Suite

__all__ = [
    "CircuitBreaker",
    "CompositeMLDSA65Ed25519Suite",
    "Ed25519Suite",
    "EnvelopeOpener",
    "EnvelopeSealer",
    "EpochOpener",
    "EpochPolicy",
    "EpochSealer",
    "FailoverEvent",
    "KeyPathRunner",
    "MLDSA65Suite",
    "MLKEM768Provider",
    "MemoryEpochStore",
    "OQSProvider",
    "ProfileSealer",
    "QKDProvider",
    "SealRequest",
    "SqliteEpochStore",
    "X25519Provider",
    "XWingProvider",
]

#: Where each public name lives; imported on first use (PEP 562).
_MODULE_OF: dict[str, str] = {
    "MLKEM768Provider": "fleetbus.providers.hpke",
    "X25519Provider": "fleetbus.providers.hpke",
    "XWingProvider": "fleetbus.providers.hpke",
    "CircuitBreaker": "fleetbus.providers.keypath",
    "FailoverEvent": "fleetbus.providers.keypath",
    "KeyPathRunner": "fleetbus.providers.keypath",
    "ProfileSealer": "fleetbus.providers.keypath",
    "OQSProvider": "fleetbus.providers.oqs",
    "QKDProvider": "fleetbus.providers.qkd",
    "EnvelopeOpener": "fleetbus.providers.sealing",
    "EnvelopeSealer": "fleetbus.providers.sealing",
    "EpochPolicy": "fleetbus.providers.sealing",
    "SealRequest": "fleetbus.providers.sealing",
    "EpochOpener": "fleetbus.providers.sealing_v2",
    "EpochSealer": "fleetbus.providers.sealing_v2",
    "MemoryEpochStore": "fleetbus.providers.sealing_v2",
    "SqliteEpochStore": "fleetbus.providers.sealing_v2",
    "CompositeMLDSA65Ed25519Suite": "fleetbus.providers.signers",
    "Ed25519Suite": "fleetbus.providers.signers",
    "MLDSA65Suite": "fleetbus.providers.signers",
}

__getattr__, __dir__ = _lazy_exports(__name__, _MODULE_OF)
