"""A complete fleet on disk for tests, benchmarks and local runs, and settings with fresh topics.

``make_test_fleet(tmp_path, vehicles=4)`` writes a ``fleetbus keys``-style folder — ``root.key``,
``root.pub``, ``directory.cbor`` and one ``<principal>.key`` (0600) per principal — and returns a
``TestFleet`` with the loaded, verified directory and helpers for keys, signers, profiles and
the bus sealer's own sealer/opener. Principals:

================  ==========  =====================================================
principal         kind        keys
================  ==========  =====================================================
``bus-sealer``    sealer      composite signing + xwing/x25519 KEM (responses, tel)
``dispatch-1``    dispatcher  ``dispatcher_suite`` signing
``dispatch-2``    approver    ``dispatcher_suite`` signing
``intruder``      dispatcher  key file only; its record is signed by ANOTHER root and
                              is not in ``directory.cbor``
``V-0001`` ...    vehicle     ``vehicle_suite`` signing + xwing/x25519 KEM, groups
                              alternate ``north`` / ``south`` (``V-0001`` is north)
================  ==========  =====================================================

``settings_for(bootstrap)`` makes ``FleetbusSettings`` with a unique topic prefix and app id and
creates every topic of ``TopicNames`` on the broker (``keys`` compacted).
``TestFleet.add_edge_unit`` issues a QKD-connected edge unit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetbus.bus.directory import (
    ROOT_SUITE,
    FleetRoot,
    KeyDirectory,
    PrincipalKeyFile,
    issue_key,
    load_directory,
    publish_directory_file,
    read_directory_file,
    save_key_file,
)
from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.bus.keys import KeyPath, PrivateKeySet, RecipientKeys, SecurityProfile, Signer
from fleetbus.bus.settings import FleetbusSettings, TopicNames
from fleetbus.bus.topics import ensure_topics
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
from fleetbus.providers.sealing import EnvelopeOpener, EnvelopeSealer
from fleetbus.sdk.vehicle import VehicleIdentity

SEALER = "bus-sealer"
DISPATCHER = "dispatch-1"
APPROVER = "dispatch-2"
INTRUDER = "intruder"
GROUPS = ("north", "south")
KEMS = ("xwing", "x25519")
DAY_S = 86400.0


def vehicle_id(n: int) -> str:
    """``V-0001`` style ids, 1-based."""
    return f"V-{n:04d}"


@dataclass
class TestFleet:
    """A fleet on disk and in memory. ``key_files`` holds every principal, intruder included."""

    __test__ = False  # not a pytest test class

    keys_dir: Path
    root: FleetRoot
    directory: KeyDirectory
    key_files: dict[str, PrincipalKeyFile]
    vehicle_ids: list[str]
    groups: dict[str, list[str]] = field(default_factory=dict)

    # -- keys -------------------------------------------------------------------------------

    def key_file_path(self, principal: str) -> Path:
        return KeyFolder(self.keys_dir).private_key(principal)

    def key_set(self, principal: str) -> PrivateKeySet:
        return self.key_files[principal].key_set()

    def signer(self, principal: str) -> Signer:
        return self.key_files[principal].signer()

    def recipient_keys(self, principal: str) -> RecipientKeys:
        return self.directory.recipient_keys(principal, at=time.time())

    def vehicle(self, vid: str) -> VehicleIdentity:
        return VehicleIdentity.from_key_file(self.key_files[vid])

    def vehicles(self, ids: list[str] | None = None) -> list[VehicleIdentity]:
        return [self.vehicle(v) for v in (ids or self.vehicle_ids)]

    def add_edge_unit(
        self,
        principal_id: str,
        *,
        qkd_sae_id: str,
        group: str = "depot",
        not_after: float | None = None,
    ) -> None:
        """Issue an edge unit (xwing/x25519 KEMs, ed25519) reachable over QKD at ``qkd_sae_id``,
        append it to ``directory.cbor``, write its key file and reload the directory.
        ``not_after`` defaults to 30 days from now."""
        now = time.time()
        edge = issue_key(
            self.root,
            principal_id=principal_id,
            kind="edge",
            signature_suite="ed25519",
            kems=KEMS,
            qkd_sae_id=qkd_sae_id,
            groups=[group],
            not_before=now - DAY_S,
            not_after=now + 30 * DAY_S if not_after is None else not_after,
        )
        path = KeyFolder(self.keys_dir).directory
        publish_directory_file(path, self.root, [*read_directory_file(path).records, edge.signed])
        save_key_file(self.key_file_path(principal_id), edge.key_file)
        self.key_files[principal_id] = edge.key_file
        self.groups.setdefault(group, []).append(principal_id)
        self.reload_directory()

    def reload_directory(self) -> KeyDirectory:
        """Read ``directory.cbor`` again (after a test appended records to it)."""
        self.directory = load_directory(KeyFolder(self.keys_dir).directory, self.root.public)
        return self.directory

    # -- the bus sealer's side of envelopes ---------------------------------------------

    @staticmethod
    def runner() -> KeyPathRunner:
        from fleetbus.bus.registry import load_key_provider

        return KeyPathRunner({name: load_key_provider(name) for name in ("x25519", "xwing")})

    def profile(self, path: str = "xwing", *, principal: str = SEALER) -> SecurityProfile:
        """A one-path profile signed with ``principal``'s suite (no fallback)."""
        key_path = KeyPath.parse(path)
        return SecurityProfile(
            name=f"test-{path}",
            key_paths=(key_path,),
            signature_suite=self.key_files[principal].signature_suite,
            allow_fallback=False,
            minimum_path=key_path,
        )

    def sealer(self, principal: str = SEALER) -> EnvelopeSealer:
        """An ``EnvelopeSealer`` signing as ``principal`` (default: the bus sealer)."""
        return EnvelopeSealer(principal, self.signer(principal), ProfileSealer(self.runner()))

    def opener(self, principal: str = SEALER, *, minimum: str = "xwing") -> EnvelopeOpener:
        """An ``EnvelopeOpener`` for envelopes addressed to ``principal``."""
        return EnvelopeOpener(
            self.key_set(principal), self.directory, self.runner(), KeyPath.parse(minimum)
        )

    # -- settings ---------------------------------------------------------------------------

    def settings_for(self, bootstrap: str, prefix: str | None = None, **overrides: Any) -> Any:
        """``settings_for`` plus ``keys_dir`` / ``sealer_principal`` when the settings have them."""
        fields = FleetbusSettings.model_fields
        if "keys_dir" in fields:
            overrides.setdefault("keys_dir", str(self.keys_dir))
        if "sealer_principal" in fields:
            overrides.setdefault("sealer_principal", SEALER)
        # Worker state (the highest directory head accepted) stays with the fleet, not in ~.
        overrides.setdefault("data_dir", str(self.keys_dir.parent / "state"))
        return settings_for(bootstrap, prefix, **overrides)


