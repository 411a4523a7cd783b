"""One recorded ETSI GS QKD 014 key, for the test-vector generators of both wire formats.

``RecordedQKD`` is ``qkd-etsi014`` on the sender's side with its KME replaced by the recorded
key: ``enc_keys`` hands it out, ``dec_keys`` by its key_ID on the recipient's side. Generation
only: the tests open through ``QKDProvider`` itself, answering its ``dec_keys`` call from
``QKDRecording.to_json()`` (``RecordedKME`` in tests/support/envelope.py; docs/qkd.md).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from fleetbus.bus.keys import Encapsulation, KeyProvider, PrivateKeySet, RecipientKeys

__all__ = ["QKDRecording", "RecordedQKD"]


@dataclass(frozen=True)
class QKDRecording:
    """The bus's SAE (master), the vehicle's (slave), and the key the KME pair handed both."""

    master_sae_id: str
    slave_sae_id: str
    key_id: str
    key: bytes

    def to_json(self) -> dict[str, Any]:
        """The recorded 014 exchange, as the vehicle's SAE sees it (a vector's ``qkd`` block)."""
        return {
            "master_sae_id": self.master_sae_id,
            "slave_sae_id": self.slave_sae_id,
            "key_size_bits": 8 * len(self.key),
            "key_ID": self.key_id,
            "key": self.key.hex(),
            "dec_keys_request": {"key_IDs": [{"key_ID": self.key_id}]},
            "dec_keys_response": {
                "keys": [{"key_ID": self.key_id, "key": base64.b64encode(self.key).decode()}]
            },
        }


class RecordedQKD(KeyProvider):
    """``qkd-etsi014`` answered from ``recording`` (see the module doc)."""

    name = "qkd-etsi014"

    def __init__(self, recording: QKDRecording) -> None:
        self.recording = recording

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        rec = self.recording
        assert recipient.qkd_sae_id == rec.slave_sae_id
        return Encapsulation(self.name, rec.key_id, rec.key_id.encode(), rec.key)

    def recover(self, key_ref: bytes, key_id: str, own: PrivateKeySet, *, context: bytes) -> bytes:
        assert key_ref == self.recording.key_id.encode() == key_id.encode()
        return self.recording.key
