"""The worker: the command pipeline built from settings, and the faust app that hosts it.

``build_pipeline(settings)`` loads keys, registry and policies and builds the authorize, seal,
response, track and telemetry stages, each in a ``TransactionalStage`` runner.
``create_app(settings)`` is the host: a faust app (no module-level app: every process builds
its own) that starts and stops each runner with the faust worker as a ``mode.Service``, beside
the smoke forwarder.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust
from faust import SSLCredentials
from mode import Service

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.keyfolder import ROOT_KEY, KeyFolder
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.processors.smoke import add_smoke_forwarder

if TYPE_CHECKING:
    from fleetbus.bus.directory import KeyDirectory, RootPublicKey
    from fleetbus.bus.keys import SecurityProfile
    from fleetbus.processors.eos import AssignmentListener, TransactionalStage
    from fleetbus.processors.fleet_registry import DirectoryRoster

_log = logging.getLogger(__name__)


def faust_config(settings: FleetbusSettings) -> dict[str, Any]:
    """faust settings derived from ours; kept in one place so tests and workers agree."""
    context = settings.kafka_ssl_context()
    tls: dict[str, Any] = {} if context is None else {"broker_credentials": SSLCredentials(context)}
    return {
        **tls,
        "broker": [f"kafka://{hp.strip()}" for hp in settings.kafka_bootstrap.split(",")],
        "store": "memory://",
        "processing_guarantee": settings.processing_guarantee,
        "datadir": os.path.expanduser(settings.data_dir),
        "web_enabled": settings.web_port != 0,
        "web_port": settings.web_port or 6066,
        "web_bind": "127.0.0.1",
        "broker_session_timeout": settings.broker_session_timeout_s,
        "broker_heartbeat_interval": settings.broker_heartbeat_interval_s,
        "consumer_auto_offset_reset": "earliest",
        "topic_partitions": settings.partitions,
        # The leader topic is one more auto-declared topic we do not use.
        "topic_disable_leader": True,
        "producer_acks": -1,
    }


def pipeline_enabled(settings: FleetbusSettings) -> bool:
    """``pipeline`` on/off, or auto: on when ``keys_dir`` holds a key directory."""
    if settings.pipeline == "off":
        return False
    if settings.pipeline == "on":
        return True
    return (KeyFolder(Path(settings.keys_dir).expanduser()).root_pub).exists()


def state_topic(settings: FleetbusSettings, stage: str) -> str:
    """The compacted changelog of one stage's partition state."""
    return settings.topics.full(f"state.{settings.app_id}.{stage}")


STAGES = ("authorize", "seal", "responses", "track", "telemetry")
"""The pipeline's stages, in the order a command meets them; each has a state changelog."""


def pipeline_topics(settings: FleetbusSettings) -> tuple[list[str], list[str]]:
    """(regular topics, compacted topics: the stages' state changelogs and the key topic) the
    pipeline needs."""
    t = settings.topics
    regular = t.fleet_topics()
    compacted = [state_topic(settings, s) for s in STAGES]
    return regular, [*compacted, t.full(t.keys)]


def ensure_pipeline_topics(settings: FleetbusSettings) -> list[str]:
    """Create what the pipeline needs and does not exist yet: the regular topics, the compacted
    state changelogs and the audit topic — one partition, so each chain's order is the log's
    (docs/audit.md). Returns every name, in that order."""
    from fleetbus.bus.topics import ensure_topics

    regular, compacted = pipeline_topics(settings)
    audit = settings.topics.full(settings.topics.audit)
    bootstrap, partitions = settings.kafka_bootstrap, settings.partitions
    tls = settings.kafka_client_config()
    ensure_topics(bootstrap, regular, partitions=partitions, client_config=tls)
    ensure_topics(
        bootstrap,
        compacted,
        partitions=partitions,
        configs={"cleanup.policy": "compact"},
        client_config=tls,
    )
    ensure_topics(bootstrap, [audit], partitions=1, client_config=tls)
    return [*regular, *compacted, audit]


