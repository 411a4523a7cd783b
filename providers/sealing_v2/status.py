"""Epoch status records of wire format v2: what a recipient tells the sender about an epoch."""

from __future__ import annotations

import time
from dataclasses import replace

from fleetbus.bus.envelope import (
    DEFAULT_MAX_SIZE,
    EnvelopeError,
)
from fleetbus.bus.envelope_v2 import (
    ParsedStatus,
    Status,
    StatusCode,
    decode_record,
    encode_status,
    status_bytes,
)
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import Signer
from fleetbus.providers.sealing import (
    SignerDirectory,
    VerifiedRoots,
    directory_verifier,
)
from fleetbus.providers.sealing.common import Clock
from fleetbus.providers.sealing_v2.opener import verify_signed_record
from fleetbus.providers.sealing_v2.sealer import sign_records


def sign_status(signer: Signer, sender: str, status: Status) -> bytes:
    """A signed status: a vehicle's ``epoch_unknown``, the bus's ``uplink_epoch_unknown``."""
    body = status_bytes(
        replace(status, sender=sender, sender_key_id=signer.key_id, signature_suite=signer.suite)
    )
    return encode_status(body, sign_records(signer, [body], batch=False)[0])


def open_status(
    data: bytes,
    *,
    topic: str,
    own_id: str,
    directory: SignerDirectory,
    clock: Clock = time.time,
    skew_s: float = 30.0,
    max_size: int = DEFAULT_MAX_SIZE,
    roots: VerifiedRoots | None = None,
    code: StatusCode = StatusCode.EPOCH_UNKNOWN,
    sender: str | None = None,
) -> Status:
    """Verify a status record addressed to ``own_id`` on ``topic`` with ``code``: the bus
    sealer reads ``epoch_unknown`` from vehicles; a vehicle reads ``uplink_epoch_unknown``
    from ``sender``, the bus sealer (docs/wire-format.md V2.4)."""
    try:
        parsed = decode_record(data, max_size=max_size)
        if not isinstance(parsed, ParsedStatus):
            raise EnvelopeError("not a status record", reason=ReasonCode.MALFORMED)
        status = parsed.status
        if (
            status.recipient != own_id
            or status.topic != topic
            or status.code is not code
            or (sender is not None and status.sender != sender)
        ):
            # The code is signed: a status of the other direction, or from a principal this
            # reader does not take statuses from, is not for this reader.
            raise EnvelopeError(
                "status is addressed to another principal, topic or direction",
                reason=ReasonCode.WRONG_RECIPIENT,
            )
        now = clock()
        now_ms = round(now * 1000)
        window_ms = round((skew_s + 60) * 1000)
        if status.at_ms > now_ms + window_ms:
            raise EnvelopeError("status is dated in the future", reason=ReasonCode.NOT_YET_VALID)
        if status.at_ms < now_ms - window_ms:
            raise EnvelopeError("status is stale", reason=ReasonCode.EXPIRED)
        opener_roots = roots if roots is not None else VerifiedRoots(16)
        verifier = directory_verifier(
            directory, status.sender, status.sender_key_id, status.signature_suite, now
        )
        verify_signed_record(
            parsed, verifier, status.sender, status.sender_key_id, opener_roots, now
        )
        return status
    except EnvelopeError:
        raise
    except Exception as exc:
        raise EnvelopeError(
            f"unexpected {type(exc).__name__} while opening a status",
            reason=ReasonCode.MALFORMED,
        ) from exc


def make_status(
    *,
    topic: str,
    recipient: str,
    epoch_id: bytes,
    sequence: int,
    at: float,
    code: StatusCode = StatusCode.EPOCH_UNKNOWN,
) -> Status:
    """An unsigned status (``sign_status`` fills in the sender)."""
    return Status(
        topic=topic,
        sender="-",
        sender_key_id="-",
        signature_suite="-",
        recipient=recipient,
        epoch_id=epoch_id,
        code=code,
        sequence=sequence,
        at_ms=round(at * 1000),
    )
