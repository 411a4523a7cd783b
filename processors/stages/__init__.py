"""The pipeline's business logic as plain functions over records: decode → verify → decide →
seal → outputs. No Kafka here; ``fleetbus.processors.eos`` runs these exactly once.

One module per stage: ``authorize`` (identity, freshness, replay, Cedar policy, group
expansion, M-of-N approvals), ``seal`` (profile choice, sealing with failover), ``responses``
(open and verify the vehicles' answers), ``track`` (lifecycle, expiry, end-to-end latency) and
``telemetry`` (open, export policy); ``common`` holds the topic names and the records between
stages, ``opening`` the uplink opener, the v1 uplink prelude and the v2 uplink epoch acceptance
the response and telemetry stages share.
"""

from fleetbus.processors.stages.authorize import AuthorizeStage, CommandEntry
from fleetbus.processors.stages.common import (
    AuthorizedCommand,
    PipelineTopics,
    RejectedCommand,
    reject,
    status_output,
)
from fleetbus.processors.stages.opening import UplinkOpener
from fleetbus.processors.stages.responses import ResponseStage
from fleetbus.processors.stages.seal import ProfileChoice, SealStage, profile_from_settings
from fleetbus.processors.stages.telemetry import TelemetryStage
from fleetbus.processors.stages.track import ACTIVE_STATES, TrackStage

__all__ = [
    "ACTIVE_STATES",
    "AuthorizeStage",
    "AuthorizedCommand",
    "CommandEntry",
    "PipelineTopics",
    "ProfileChoice",
    "RejectedCommand",
    "ResponseStage",
    "SealStage",
    "TelemetryStage",
    "TrackStage",
    "UplinkOpener",
    "profile_from_settings",
    "reject",
    "status_output",
]