def stage_runner(
    settings: FleetbusSettings,
    logic: Any,
    *,
    audit_signer: Any = None,
    assignment_listener: AssignmentListener | None = None,
    worker_id: str = "",
) -> TransactionalStage:
    """The exactly-once runner of one stage ``logic`` as ``settings`` configure it: its state
    changelog, audit and DLQ topics, batch size, ticks, group timing and Kafka security;
    ``assignment_listener`` is told its partitions as they change; ``worker_id`` is the same
    for every stage of one worker (see ``TransactionalStage``)."""
    from fleetbus.processors.eos import TransactionalStage

    topics = settings.topics
    return TransactionalStage(
        logic,
        bootstrap=settings.kafka_bootstrap,
        app_id=settings.app_id,
        state_topic=state_topic(settings, logic.name),
        audit_topic=topics.full(topics.audit),
        dlq_topic=topics.full(topics.dlq),
        audit_signer=audit_signer,
        audit_signer_principal=settings.sealer_principal,
        checkpoint_every=settings.audit_checkpoint_every,
        batch_size=settings.stage_batch_size,
        tick_interval_s=settings.tick_interval_s,
        consumer_options={
            "session_timeout_ms": int(settings.broker_session_timeout_s * 1000),
            "heartbeat_interval_ms": int(settings.broker_heartbeat_interval_s * 1000),
        },
        client_options=settings.aiokafka_client_config(),
        assignment_listener=assignment_listener,
        worker_id=worker_id,
    )


def servable_profiles(
    settings: FleetbusSettings, configured: Collection[str], suite: str
) -> tuple[dict[str, SecurityProfile], dict[str, SecurityProfile]]:
    """(profiles this worker can seal with, profiles it cannot), given the ``configured``
    key providers. Never a weaker profile in place of one that cannot be served:

    - a rule naming an undefined profile, or a profile with a key path below its own
      ``minimum_path``, is a ``ConfigError`` (the worker does not start);
    - a profile whose usable paths are gone (``allow_fallback`` False and its first path needs a
      provider that is not configured, or no path at all is servable) is unservable: logged as
      an error now, and every command a rule routes to it is refused at seal time
      (``key_path_exhausted``), as a permanent outage of its provider would be;
    - a fallback profile keeps the paths it can serve, all of which it declares acceptable and
      all at least its minimum; the missing preferred paths are logged.

    See docs/key-paths.md ("Profiles a worker cannot serve")."""
    from fleetbus.processors.stages import profile_from_settings
    from fleetbus.providers.keypath import is_at_least

    undefined = sorted({r.profile for r in settings.profile_rules} - set(settings.profiles))
    if undefined:
        raise ConfigError(f"profile_rules name undefined profiles: {', '.join(undefined)}")
    ruled = {r.profile for r in settings.profile_rules}
    available = set(configured)
    profiles: dict[str, SecurityProfile] = {}
    unservable: dict[str, SecurityProfile] = {}
    for name, spec in settings.profiles.items():
        declared = profile_from_settings(
            name, spec.key_paths, spec.allow_fallback, spec.minimum_path, suite
        )
        if not declared.key_paths:
            raise ConfigError(f"profile {name}: no key paths")
        below = [p.name for p in declared.key_paths if not is_at_least(p, declared.minimum_path)]
        if below:
            raise ConfigError(
                f"profile {name}: key paths {', '.join(below)} are below its minimum_path "
                f"{declared.minimum_path.name}"
            )
        candidates = declared.key_paths if spec.allow_fallback else declared.key_paths[:1]
        paths = [p.name for p in candidates if set(p.providers) <= available]
        missing = sorted({n for p in declared.key_paths for n in p.providers} - available)
        if not paths:
            unservable[name] = declared
            # Loud when a rule can route commands here, quieter when nothing can.
            _log.log(
                logging.ERROR if name in ruled else logging.WARNING,
                "profile %s cannot be served: its key paths need providers that are not "
                "configured (%s); commands chosen for it are refused (key_path_exhausted), "
                "never sealed under another profile",
                name,
                ", ".join(missing),
            )
            continue
        if len(paths) != len(declared.key_paths):
            _log.warning(
                "profile %s: key paths %s need providers that are not configured (%s); "
                "sealing with %s",
                name,
                ", ".join(p.name for p in declared.key_paths),
                ", ".join(missing) or "none",
                ", ".join(paths),
            )
        profiles[name] = profile_from_settings(
            name, paths, spec.allow_fallback, spec.minimum_path, suite
        )
    return profiles, unservable


@dataclass
class Pipeline:
    """The stage runners of one worker, and services running beside them (health probes)."""

    stages: list[Any]  # TransactionalStage
    services: list[Any] = field(default_factory=list)  # anything with async run() / stop()

    def catch_up(self) -> None:
        """Bring the services that follow a topic (the key topic) up to its end, blocking: call
        it once the topics exist and before the stages start."""
        for service in self.services:
            catch_up = getattr(service, "catch_up", None)
            if catch_up is not None:
                catch_up()