def make_test_fleet(
    tmp_path: Path,
    *,
    vehicles: int = 4,
    dispatcher_suite: str = "ed25519",
    vehicle_suite: str = "ed25519",
    sealer_suite: str = ROOT_SUITE,
    now: float | None = None,
    vehicle_capabilities: Sequence[str] = (),
    sealer_capabilities: Sequence[str] = (),
) -> TestFleet:
    """Create the keys folder ``tmp_path / "keys"`` and return the fleet (see module doc).

    Ed25519 is the default for dispatchers and vehicles to keep large fleets fast to build;
    pass ``"composite-mldsa65-ed25519"`` to exercise the hybrid suite.
    """
    at = time.time() if now is None else now
    not_before, not_after = at - DAY_S, at + 30 * DAY_S
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = FleetRoot.generate(ROOT_SUITE)
    save_key_file(KeyFolder(keys_dir).root_key, root.key_file())
    KeyFolder(keys_dir).root_pub.write_bytes(root.public.to_bytes())

    issued = [
        issue_key(
            root,
            principal_id=SEALER,
            kind="sealer",
            signature_suite=sealer_suite,
            kems=KEMS,
            capabilities=sealer_capabilities,
            not_before=not_before,
            not_after=not_after,
        ),
        issue_key(
            root,
            principal_id=DISPATCHER,
            kind="dispatcher",
            signature_suite=dispatcher_suite,
            not_before=not_before,
            not_after=not_after,
        ),
        issue_key(
            root,
            principal_id=APPROVER,
            kind="approver",
            signature_suite=dispatcher_suite,
            not_before=not_before,
            not_after=not_after,
        ),
    ]
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    ids = [vehicle_id(n) for n in range(1, vehicles + 1)]
    for index, vid in enumerate(ids):
        group = GROUPS[index % len(GROUPS)]
        groups[group].append(vid)
        issued.append(
            issue_key(
                root,
                principal_id=vid,
                kind="vehicle",
                signature_suite=vehicle_suite,
                kems=KEMS,
                groups=[group],
                capabilities=vehicle_capabilities,
                not_before=not_before,
                not_after=not_after,
            )
        )
    # The intruder has a well-formed key whose record another root signed.
    stranger_root = FleetRoot.generate("ed25519")
    intruder = issue_key(
        stranger_root,
        principal_id=INTRUDER,
        kind="dispatcher",
        signature_suite=dispatcher_suite,
        not_before=not_before,
        not_after=not_after,
    )
    publish_directory_file(KeyFolder(keys_dir).directory, root, [i.signed for i in issued])
    key_files: dict[str, PrincipalKeyFile] = {}
    for item in [*issued, intruder]:
        key_files[item.key_file.principal_id] = item.key_file
        save_key_file(KeyFolder(keys_dir).private_key(item.key_file.principal_id), item.key_file)
    directory = load_directory(KeyFolder(keys_dir).directory, root.public)
    return TestFleet(
        keys_dir=keys_dir,
        root=root,
        directory=directory,
        key_files=key_files,
        vehicle_ids=ids,
        groups=groups,
    )


