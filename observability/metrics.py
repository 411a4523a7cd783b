"""Prometheus metrics of the bus: one definition per metric, shared by every process.

Names follow Prometheus conventions (``fleetbus_`` prefix, base units, ``_total`` counters).
Label values are bounded sets — stages, reason codes, profiles, key-path names, providers —
never vehicle, command or principal ids.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import metadata
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import start_http_server as _start_http_server

#: Buckets for in-process stages: 50 µs .. 2.5 s.
STAGE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
)  # fmt: skip
#: Buckets for dispatch-to-ack latency: 5 ms .. 60 s.
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

registry: CollectorRegistry = REGISTRY

STAGE_LATENCY = Histogram(
    "fleetbus_stage_duration_seconds",
    "Time one record spends in a pipeline stage (authorize, seal, open, execute, track, ...).",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
COMMAND_LATENCY = Histogram(
    "fleetbus_command_e2e_latency_seconds",
    "From the command's issued-at to the terminal status (succeeded, failed, rejected, expired).",
    ["outcome"],
    buckets=E2E_BUCKETS,
)
BUS_LATENCY = Histogram(
    "fleetbus_command_bus_latency_seconds",
    "The bus's own part of a command's latency: from its authorization (after any approval) "
    "to the vehicle's answer at the bus, for vehicles that answered (succeeded, failed).",
    ["outcome"],
    buckets=E2E_BUCKETS,
)
RECORDS = Counter(
    "fleetbus_records_total",
    "Records a stage finished, by outcome (ok, rejected, dlq).",
    ["stage", "outcome"],
)
PRODUCE_RETRIES = Counter(
    "fleetbus_kafka_produce_retries_total",
    "Kafka produce or transaction attempts retried.",
    ["stage"],
)
PRODUCE_ERRORS = Counter(
    "fleetbus_kafka_produce_errors_total",
    "Kafka produce or transaction attempts that failed.",
    ["stage"],
)
KEYPATH_SELECTED = Counter(
    "fleetbus_keypath_selected_total",
    "Envelopes sealed, by security profile and the key path used.",
    ["profile", "path"],
)
KEYPATH_FAILOVER = Counter(
    "fleetbus_keypath_failover_total",
    "Key-path failovers: a path was skipped or failed and the next one tried.",
    ["profile", "from_path", "to_path", "reason"],
)
PROVIDER_UP = Gauge(
    "fleetbus_provider_up",
    "1 when the key provider's last health probe or operation succeeded, else 0.",
    ["provider"],
)
CIRCUIT_STATE = Gauge(
    "fleetbus_provider_circuit_state",
    "Circuit breaker per provider: 0 closed, 1 half-open, 2 open.",
    ["provider"],
)
QKD_KEY_POOL = Gauge(
    "fleetbus_qkd_stored_keys",
    "Keys available at the local KME for this SAE, from its ETSI 014 status.",
    ["slave_sae"],
)
POLICY_DECISIONS = Counter(
    "fleetbus_policy_decisions_total",
    "Authorization decisions by outcome (allow, deny, pending) and reason code.",
    ["outcome", "reason"],
)
DLQ_RECORDS = Counter(
    "fleetbus_dlq_records_total",
    "Records sent to the dead-letter queue, by stage and reason code.",
    ["stage", "reason"],
)
ENVELOPE_REJECTS = Counter(
    "fleetbus_envelope_rejects_total",
    "Envelopes that failed to open, by the receiving role and reason code.",
    ["role", "reason"],
)
KEY_EXPIRY = Gauge(
    "fleetbus_key_expiry_seconds",
    "Seconds until the soonest-expiring key of each principal kind in the key directory.",
    ["kind"],
)
CONSUMER_LAG = Gauge(
    "fleetbus_consumer_lag_records",
    "Records between the committed offset and the end of each input topic, per stage.",
    ["stage", "topic"],
)
INTERNAL_ERRORS = Counter(
    "fleetbus_internal_errors_total",
    "Faults of fleetbus itself (an unexpected exception in stage logic), by stage; the records "
    "concerned go to the DLQ with reason internal. Never caused by bad input: alerted on.",
    ["stage"],
)
AUDIT_RECORDS = Counter(
    "fleetbus_audit_records_total",
    "Audit records written, by event type.",
    ["event"],
)
KEY_TOPIC_ITEMS = Counter(
    "fleetbus_key_topic_items_total",
    "Items read from the compacted key topic, by reading role, outcome (applied, skipped: "
    "outside this process's record sets, refused) and reason code of a refusal.",
    ["role", "outcome", "reason"],
)
KEY_DIRECTORY_HEAD = Gauge(
    "fleetbus_key_directory_head_seq",
    "Sequence number of the highest key-directory head this process accepted.",
    ["role"],
)
DIRECTORY_VEHICLES_HELD = Gauge(
    "fleetbus_directory_vehicles_held",
    "Vehicles whose key records the worker's key directory holds (all of them unless "
    "directory_scope is partitions).",
)
DIRECTORY_SCOPE_FALLBACK = Gauge(
    "fleetbus_directory_scope_fallback",
    "1 when a worker set to directory_scope=partitions holds every vehicle because the "
    "directory head's bucket count differs from the partition count, else 0.",
)
BUILD_INFO = Info(
    "fleetbus_build",
    "Versions this process runs: fleetbus, Python and the crypto backend.",
)

#: ``fleetbus_provider_circuit_state`` values by breaker state name.
CIRCUIT_STATE_VALUES: Final = {"closed": 0, "half_open": 1, "open": 2}


#: Metric updates held back until the transaction that carries their records commits.
_on_commit: ContextVar[list[Callable[[], None]] | None] = ContextVar(
    "fleetbus_metrics_on_commit", default=None
)


def on_commit(update: Callable[[], None]) -> None:
    """Apply a metric ``update`` that counts what a record became (an outcome: DLQ, reject,
    sealed path, policy decision, latency to a terminal state) when the transaction holding the
    record commits: inside ``held_until_commit()`` it waits for that; elsewhere it applies now.
    A transaction that aborts is retried, and its records would otherwise be counted twice."""
    held = _on_commit.get()
    if held is None:
        update()
    else:
        held.append(update)


@contextmanager
def held_until_commit() -> Iterator[list[Callable[[], None]]]:
    """Collect the ``on_commit`` updates made in the block (in this thread or task); the caller
    runs them after its commit and drops them on abort."""
    held: list[Callable[[], None]] = []
    token = _on_commit.set(held)
    try:
        yield held
    finally:
        _on_commit.reset(token)


def set_circuit_state(provider: str, state: str) -> None:
    """Publish a breaker state (``closed``, ``half_open``, ``open``) and the provider's health."""
    value = CIRCUIT_STATE_VALUES[str(state)]
    CIRCUIT_STATE.labels(provider=provider).set(value)


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from pods
    """Serve ``/metrics`` of the default registry on ``port`` (0 disables) in a daemon thread."""
    if port <= 0:
        return
    set_build_info()
    _start_http_server(port, addr=addr)


def build_info() -> dict[str, str]:
    """The labels of ``fleetbus_build_info``: ``version`` (of fleetbus), ``version_python`` and
    ``version_crypto`` (the crypto backend: ``cryptography`` and its OpenSSL). Nothing secret."""
    try:
        version = metadata.version("fleetbus")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        version = "unknown"
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        crypto = (
            f"cryptography {metadata.version('cryptography')}, {backend.openssl_version_text()}"
        )
    except Exception:  # a label, never a reason to fail start-up
        crypto = "unknown"
    # ``version_*``: the exposition sorts label names, and ``{version="`` stays the first.
    return {
        "version": version,
        "version_python": platform.python_version(),
        "version_crypto": crypto,
    }


def set_build_info(registry: CollectorRegistry | None = None) -> None:
    """Set ``fleetbus_build_info`` (see :func:`build_info`) in ``registry`` (default: the
    process's). Every process that serves metrics calls this when it starts: the worker's
    probe server, the vehicle agent's metrics server, the KME simulator."""
    if registry is None or registry is REGISTRY:
        BUILD_INFO.info(build_info())
        return
    info = Info("fleetbus_build", BUILD_INFO._documentation, registry=registry)
    info.info(build_info())
