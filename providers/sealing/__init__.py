"""Seal and open fleetbus envelopes (wire format v1): key epochs, per-message keys, AES-256-GCM,
signatures.

``EnvelopeSealer`` (``sealer``) is the sending side (dispatch bus, vehicle responses,
telemetry); ``EnvelopeOpener`` (``opener``) the receiving side, with its bounded memories in
``replay``; ``common`` holds what both wire formats share. The byte format lives in
``fleetbus.bus.envelope`` and is specified, with the check order of ``open``, in
``docs/wire-format.md``.
"""

from fleetbus.providers.sealing.common import (
    EpochPolicy,
    OpenedEnvelope,
    SealRequest,
    SignerDirectory,
    check_key_ids,
    derive_message_key,
    directory_verifier,
    recipient_fingerprint,
    recover_epoch_key,
)
from fleetbus.providers.sealing.opener import EnvelopeOpener, OpenerStats
from fleetbus.providers.sealing.replay import ReplayCache, VerifiedRoots
from fleetbus.providers.sealing.sealer import EnvelopeSealer, PreparedEnvelope, SealerStats

__all__ = [
    "EnvelopeOpener",
    "EnvelopeSealer",
    "EpochPolicy",
    "OpenedEnvelope",
    "OpenerStats",
    "PreparedEnvelope",
    "ReplayCache",
    "SealRequest",
    "SealerStats",
    "SignerDirectory",
    "VerifiedRoots",
    "check_key_ids",
    "derive_message_key",
    "directory_verifier",
    "recipient_fingerprint",
    "recover_epoch_key",
]