def warn_if_root_private_key(keys_dir: Path) -> bool:
    """Warn when the worker's key folder holds the fleet root's private key.

    A worker needs only root.pub, the directory and its sealer's key (``fleetbus keys
    export``); anyone who takes over a worker holding root.key can issue keys for any
    principal. Only a warning: a one-host development folder (the demo's) holds everything.
    """
    if not KeyFolder(keys_dir).root_key.exists():
        return False
    _log.warning(
        "%s holds the fleet root's private key; a worker needs only a public export "
        "(fleetbus keys export --principal <sealer>): keep %s with whoever issues keys",
        keys_dir,
        ROOT_KEY,
    )
    return True


def load_worker_directory(
    settings: FleetbusSettings, root: RootPublicKey, path: Path
) -> tuple[KeyDirectory, DirectoryRoster]:
    """The worker's ``KeyDirectory`` from ``path`` and the roster that keeps the policy's
    registry fleet-wide.

    One pass over the file builds the roster (every principal's groups and capabilities,
    no keys: ``DirectoryRoster.from_file``) and notes where each record is; the directory then
    reads only the records it holds, by position. ``directory_scope`` fleet (or partitions
    whose head has another bucket count than the partition count: WARNING,
    ``fleetbus_directory_scope_fallback`` 1): every record. Partitions: set 0 only, the
    buckets come with the stages' partitions (``PartitionBuckets``).
    """
    from fleetbus.bus.directory import (
        WHOLE_DIRECTORY,
        DirectoryScope,
        head_store_for,
        headless_file_error,
        load_directory,
        open_directory_file,
    )
    from fleetbus.observability.metrics import DIRECTORY_SCOPE_FALLBACK, DIRECTORY_VEHICLES_HELD
    from fleetbus.processors.fleet_registry import DirectoryRoster
    from fleetbus.processors.keytopic import buckets_are_partitions

    # The keys folder may be a read-only mount: the highest accepted head lives with the state.
    head_store = head_store_for(Path(settings.data_dir).expanduser(), root)
    DIRECTORY_SCOPE_FALLBACK.set(0)
    with open_directory_file(path) as stream:  # the head only: no record is read
        headless = stream.head is None
    if headless:
        stored = head_store.load(root)
        raise headless_file_error(path, None if stored is None else stored.head)
    roster = DirectoryRoster.from_file(path, root)
    scoped = (
        settings.directory_scope == "partitions"
        and roster.head is not None
        and buckets_are_partitions(roster.head, settings.partitions)
    )
    directory = load_directory(
        path,
        root,
        head_store=head_store,
        scope=DirectoryScope(buckets=frozenset()) if scoped else WHOLE_DIRECTORY,
        file=roster.file,
        index=roster.index,
    )
    DIRECTORY_VEHICLES_HELD.set(directory.vehicles_held())
    return directory, roster


