"""Kafka ACLs: ``AclGrant`` (one ALLOW binding), the bindings a fleet needs (``fleet_acls``) and
creating them on a cluster (``create_acls``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleetbus.bus.errors import ConfigError


@dataclass(frozen=True)
class AclGrant:
    """One ALLOW binding: ``principal`` (a certificate CN) may ``operation`` on a resource.

    Names are kafka-python enum member names: operation ``READ``/``WRITE``/``DESCRIBE``/...,
    resource_type ``TOPIC``/``GROUP``/``CLUSTER``/``TRANSACTIONAL_ID``, pattern
    ``LITERAL``/``PREFIXED``.
    """

    principal: str
    operation: str
    resource_type: str
    name: str
    pattern: str = "LITERAL"


def fleet_acls(
    topics: Any,
    *,
    app_id: str,
    worker: str,
    dispatchers: Sequence[str] = (),
    vehicles: Sequence[str] = (),
    status_readers: Sequence[str] = (),
    key_publishers: Sequence[str] = (),
) -> list[AclGrant]:
    """Least-privilege bindings for a fleet's principals (``topics`` is a ``TopicNames``).

    - dispatchers: WRITE and DESCRIBE ``commands.requested`` and ``commands.approvals``; nothing
      else.
    - status_readers: READ and DESCRIBE ``commands.status`` (no consumer group: the SDK assigns
      partitions). A dispatch console that waits for outcomes (``CommandHandle.wait``) is in
      both lists; a fire-and-forget dispatcher only in the first. Status events carry the
      command ids, states, reason codes and vehicle ids of every dispatcher's commands (no
      payloads), so READ on them is a grant of its own.
    - vehicles (or a vehicle gateway / simulator principal): READ ``commands.outbound`` with a
      consumer group named ``{app_id}.vehicles.*``; WRITE ``commands.responses`` and
      ``telemetry.raw``; READ the key topic (no group: every agent reads all of it). Never
      ``commands.responses.verified``: the track stage trusts that topic's records as verified
      by the response stage, so only the worker writes it.
    - key_publishers (whoever runs ``fleetbus keys ... --bootstrap``): WRITE and DESCRIBE the
      key topic, nothing else — the only writer besides the workers' prefix grant.
    - the worker: every topic under the prefix (it reads, writes and creates its state topics),
      its groups and transactional ids (prefix ``{app_id}``), idempotent writes.
    """

    def full(name: str) -> str:
        return str(topics.full(name))

    grants: list[AclGrant] = []
    for who in dispatchers:
        for name in (topics.commands_requested, topics.commands_approvals):
            grants += [
                AclGrant(who, "WRITE", "TOPIC", full(name)),
                AclGrant(who, "DESCRIBE", "TOPIC", full(name)),
            ]
    for who in status_readers:
        grants += [
            AclGrant(who, "READ", "TOPIC", full(topics.commands_status)),
            AclGrant(who, "DESCRIBE", "TOPIC", full(topics.commands_status)),
        ]
    for who in vehicles:
        grants += [
            AclGrant(who, "READ", "TOPIC", full(topics.commands_outbound)),
            AclGrant(who, "DESCRIBE", "TOPIC", full(topics.commands_outbound)),
            AclGrant(who, "READ", "GROUP", f"{app_id}.vehicles.", "PREFIXED"),
        ]
        for name in (topics.commands_responses, topics.telemetry_raw):
            grants += [
                AclGrant(who, "WRITE", "TOPIC", full(name)),
                AclGrant(who, "DESCRIBE", "TOPIC", full(name)),
            ]
        grants += [
            AclGrant(who, "READ", "TOPIC", full(topics.keys)),
            AclGrant(who, "DESCRIBE", "TOPIC", full(topics.keys)),
        ]
    for who in key_publishers:
        grants += [
            AclGrant(who, "WRITE", "TOPIC", full(topics.keys)),
            AclGrant(who, "DESCRIBE", "TOPIC", full(topics.keys)),
        ]
    for op in ("READ", "WRITE", "DESCRIBE", "CREATE", "DESCRIBE_CONFIGS"):
        grants.append(AclGrant(worker, op, "TOPIC", topics.prefix, "PREFIXED"))
    grants += [
        AclGrant(worker, "READ", "GROUP", app_id, "PREFIXED"),
        AclGrant(worker, "DESCRIBE", "GROUP", app_id, "PREFIXED"),
        AclGrant(worker, "WRITE", "TRANSACTIONAL_ID", f"{app_id}-", "PREFIXED"),
        AclGrant(worker, "DESCRIBE", "TRANSACTIONAL_ID", f"{app_id}-", "PREFIXED"),
        AclGrant(worker, "IDEMPOTENT_WRITE", "CLUSTER", "kafka-cluster"),
    ]
    return grants


def create_acls(
    bootstrap: str,
    grants: Iterable[AclGrant],
    client_config: Mapping[str, Any] | None = None,
    *,
    apply_timeout_s: float = 30.0,
) -> int:
    """Create ALLOW bindings (a super user's ``client_config``); how many the broker accepted.
    Creating a binding that exists already is a no-op, so this is safe to repeat.

    The controller answers once the bindings are committed; a broker enforces them only after it
    has applied the metadata log, and until then a client is refused (an idempotent producer
    on InitProducerId, with ClusterAuthorizationFailed). So this returns only when a broker's
    authorizer lists every binding, or raises ``ConfigError`` after ``apply_timeout_s``."""
    from kafka import KafkaAdminClient
    from kafka.admin import (
        ACL,
        ACLFilter,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourcePatternFilter,
        ResourceType,
    )

    acls = [
        ACL(
            principal=f"User:{g.principal}",
            host="*",
            operation=ACLOperation[g.operation],
            permission_type=ACLPermissionType.ALLOW,
            resource_pattern=ResourcePattern(
                ResourceType[g.resource_type],
                g.name,
                ACLResourcePatternType[g.pattern],
            ),
        )
        for g in grants
    ]
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="fleetbus-acls", **dict(client_config or {})
    )
    everything = ACLFilter(
        principal=None,
        host=None,
        operation=ACLOperation.ANY,
        permission_type=ACLPermissionType.ANY,
        resource_pattern=ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY),
    )
    try:
        result = admin.create_acls(acls)
        failed = result.get("failed", [])
        if failed:
            raise ConfigError(f"{len(failed)} ACL binding(s) refused: {failed[:3]}")
        deadline = time.monotonic() + apply_timeout_s
        while True:
            listed, _ = admin.describe_acls(everything)
            missing = set(acls) - set(listed)
            if not missing:
                break
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"{len(missing)} ACL binding(s) created but not applied by the broker "
                    f"after {apply_timeout_s:.0f} s"
                )
            time.sleep(0.2)
    finally:
        admin.close()
    return len(result.get("succeeded", []))
