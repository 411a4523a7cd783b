"""Command-bus message models: signed commands and the approvals that bind them, responses,
status and telemetry.

Every model has a strict canonical-CBOR codec: ``decode`` accepts exactly the bytes ``encode``
would produce (deterministic encoding, exact field set, exact types, bounded sizes) and raises
``FleetbusError`` with reason MALFORMED or OVERSIZE for anything else. Times are float epoch
seconds in Python and integer milliseconds on the wire. The formats are described in
``docs/sdk.md`` ("Message formats").

One module per message family: ``command``, ``approval``, ``status`` (responses, lifecycle),
``telemetry``; ``ids`` (UUIDv7) and ``wire`` (constants and strict field readers). Import
from here.
"""

from __future__ import annotations

from fleetbus.bus.commands.approval import (
    Approval,
    Decision,
    SignedApproval,
)
from fleetbus.bus.commands.command import (
    Command,
    SignedCommand,
    Target,
)
from fleetbus.bus.commands.ids import (
    UUIDv7Generator,
    command_id_at,
    new_command_id,
    uuid7_timestamp_ms,
)
from fleetbus.bus.commands.status import (
    FINAL_STATES,
    CommandState,
    Response,
    StatusEvent,
    VerifiedResponse,
    group_targets,
    group_targets_detail,
)
from fleetbus.bus.commands.telemetry import (
    SIGNED_TELEMETRY_CAPABILITY,
    TELEMETRY_BATCH_CONTEXT,
    SignedTelemetryBatch,
    Telemetry,
    TelemetryBatch,
    decode_batch_payload,
)
from fleetbus.bus.commands.wire import (
    APPROVAL_CONTEXT,
    COMMAND_CONTEXT,
    COMMAND_DIGEST_CONTEXT,
    MAX_MESSAGE_SIZE,
    ParamValue,
)

__all__ = [
    "APPROVAL_CONTEXT",
    "COMMAND_CONTEXT",
    "COMMAND_DIGEST_CONTEXT",
    "FINAL_STATES",
    "MAX_MESSAGE_SIZE",
    "SIGNED_TELEMETRY_CAPABILITY",
    "TELEMETRY_BATCH_CONTEXT",
    "Approval",
    "Command",
    "CommandState",
    "Decision",
    "ParamValue",
    "Response",
    "SignedApproval",
    "SignedCommand",
    "SignedTelemetryBatch",
    "StatusEvent",
    "Target",
    "Telemetry",
    "TelemetryBatch",
    "UUIDv7Generator",
    "VerifiedResponse",
    "command_id_at",
    "decode_batch_payload",
    "group_targets",
    "group_targets_detail",
    "new_command_id",
    "uuid7_timestamp_ms",
]