def build_pipeline(settings: FleetbusSettings) -> Pipeline:
    """Load keys, registry and policies once; build the five stages and their runners."""
    from fleetbus.bus.directory import RootPublicKey, load_key_file
    from fleetbus.bus.envelope_v2 import Direction
    from fleetbus.bus.keys import KeyPath
    from fleetbus.bus.registry import load_key_providers
    from fleetbus.observability.metrics import DIRECTORY_VEHICLES_HELD
    from fleetbus.processors.fleet_registry import FleetRegistry
    from fleetbus.processors.health import HealthReporter, init_stage_counters
    from fleetbus.processors.keytopic import (
        VEHICLE_KEYED_STAGES,
        KeyTopicService,
        PartitionBuckets,
    )
    from fleetbus.processors.policy import PolicyEngine
    from fleetbus.processors.stages import (
        AuthorizeStage,
        PipelineTopics,
        ProfileChoice,
        ResponseStage,
        SealStage,
        TelemetryStage,
        TrackStage,
        UplinkOpener,
    )
    from fleetbus.processors.uplink import UplinkLimits
    from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
    from fleetbus.providers.sealing import EnvelopeOpener, EnvelopeSealer, EpochPolicy
    from fleetbus.providers.sealing_v2 import EpochOpener, EpochSealer

    keys_dir = Path(settings.keys_dir).expanduser()
    warn_if_root_private_key(keys_dir)
    try:
        root = RootPublicKey.from_bytes(KeyFolder(keys_dir).root_pub.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{KeyFolder(keys_dir).root_pub} not found; set FLEETBUS_KEYS_DIR"
        ) from None
    directory, roster = load_worker_directory(settings, root, KeyFolder(keys_dir).directory)
    sealer_file = load_key_file(KeyFolder(keys_dir).private_key(settings.sealer_principal))
    signer = sealer_file.signer()
    # Live key changes (docs/key-management.md): the worker reads the topic up to now before
    # any stage starts (Pipeline.catch_up), so a revocation already published is in force for
    # the first record. Not here: building reads only local files, before any connection.
    key_topic = KeyTopicService(settings, directory, audit_signer=signer, roster=roster)
    # directory_scope=partitions: the vehicle-keyed stages' partitions say which buckets.
    buckets = (
        None
        if directory.scope.buckets is None
        else PartitionBuckets(
            settings,
            directory,
            KeyFolder(keys_dir).directory,
            on_refused=key_topic.follower.on_refused,
            roster=roster,
        )
    )

    registry_path = (
        Path(settings.fleet_registry).expanduser()
        if settings.fleet_registry
        else keys_dir / "fleet.json"
    )
    base = FleetRegistry.load(registry_path) if registry_path.exists() else None

    def fleet_registry() -> FleetRegistry:
        # Fleet-wide whatever the directory holds: a view of the roster, nothing per vehicle.
        return (base or FleetRegistry.from_mapping({})).with_roster(roster)

    policy_dir = Path(settings.policy_dir).expanduser() if settings.policy_dir else None
    policy = PolicyEngine(fleet_registry(), policy_dir=policy_dir)

    def refresh_policy() -> None:
        # A principal issued live gets its roles and groups (and a new vehicle becomes a
        # known target) with the head that covers it, not at the next restart.
        fleet = fleet_registry()
        DIRECTORY_VEHICLES_HELD.set(directory.vehicles_held())
        policy.refresh(fleet)
        _log.info(
            "policy: fleet registry refreshed after a new directory head (%d vehicles held, "
            "%d operators)",
            directory.vehicles_held(),
            len(fleet.operators),
        )

    key_topic.on_head = refresh_policy

    # The default providers, and each one a profile's key path names that the settings
    # configure (each provider says what it needs: fleetbus.bus.registry).
    named = {
        name
        for spec in settings.profiles.values()
        for p in spec.key_paths
        for name in KeyPath.parse(p).providers
    }
    providers = load_key_providers(settings, named)
    runner = KeyPathRunner(providers)

    profiles, unservable = servable_profiles(settings, providers, signer.suite)
    rules = [ProfileChoice(r.profile, r.criticality, r.capability) for r in settings.profile_rules]
    topics = PipelineTopics.from_settings(settings.topics)

    profile_sealer = ProfileSealer(
        runner,
        provider_timeout_s=settings.provider_timeout_s,
        retries=settings.keypath_retries,
        reset_timeout_s=settings.keypath_breaker_reset_s,
    )
    epochs = (
        EpochPolicy(settings.epoch_max_age_s, settings.epoch_max_messages)
        if settings.seal_epochs
        else None
    )
    envelope_sealer = EnvelopeSealer(
        settings.sealer_principal,
        signer,
        profile_sealer,
        epochs=epochs,
        batch_signing=settings.batch_signing,
    )

    # Wire format v2 (docs/wire-format.md V2.10): written only to vehicles announcing wire2.
    # Epochs always bound here: v2's per-message saving is the epoch.
    epoch_sealer = (
        EpochSealer(
            settings.sealer_principal,
            signer,
            profile_sealer,
            epochs=EpochPolicy(settings.epoch_max_age_s, settings.epoch_max_messages),
            batch_signing=settings.batch_signing,
        )
        if settings.wire_version == 2
        else None
    )

    def opener() -> UplinkOpener:
        def one(minimum: str) -> EnvelopeOpener:
            return EnvelopeOpener(
                sealer_file.key_set(),
                directory,
                runner,
                KeyPath.parse(minimum),
                skew_s=settings.clock_skew_s,
                max_lifetime_s=settings.uplink_max_lifetime_s,
                # The stages keep the replay state in their transactional partition state.
                check_replay=False,
            )

        return UplinkOpener(
            directory, one(settings.response_minimum_path), one(settings.legacy_minimum_path)
        )

    def v2_opener(minimum: str) -> EpochOpener:
        # Stores come per partition from the stage (StateEpochStore); this one is never used.
        return EpochOpener(
            sealer_file.key_set(),
            directory,
            runner,
            KeyPath.parse(minimum),
            direction=Direction.UPLINK,
            skew_s=settings.clock_skew_s,
            max_lifetime_s=settings.uplink_max_lifetime_s,
        )

    uplink_limits = UplinkLimits(
        max_lifetime_s=settings.uplink_max_lifetime_s,
        ids_per_sender=settings.uplink_ids_per_sender,
        held_per_sender=settings.uplink_held_per_sender,
    )
    seal = SealStage(
        topics=topics,
        directory=directory,
        sealer=envelope_sealer,
        profiles=profiles,
        rules=rules,
        clock_skew_s=settings.clock_skew_s,
        unservable=unservable,
        sealer_v2=epoch_sealer,
        wire_version=settings.wire_version,
        # Topics are created with settings.partitions; the runner checks a stage's inputs agree.
        partitions=settings.partitions,
        # The registry of the current head (refresh_policy swaps it).
        group_members=lambda group, p, n: policy.registry.partition_members(group, p, n),
    )
    profile_sealer.add_listener(seal.on_failover)
    logics: list[Any] = [
        AuthorizeStage(
            topics=topics,
            directory=directory,
            policy=policy,
            approvals_required=settings.approvals_required,
            approval_window_s=settings.approval_window_s,
            clock_skew_s=settings.clock_skew_s,
            max_lifetime_s=settings.replay_ttl_s,
            max_message_bytes=settings.max_message_bytes,
            authorized_partitions=settings.partitions,
        ),
        seal,
        ResponseStage(
            topics=topics,
            opener=opener(),
            clock_skew_s=settings.clock_skew_s,
            max_message_bytes=settings.max_message_bytes,
            limits=uplink_limits,
            sealer_principal=settings.sealer_principal,
            v2_openers=(
                v2_opener(settings.response_minimum_path),
                v2_opener(settings.legacy_minimum_path),
            ),
            status_signer=signer,
        ),
        TrackStage(
            topics=topics,
            clock_skew_s=settings.clock_skew_s,
            max_message_bytes=settings.max_message_bytes,
            limits=uplink_limits,
        ),
        TelemetryStage(
            topics=topics,
            opener=opener(),
            policy=policy,
            consumer=settings.telemetry_consumer,
            max_message_bytes=settings.max_message_bytes,
            clock_skew_s=settings.clock_skew_s,
            limits=uplink_limits,
            v2_openers=(
                v2_opener(settings.response_minimum_path),
                v2_opener(settings.legacy_minimum_path),
            ),
            require_signed=settings.telemetry_require_signed,
            sealer_principal=settings.sealer_principal,
            status_signer=signer,
        ),
    ]
    worker_id = uuid.uuid4().hex[:12]
    stages = [
        stage_runner(
            settings,
            logic,
            audit_signer=signer,
            assignment_listener=buckets if logic.name in VEHICLE_KEYED_STAGES else None,
            worker_id=worker_id,
        )
        for logic in logics
    ]
    init_stage_counters(stage.stage for stage in stages)
    health = HealthReporter(providers, profile_sealer, directory)
    return Pipeline(stages, services=[key_topic, health])


def _stage_service(stage: Any) -> type[Service]:
    """A mode.Service class (faust instantiates @app.service classes) running one stage."""

    class StageService(Service):
        async def on_start(self) -> None:
            self.add_future(stage.run())

        async def on_stop(self) -> None:
            await stage.stop()

    StageService.__name__ = f"StageService_{stage.stage}"
    return StageService


def create_app(
    settings: FleetbusSettings | None = None,
    *,
    pipeline_factory: Callable[[FleetbusSettings], Pipeline] | None = None,
) -> faust.App:
    """The worker's faust app: the smoke forwarder (``processors.smoke``) and, when the
    pipeline is enabled, each stage runner and service as a ``mode.Service``."""
    settings = settings or FleetbusSettings()
    app = faust.App(settings.app_id, **faust_config(settings))

    add_smoke_forwarder(app, settings)
    if pipeline_enabled(settings):
        pipeline = (pipeline_factory or build_pipeline)(settings)
        for stage in [*pipeline.stages, *pipeline.services]:
            app.service(_stage_service(stage))
    return app
