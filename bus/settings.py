"""Settings for every fleetbus process, read from FLEETBUS_* environment variables.

The models are here; ``fleetbus.bus.settings_env`` has the variable reference and
``load_settings`` (errors that name the variable).
"""

from __future__ import annotations

import re
import ssl
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleetbus.bus.topics import FLEET_TOPICS

__all__ = [
    "FleetbusSettings",
    "ProfileRule",
    "ProfileSettings",
    "TopicNames",
]


class TopicNames(BaseModel):
    """Kafka topic names. The prefix lets several fleets share one cluster."""

    prefix: str = Field(default="fleet.", description="put before every topic name below")
    commands_requested: str = Field(
        default="commands.requested", description="signed commands from dispatchers"
    )
    commands_authorized: str = Field(
        default="commands.authorized",
        description="commands the policy allowed: the seal stage's copy keyed by vehicle id (a "
        "group's on every partition), the track stage's by command id (docs/pipeline.md)",
    )
    commands_rejected: str = Field(
        default="commands.rejected", description="commands refused, with the reason"
    )
    commands_outbound: str = Field(
        default="commands.outbound", description="sealed envelopes, keyed by vehicle id"
    )
    commands_responses: str = Field(
        default="commands.responses",
        description="sealed answers of vehicles: wire v2 keyed by vehicle id, v1 by command id",
    )
    commands_responses_verified: str = Field(
        default="commands.responses.verified",
        description="answers the response stage verified, keyed by command id",
    )
    commands_approvals: str = Field(
        default="commands.approvals", description="signed approvals of high-criticality commands"
    )
    commands_status: str = Field(
        default="commands.status", description="lifecycle events, keyed by command id"
    )
    telemetry_raw: str = Field(default="telemetry.raw", description="sealed vehicle telemetry")
    telemetry_verified: str = Field(
        default="telemetry.verified", description="opened telemetry, filtered by policy"
    )
    keys: str = Field(default="keys", description="the key directory (compacted)")
    audit: str = Field(default="audit", description="the hash-chained audit trail")
    dlq: str = Field(default="dlq", description="dead letters, with a reason code")

    def full(self, name: str) -> str:
        """The topic as it is named on the broker, e.g. ``fleet.commands.requested``."""
        return self.prefix + name

    def fleet_topics(self) -> list[str]:
        """The full names of the regular topics (``fleetbus.bus.topics.FLEET_TOPICS``)."""
        return [self.full(getattr(self, field)) for field in FLEET_TOPICS]


class ProfileSettings(BaseModel):
    """A security profile: key paths in preference order (``+`` joins providers)."""

    key_paths: list[str] = Field(
        description="key paths in preference order, e.g. qkd-etsi014+xwing"
    )
    allow_fallback: bool = Field(
        default=True, description="False: only the first path; retry with backoff, then reject"
    )
    minimum_path: str = Field(description="the weakest path a recipient must accept")


class ProfileRule(BaseModel):
    """First matching rule picks the profile of an (action criticality, vehicle) pair.

    ``criticality`` None matches any; ``capability`` None matches any vehicle, otherwise the
    vehicle's key record must carry it (``pqc``, ``qkd``).
    """

    profile: str
    criticality: str | None = None
    capability: str | None = None


def _default_profiles() -> dict[str, ProfileSettings]:
    return {
        "enclave": ProfileSettings(
            key_paths=["qkd-etsi014+xwing"], allow_fallback=False, minimum_path="qkd-etsi014+xwing"
        ),
        "standard": ProfileSettings(key_paths=["qkd-etsi014+xwing", "xwing"], minimum_path="xwing"),
        "pqc": ProfileSettings(key_paths=["xwing"], minimum_path="xwing"),
        # Only ever chosen for vehicles without the pqc capability (see profile_rules).
        "legacy": ProfileSettings(key_paths=["x25519"], minimum_path="x25519"),
    }


def _default_rules() -> list[ProfileRule]:
    return [
        ProfileRule(profile="enclave", criticality="high", capability="qkd"),
        ProfileRule(profile="standard", capability="qkd"),
        ProfileRule(profile="pqc", capability="pqc"),
        ProfileRule(profile="legacy"),
    ]


