"""The record codec seam of the vehicle agent: by default the agent opens sealed envelopes and
seals its answers (the security of the bus); a ``RecordCodec`` replaces both, for a benchmark's
plaintext baseline or a test that feeds commands without envelopes. Never in production: a
codec skips every check the envelope makes (sender, signature, recipient, expiry, replay)."""

from __future__ import annotations

from typing import Protocol

from fleetbus.bus.commands import Command, Response, SignedCommand
from fleetbus.bus.envelope import DEFAULT_MAX_SIZE

__all__ = ["PlaintextCodec", "RecordCodec"]


class RecordCodec(Protocol):
    """Turns an outbound record into the command it carries, and an answer into a record."""

    def open_command(self, vehicle_id: str, value: bytes, topic: str) -> Command: ...

    def encode_response(self, vehicle_id: str, response: Response) -> bytes: ...


class PlaintextCodec:
    """Records are bare ``SignedCommand``s (the signature is not verified) and answers bare
    ``Response``s: the agent's loop and execute-once store without any cryptography."""

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.max_size = max_size

    def open_command(self, vehicle_id: str, value: bytes, topic: str) -> Command:
        return SignedCommand.decode(value, max_size=self.max_size).command

    def encode_response(self, vehicle_id: str, response: Response) -> bytes:
        return response.encode()
