"""Seal and open wire format v2: one signed establishment per epoch, then small messages.

``EpochSealer`` (``sealer``) is the sending side, ``EpochOpener`` (``opener``) the receiving
side over an ``EpochStore`` (``epochs``: accepted epochs and their replay windows); ``status``
holds the epoch status records a recipient sends back. The byte format lives in
``fleetbus.bus.envelope_v2`` and is specified in ``docs/wire-format.md`` (V2).
"""

from fleetbus.providers.sealing.common import directory_verifier
from fleetbus.providers.sealing_v2.epochs import (
    REPLAY_WINDOW,
    EpochStore,
    MemoryEpochStore,
    SqliteEpochStore,
    StoredEpoch,
    window_admits,
    window_record,
)
from fleetbus.providers.sealing_v2.opener import (
    AcceptedEpoch,
    AuthenticatedRejectError,
    EpochOpener,
    EpochUnknownError,
    StatusRecordError,
    verify_signed_record,
)
from fleetbus.providers.sealing_v2.sealer import (
    EpochSealer,
    PreparedMessage,
    derive_epoch_secret,
    derive_message_key_nonce,
)
from fleetbus.providers.sealing_v2.status import make_status, open_status, sign_status

__all__ = [
    "REPLAY_WINDOW",
    "AcceptedEpoch",
    "AuthenticatedRejectError",
    "EpochOpener",
    "EpochSealer",
    "EpochStore",
    "EpochUnknownError",
    "MemoryEpochStore",
    "PreparedMessage",
    "SqliteEpochStore",
    "StatusRecordError",
    "StoredEpoch",
    "derive_epoch_secret",
    "derive_message_key_nonce",
    "directory_verifier",
    "make_status",
    "open_status",
    "sign_status",
    "verify_signed_record",
    "window_admits",
    "window_record",
]