_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")


class FleetbusSettings(BaseSettings):
    """Process settings. Nested fields use ``__``: ``FLEETBUS_TOPICS__PREFIX=acme.``."""

    model_config = SettingsConfigDict(
        env_prefix="FLEETBUS_", env_nested_delimiter="__", extra="ignore"
    )

    kafka_bootstrap: str = Field(
        default="127.0.0.1:19092", description="Kafka bootstrap servers, comma separated"
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL"] = Field(
        default="PLAINTEXT",
        description="PLAINTEXT, or SSL: TLS to the brokers, with a client certificate (mTLS) "
        "when kafka_ssl_certfile/keyfile are set",
    )
    kafka_ssl_cafile: str | None = Field(
        default=None, description="CA bundle (PEM) the broker certificates are checked against"
    )
    kafka_ssl_certfile: str | None = Field(
        default=None, description="client certificate (PEM); its CN is the Kafka principal"
    )
    kafka_ssl_keyfile: str | None = Field(default=None, description="client private key (PEM)")
    kafka_ssl_check_hostname: bool = Field(
        default=True, description="check the broker certificate names the host connected to"
    )
    app_id: str = Field(
        default="fleetbus",
        description="names the worker's consumer groups, transactional ids and state topics "
        "(and the faust app); vehicle agents' groups start with it",
    )
    partitions: int = Field(
        default=4,
        ge=1,
        description="partitions of the topics we create; must equal those of existing topics "
        "(a group command goes to each partition of commands.authorized) and should equal the "
        "directory head's vehicle buckets (`fleetbus keys init` takes it as its --buckets "
        "default, `keys rehead --buckets` changes a head's; docs/key-management.md)",
    )
    directory_scope: Literal["fleet", "partitions"] = Field(
        default="fleet",
        description="which vehicles' key records the worker holds: fleet (every vehicle: the "
        "default while agents answer in wire v1, whose answers reach any partition) or "
        "partitions (those of the partitions its seal, response and telemetry stages are "
        "assigned, loaded and dropped as they move; docs/key-management.md)",
    )
    key_topic_read_margin_s: float = Field(
        default=3600.0,
        description="how far before its key directory's head a process starts reading the key "
        "topic at start-up and when a worker takes a bucket: what the directory file holds "
        "was published before the root signed its head, so only later items are read (by "
        "their Kafka timestamps, this margin allowing for the root holder's clock); negative: "
        "the whole topic (docs/key-management.md)",
    )
    processing_guarantee: Literal["exactly_once"] = Field(
        default="exactly_once",
        description="always exactly_once: every stage commits each batch in one Kafka "
        "transaction (at_least_once, which reached only the smoke forwarder, is refused)",
    )
    data_dir: str = Field(
        default="~/.local/state/fleetbus",
        description="the worker's state folder: the highest key-directory head it accepted, "
        "and faust's files",
    )
    web_port: int = Field(
        default=6066,
        ge=0,
        le=65535,
        description="faust's own web server in the worker, on 127.0.0.1 (0: off); metrics "
        "and probes are on metrics_port",
    )
    broker_session_timeout_s: float = Field(
        default=10.0, gt=0, description="consumer-group session timeout"
    )
    broker_heartbeat_interval_s: float = Field(
        default=1.0, gt=0, description="consumer-group heartbeat interval"
    )
    topics: TopicNames = Field(default_factory=TopicNames, description="topic names")
    smoke_source: str = Field(
        default="fleet.smoke.in", description="the smoke forwarder's input (forwarded as is)"
    )
    smoke_sink: str = Field(default="fleet.smoke.out", description="the smoke forwarder's output")

    # --- command pipeline ------------------------------------------------------------------
    pipeline: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="run the five stages (authorize, seal, responses, track, telemetry) in the "
        "worker; auto: when keys_dir holds a key directory",
    )
    keys_dir: str = Field(
        default="~/.config/fleetbus/keys",
        description="key directory made by `fleetbus keys` (root.pub, directory.cbor, *.key)",
    )
    sealer_principal: str = Field(
        default="bus-sealer", description="principal whose keys seal commands and sign audit"
    )
    fleet_registry: str | None = Field(
        default=None,
        description="operators/vehicles/groups/actions file (JSON); default keys_dir/fleet.json",
    )
    policy_dir: str | None = Field(
        default=None, description="folder of *.cedar policies; default: the packaged policies"
    )
    approval_window_s: float = Field(
        default=300.0, gt=0, description="how long a high-criticality command waits for approvals"
    )
    approvals_required: int = Field(
        default=1, ge=0, description="M of M-of-N: distinct approvers a high-criticality needs"
    )
    replay_ttl_s: float = Field(
        default=86400.0,
        gt=0,
        description="longest command lifetime accepted, and how long (+ skew) after its UUIDv7 "
        "time a command id is accepted and kept in the replay set",
    )
    clock_skew_s: float = Field(default=30.0, ge=0, description="allowed clock skew")
    uplink_max_lifetime_s: float = Field(
        default=900.0,
        gt=0,
        description="longest time ahead a response/telemetry envelope may expire; later is "
        "refused (policy_denied), so replay ids are kept at most this long + skew",
    )
    uplink_ids_per_sender: int = Field(
        default=10_000,
        ge=1,
        description="live uplink message ids one vehicle may have in one partition's replay "
        "state; more are refused (sender_state_full) for that vehicle only",
    )
    uplink_held_per_sender: int = Field(
        default=100,
        ge=1,
        description="responses one vehicle may have held (their command's authorized record "
        "not yet seen) in one partition; more are refused (sender_state_full)",
    )
    max_message_bytes: int = Field(
        default=32 * 1024, ge=1024, description="larger input records go to the DLQ (oversize)"
    )
    seal_epochs: bool = Field(
        default=False, description="reuse one key establishment per (vehicle, profile) epoch"
    )
    epoch_max_age_s: float = Field(default=300.0, gt=0, description="key epoch lifetime")
    epoch_max_messages: int = Field(default=10_000, ge=1, description="messages per key epoch")
    batch_signing: bool = Field(
        default=False, description="one signature over a Merkle root per sealed batch"
    )
    wire_version: int = Field(
        default=2,
        ge=1,
        le=2,
        description="2: the bus writes wire format v2 to vehicles whose directory record has the "
        "capability wire2, v1 to the others; 1: v1 to all (docs/wire-format.md V2.10)",
    )
    profiles: dict[str, ProfileSettings] = Field(
        default_factory=_default_profiles, description="security profiles by name"
    )
    profile_rules: list[ProfileRule] = Field(
        default_factory=_default_rules, description="first match picks the profile"
    )
    response_minimum_path: str = Field(
        default="xwing",
        description="key path responses/telemetry of pqc-capable vehicles must contain",
    )
    legacy_minimum_path: str = Field(
        default="x25519", description="the same for vehicles without the pqc capability"
    )
    qkd_kme_url: str | None = Field(default=None, description="the bus's ETSI 014 KME (https)")
    qkd_kme_id: str | None = Field(
        default=None,
        description="KME ID the KME's server certificate must name (subject CN); required "
        "with qkd_kme_url",
    )
    qkd_sae_id: str | None = Field(default=None, description="the bus's SAE id at its KME")
    qkd_ca_file: str | None = Field(default=None, description="CA of the KME (PEM)")
    qkd_cert_file: str | None = Field(default=None, description="client certificate (PEM)")
    qkd_key_file: str | None = Field(default=None, description="client private key (PEM)")
    provider_timeout_s: float = Field(default=5.0, gt=0, description="per key-provider call")
    keypath_retries: int = Field(default=2, ge=0, description="retries of a no-fallback path")
    keypath_breaker_reset_s: float = Field(
        default=30.0, gt=0, description="seconds an open provider circuit waits before a probe"
    )
    audit_checkpoint_every: int = Field(
        default=100, ge=1, description="records between signed audit checkpoints"
    )
    telemetry_batch_readings: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="vehicle SDK, wire v2 uplink: readings per telemetry batch (flushed then)",
    )
    telemetry_batch_bytes: int = Field(
        default=8192, ge=256, description="... or when the batch's readings reach this many bytes"
    )
    telemetry_batch_age_s: float = Field(
        default=5.0, gt=0, description="... or when its oldest reading is this old"
    )
    telemetry_sign: bool = Field(
        default=False,
        description="vehicle SDK, wire v2 uplink: sign each telemetry batch with the vehicle's "
        "own directory key (non-repudiation; docs/sdk.md, 'Signed telemetry')",
    )
    telemetry_require_signed: bool = Field(
        default=False,
        description="telemetry stage: refuse unsigned telemetry from every vehicle, not only "
        "from those whose record carries the signed-telemetry capability",
    )
    telemetry_consumer: str = Field(
        default="analytics", description="consumer the telemetry export policy is evaluated for"
    )
    stage_batch_size: int = Field(
        default=50, ge=1, description="input records per partition committed in one transaction"
    )
    tick_interval_s: float = Field(
        default=1.0, gt=0, description="how often expiry and approval-window timers run"
    )
    vehicle_confine_partitions: bool = Field(
        default=False,
        description="vehicle agents read only the commands.outbound partitions their own "
        "vehicles hash to (explicit assignment, no consumer group rebalancing) instead of "
        "joining a group over the whole topic; see docs/sdk.md",
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Prometheus /metrics port of the worker; 0: off"
    )
    metrics_bind: str = Field(default="127.0.0.1", description="address /metrics listens on")

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_is_host_port_list(cls, value: str) -> str:
        # A typo here otherwise surfaces as a connection timeout, or as a DNS lookup of
        # "kafka://broker" (a URL where kafka-python wants host:port), after 30 s.
        for entry in value.split(","):
            match = _HOST_PORT.fullmatch(entry.strip())
            if match is None or not 0 < int(match.group("port")) < 65536:
                raise ValueError(f"{entry.strip()!r} is not host:port (port 1..65535)")
        return value

    @model_validator(mode="after")
    def _qkd_trust_complete(self) -> FleetbusSettings:
        # Without a CA file the TLS context would trust the system store: any public CA could
        # then vouch for "the KME" and receive our SAE's requests for keys.
        if self.qkd_kme_url:
            missing = [
                name
                for name in ("qkd_ca_file", "qkd_cert_file", "qkd_key_file")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(f"qkd_kme_url is set but {', '.join(missing)} are not")
        return self

    @model_validator(mode="after")
    def _kafka_tls_complete(self) -> FleetbusSettings:
        if self.kafka_security_protocol == "SSL":
            if not self.kafka_ssl_cafile:
                raise ValueError("kafka_security_protocol SSL needs kafka_ssl_cafile")
            if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
                raise ValueError("set both kafka_ssl_certfile and kafka_ssl_keyfile, or neither")
        elif self.kafka_ssl_certfile or self.kafka_ssl_keyfile or self.kafka_ssl_cafile:
            raise ValueError("kafka_ssl_* files are set but kafka_security_protocol is PLAINTEXT")
        return self

    def kafka_client_config(self) -> dict[str, Any]:
        """Security keyword arguments for kafka-python clients (producer, consumer, admin)."""
        if self.kafka_security_protocol == "PLAINTEXT":
            return {}
        config: dict[str, Any] = {
            "security_protocol": "SSL",
            "ssl_cafile": self.kafka_ssl_cafile,
            "ssl_check_hostname": self.kafka_ssl_check_hostname,
        }
        if self.kafka_ssl_certfile:
            config["ssl_certfile"] = self.kafka_ssl_certfile
            config["ssl_keyfile"] = self.kafka_ssl_keyfile
        return config

    def kafka_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for aiokafka and faust (None with PLAINTEXT): TLS 1.2+, the broker
        verified against ``kafka_ssl_cafile``, our certificate presented when configured."""
        if self.kafka_security_protocol == "PLAINTEXT":
            return None
        context = ssl.create_default_context(cafile=self.kafka_ssl_cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = self.kafka_ssl_check_hostname
        if self.kafka_ssl_certfile:
            context.load_cert_chain(self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        return context

    def aiokafka_client_config(self) -> dict[str, Any]:
        """Security keyword arguments for aiokafka clients."""
        context = self.kafka_ssl_context()
        if context is None:
            return {}
        return {"security_protocol": "SSL", "ssl_context": context}
