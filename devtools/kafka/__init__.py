"""A real Apache Kafka (KRaft) that the project provisions itself, for the demo and the tests.

Modules: ``cluster`` (``LocalKafka``: start, stop, status of one or three nodes), ``jars``
(resolving the broker's jars from Maven), ``ports`` (free ports), ``tls`` (the mTLS PKI and
principals), ``acls`` (``AclGrant``, ``fleet_acls``, ``create_acls``). See docs/kafka.md.
"""

from __future__ import annotations

from fleetbus.devtools.kafka.acls import AclGrant, create_acls, fleet_acls
from fleetbus.devtools.kafka.cluster import (
    LocalKafka,
    brokers_in_metadata,
    running_cluster,
    status_json,
)
from fleetbus.devtools.kafka.jars import (
    KAFKA_VERSIONS,
    LOG4J_SLF4J_BINDING,
    SCALA_VERSION,
    cache_root,
    resolve_jars,
)
from fleetbus.devtools.kafka.ports import (
    EPHEMERAL_PORT_RANGE,
    ephemeral_ports,
    find_free_base_port,
    free_port,
    port_is_free,
)
from fleetbus.devtools.kafka.tls import (
    ADMIN_PRINCIPAL,
    BROKER_PRINCIPAL,
    PRINCIPAL_MAPPING_RULES,
    Security,
    write_pki,
)

__all__ = [
    "ADMIN_PRINCIPAL",
    "BROKER_PRINCIPAL",
    "EPHEMERAL_PORT_RANGE",
    "KAFKA_VERSIONS",
    "LOG4J_SLF4J_BINDING",
    "PRINCIPAL_MAPPING_RULES",
    "SCALA_VERSION",
    "AclGrant",
    "LocalKafka",
    "Security",
    "brokers_in_metadata",
    "cache_root",
    "create_acls",
    "ephemeral_ports",
    "find_free_base_port",
    "fleet_acls",
    "free_port",
    "port_is_free",
    "resolve_jars",
    "running_cluster",
    "status_json",
    "write_pki",
]
