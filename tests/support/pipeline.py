"""Shared scaffolding for pipeline tests against a real broker.

The fleet itself (``make_test_fleet``, ``TestFleet``, ``settings_for`` and the principal names)
is ``fleetbus.devtools.fleet``, shared with bench/; it is re-exported here for the tests.

For a ``fleetbus worker`` subprocess: ``worker_env(settings, workdir)`` is its
``FLEETBUS_*`` environment, ``qkd_worker_env(kme_pair)`` adds the bus's QKD provider (the KME
pair's master SAE at KME-A). ``seal_command`` seals a command as the seal stage writes it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fleetbus.bus.commands import Command, SignedCommand, Target
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.devtools.fleet import (
    APPROVER,
    DAY_S,
    DISPATCHER,
    GROUPS,
    INTRUDER,
    KEMS,
    SEALER,
    TestFleet,
    make_test_fleet,
    process_env,
    settings_for,
    topic_names,
    vehicle_id,
)

__all__ = [
    "APPROVER",
    "DAY_S",
    "DISPATCHER",
    "GROUPS",
    "INTRUDER",
    "KEMS",
    "SEALER",
    "TestFleet",
    "make_test_fleet",
    "qkd_worker_env",
    "read_topic",
    "seal_command",
    "settings_for",
    "topic_names",
    "vehicle_id",
    "worker_env",
]


def worker_env(settings: FleetbusSettings, workdir: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``fleetbus worker`` running the pipeline on ``settings`` (keys from
    ``settings.keys_dir``, state under ``workdir``, half-second ticks); ``extra`` adds or
    overrides."""
    env = {
        **process_env(settings, workdir),
        "FLEETBUS_WEB_PORT": "0",
        "FLEETBUS_PIPELINE": "on",
        "FLEETBUS_TICK_INTERVAL_S": "0.5",
        "FLEETBUS_AUDIT_CHECKPOINT_EVERY": "5",
    }
    env.update(extra)
    return env


def read_topic(bootstrap: str, name: str, *, idle_s: float = 3.0) -> list[Any]:
    """Every committed record of topic ``name``, read until ``idle_s`` pass without one."""
    from fleetbus.devtools.demo import read_topic as read_committed

    return read_committed(bootstrap, name, idle_s=idle_s)


def qkd_worker_env(kme_pair: Any) -> dict[str, str]:
    """``FLEETBUS_QKD_*`` for a worker that is the master SAE of a ``kme_pair`` (fixtures_kme):
    profiles with ``qkd-etsi014`` paths then work for edge units behind KME-B."""
    master = kme_pair.pki.saes[kme_pair.master_sae]
    return {
        "FLEETBUS_QKD_KME_URL": kme_pair.kme_a_url,
        "FLEETBUS_QKD_KME_ID": kme_pair.kme_a_id,
        "FLEETBUS_QKD_SAE_ID": kme_pair.master_sae,
        "FLEETBUS_QKD_CA_FILE": str(kme_pair.pki.ca_cert),
        "FLEETBUS_QKD_CERT_FILE": str(master.cert),
        "FLEETBUS_QKD_KEY_FILE": str(master.key),
    }


def seal_command(
    fleet: TestFleet,
    settings: FleetbusSettings,
    vehicle: str,
    *,
    action: str = "unlock_doors",
    target: Target | None = None,
    issuer: str = DISPATCHER,
    sender: str = SEALER,
    path: str = "xwing",
    age_s: float = 0.0,
    ttl_s: float = 60.0,
) -> tuple[Command, bytes]:
    """A command to ``vehicle`` signed by ``issuer`` and sealed by ``sender`` as the seal stage
    writes it to ``commands.outbound`` (created ``age_s`` ago)."""
    now = time.time() - age_s
    command = Command.create(
        issuer=issuer,
        target=target or Target(vehicle=vehicle),
        action=action,
        now=now,
        ttl_s=ttl_s,
    )
    signed = SignedCommand.sign(command, fleet.signer(issuer))
    envelope = fleet.sealer(sender).seal(
        "cmd",
        settings.topics.full(settings.topics.commands_outbound),
        fleet.recipient_keys(vehicle),
        command.id,
        command.action,
        signed.encode(),
        now,
        command.expires_at,
        fleet.profile(path, principal=sender),
    )
    return command, envelope
