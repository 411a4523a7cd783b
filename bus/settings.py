"""Settings for every fleetbus process, read from FLEETBUS_* environment variables."""

from __future__ import annotations

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TopicNames(BaseModel):
    """Kafka topic names. The prefix lets several fleets share one cluster."""

    prefix: str = "fleet."
    commands_requested: str = "commands.requested"
    commands_authorized: str = "commands.authorized"
    commands_rejected: str = "commands.rejected"
    commands_outbound: str = "commands.outbound"
    commands_responses: str = "commands.responses"
    commands_approvals: str = "commands.approvals"
    commands_status: str = "commands.status"
    telemetry_raw: str = "telemetry.raw"
    telemetry_verified: str = "telemetry.verified"
    keys: str = "keys"
    audit: str = "audit"
    dlq: str = "dlq"

    def full(self, name: str) -> str:
        """The topic as it is named on the broker, e.g. ``fleet.commands.requested``."""
        return self.prefix + name


class FleetbusSettings(BaseSettings):
    """Process settings. Nested fields use ``__``: ``FLEETBUS_TOPICS__PREFIX=acme.``."""

    model_config = SettingsConfigDict(
        env_prefix="FLEETBUS_", env_nested_delimiter="__", extra="ignore"
    )

    kafka_bootstrap: str = Field(
        default="127.0.0.1:19092", description="Kafka bootstrap servers, comma separated"
    )
    app_id: str = Field(default="fleetbus", description="faust application id / consumer group")
    partitions: int = Field(default=4, ge=1, description="partitions of the topics we create")
    processing_guarantee: str = Field(
        default="exactly_once", pattern="^(exactly_once|at_least_once)$"
    )
    data_dir: str = Field(
        default="~/.local/state/fleetbus", description="faust table state directory"
    )
    web_port: int = Field(default=6066, ge=0, le=65535, description="faust web / metrics port")
    broker_session_timeout_s: float = Field(default=10.0, gt=0)
    broker_heartbeat_interval_s: float = Field(default=1.0, gt=0)
    topics: TopicNames = Field(default_factory=TopicNames)
    # Smoke pipeline (foundation demo): forwards `smoke_source` to `smoke_sink`.
    smoke_source: str = "fleet.smoke.in"
    smoke_sink: str = "fleet.smoke.out"