def topic_names() -> list[str]:
    """The attribute names of every topic in ``TopicNames`` (everything but the prefix)."""
    return [name for name in TopicNames.model_fields if name != "prefix"]


def settings_for(
    bootstrap: str, prefix: str | None = None, *, partitions: int = 2, **overrides: Any
) -> FleetbusSettings:
    """Settings on ``bootstrap`` with a unique topic prefix (``t<hex>.`` unless given) and app id;
    creates every pipeline topic (``keys`` compacted). Extra keyword arguments are settings."""
    run = uuid.uuid4().hex[:10]
    prefix = prefix or f"t{run}."
    topics = TopicNames(prefix=prefix)
    settings = FleetbusSettings(
        kafka_bootstrap=bootstrap,
        app_id=overrides.pop("app_id", f"fleetbus-test-{run}"),
        partitions=partitions,
        topics=topics,
        **overrides,
    )
    names = [topics.full(getattr(topics, name)) for name in topic_names()]
    keys_topic = topics.full(topics.keys)
    ensure_topics(bootstrap, [n for n in names if n != keys_topic], partitions=partitions)
    ensure_topics(
        bootstrap, [keys_topic], partitions=partitions, configs={"cleanup.policy": "compact"}
    )
    return settings


def process_env(settings: FleetbusSettings, workdir: Path) -> dict[str, str]:
    """The ``FLEETBUS_*`` variables every fleetbus process of a local run shares: the broker, app
    id, partitions, topic prefix and keys folder of ``settings``, state under ``workdir``."""
    prefix = settings.topics.prefix
    return {
        "FLEETBUS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "FLEETBUS_APP_ID": settings.app_id,
        "FLEETBUS_PARTITIONS": str(settings.partitions),
        "FLEETBUS_TOPICS__PREFIX": prefix,
        "FLEETBUS_SMOKE_SOURCE": prefix + "smoke.in",
        "FLEETBUS_SMOKE_SINK": prefix + "smoke.out",
        "FLEETBUS_KEYS_DIR": str(settings.keys_dir),
        "FLEETBUS_DATA_DIR": str(workdir / "state"),
    }
