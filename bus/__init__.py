"""fleetbus.bus: the contract processors, providers and clients meet on — errors, settings,
plugin loading, message and record formats, the envelope codecs, the key directory, topics.

It imports nothing of the project but itself; provider implementations are found by entry point
at start-up. The names below are its public API, loaded on first use (``import fleetbus.bus``
stays light); other names of its modules are internal to the rooms that meet here.
"""

import typing as _typing

from fleetbus.bus.exports import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from fleetbus.bus.commands import (
        Approval,
        Command,
        CommandState,
        Decision,
        Response,
        SignedApproval,
        SignedCommand,
        StatusEvent,
        Target,
        Telemetry,
        TelemetryBatch,
        new_command_id,
    )
    from fleetbus.bus.directory import (
        FleetRoot,
        KeyDirectory,
        KeyRecord,
        PrincipalKeyFile,
        RootPublicKey,
        SignedKeyRecord,
        load_directory,
        load_key_file,
    )
    from fleetbus.bus.envelope import EnvelopeError, MessageKind, decode_envelope
    from fleetbus.bus.errors import ConfigError, FleetbusError, KafkaUnavailableError, ReasonCode
    from fleetbus.bus.keyfolder import KeyFolder
    from fleetbus.bus.keys import (
        Encapsulation,
        KeyAlgorithm,
        KeyPath,
        KeyProvider,
        KeyProviderError,
        PrivateKeySet,
        RecipientKeys,
        SecurityProfile,
        SignatureSuite,
        Signer,
        Verifier,
    )
    from fleetbus.bus.registry import available, load_key_provider, load_signature_suite
    from fleetbus.bus.settings import (
        FleetbusSettings,
        ProfileRule,
        ProfileSettings,
        TopicNames,
    )
    from fleetbus.bus.settings_env import load_settings
    from fleetbus.bus.topics import ensure_topics

__all__ = [
    "Approval",
    "Command",
    "CommandState",
    "ConfigError",
    "Decision",
    "Encapsulation",
    "EnvelopeError",
    "FleetRoot",
    "FleetbusError",
    "FleetbusSettings",
    "KafkaUnavailableError",
    "KeyAlgorithm",
    "KeyDirectory",
    "KeyFolder",
    "KeyPath",
    "KeyProvider",
    "KeyProviderError",
    "KeyRecord",
    "MessageKind",
    "PrincipalKeyFile",
    "PrivateKeySet",
    "ProfileRule",
    "ProfileSettings",
    "ReasonCode",
    "RecipientKeys",
    "Response",
    "RootPublicKey",
    "SecurityProfile",
    "SignatureSuite",
    "SignedApproval",
    "SignedCommand",
    "SignedKeyRecord",
    "Signer",
    "StatusEvent",
    "Target",
    "Telemetry",
    "TelemetryBatch",
    "TopicNames",
    "Verifier",
    "available",
    "decode_envelope",
    "ensure_topics",
    "load_directory",
    "load_key_file",
    "load_key_provider",
    "load_settings",
    "load_signature_suite",
    "new_command_id",
]

#: Where each public name lives; imported on first use (PEP 562).
_MODULE_OF: dict[str, str] = {
    "KeyFolder": "fleetbus.bus.keyfolder",
    "Approval": "fleetbus.bus.commands",
    "Command": "fleetbus.bus.commands",
    "CommandState": "fleetbus.bus.commands",
    "Decision": "fleetbus.bus.commands",
    "Response": "fleetbus.bus.commands",
    "SignedApproval": "fleetbus.bus.commands",
    "SignedCommand": "fleetbus.bus.commands",
    "StatusEvent": "fleetbus.bus.commands",
    "Target": "fleetbus.bus.commands",
    "Telemetry": "fleetbus.bus.commands",
    "TelemetryBatch": "fleetbus.bus.commands",
    "new_command_id": "fleetbus.bus.commands",
    "FleetRoot": "fleetbus.bus.directory",
    "KeyDirectory": "fleetbus.bus.directory",
    "KeyRecord": "fleetbus.bus.directory",
    "PrincipalKeyFile": "fleetbus.bus.directory",
    "RootPublicKey": "fleetbus.bus.directory",
    "SignedKeyRecord": "fleetbus.bus.directory",
    "load_directory": "fleetbus.bus.directory",
    "load_key_file": "fleetbus.bus.directory",
    "EnvelopeError": "fleetbus.bus.envelope",
    "MessageKind": "fleetbus.bus.envelope",
    "decode_envelope": "fleetbus.bus.envelope",
    "ConfigError": "fleetbus.bus.errors",
    "FleetbusError": "fleetbus.bus.errors",
    "KafkaUnavailableError": "fleetbus.bus.errors",
    "ReasonCode": "fleetbus.bus.errors",
    "Encapsulation": "fleetbus.bus.keys",
    "KeyAlgorithm": "fleetbus.bus.keys",
    "KeyPath": "fleetbus.bus.keys",
    "KeyProvider": "fleetbus.bus.keys",
    "KeyProviderError": "fleetbus.bus.keys",
    "PrivateKeySet": "fleetbus.bus.keys",
    "RecipientKeys": "fleetbus.bus.keys",
    "SecurityProfile": "fleetbus.bus.keys",
    "SignatureSuite": "fleetbus.bus.keys",
    "Signer": "fleetbus.bus.keys",
    "Verifier": "fleetbus.bus.keys",
    "available": "fleetbus.bus.registry",
    "load_key_provider": "fleetbus.bus.registry",
    "load_signature_suite": "fleetbus.bus.registry",
    "FleetbusSettings": "fleetbus.bus.settings",
    "ProfileRule": "fleetbus.bus.settings",
    "ProfileSettings": "fleetbus.bus.settings",
    "TopicNames": "fleetbus.bus.settings",
    "load_settings": "fleetbus.bus.settings_env",
    "ensure_topics": "fleetbus.bus.topics",
}

__getattr__, __dir__ = _lazy_exports(__name__, _MODULE_OF)
