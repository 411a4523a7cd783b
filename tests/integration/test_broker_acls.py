"""Broker security on a real Kafka: mutual TLS, principals from certificate CNs, and ACLs.

A single-node ``LocalKafka(security="mtls")`` with ``StandardAuthorizer``: only the broker and
``admin`` are super users; dispatchers, vehicles and the worker get ``fleet_acls`` bindings.
Each test shows what a principal may do succeeding and what it may not do refused by the broker.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaTimeoutError,
    TopicAuthorizationFailedError,
)

from fleetbus.bus.settings import FleetbusSettings, TopicNames
from fleetbus.devtools.kafka import ADMIN_PRINCIPAL, LocalKafka, find_free_base_port, fleet_acls

APP_ID = "fleetbus"
DISPATCHER = "dispatch-1"
VEHICLES = "vehicle-gateway"
WORKER = "fleetbus-worker"
TOPICS = TopicNames()


def full(name: str) -> str:
    return TOPICS.full(getattr(TOPICS, name))


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    cluster = LocalKafka(
        home=Path(tmp_path_factory.mktemp("kafka-mtls")),
        base_port=find_free_base_port(2, start=25092),
        heap_mb=384,
        security="mtls",
    )
    try:
        cluster.up(timeout_s=180)
        admin = KafkaAdminClient(bootstrap_servers=cluster.bootstrap, **cluster.client_config())
        try:
            names = [
                TOPICS.full(getattr(TOPICS, n)) for n in TopicNames.model_fields if n != "prefix"
            ]
            admin.create_topics([NewTopic(n, 2, 1) for n in names])
        finally:
            admin.close()
        created = cluster.create_acls(
            fleet_acls(
                TOPICS, app_id=APP_ID, worker=WORKER, dispatchers=[DISPATCHER], vehicles=[VEHICLES]
            )
        )
        assert created >= 20
        yield cluster
    finally:
        cluster.down()


def producer(cluster: LocalKafka, principal: str, max_block_ms: int = 10_000) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=cluster.bootstrap,
        acks="all",
        enable_idempotence=True,
        max_block_ms=max_block_ms,
        **cluster.client_config(principal),
    )


def consumer(cluster: LocalKafka, principal: str, **options: Any) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=cluster.bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        **options,
        **cluster.client_config(principal),
    )


def assert_read_refused(cluster: LocalKafka, principal: str, topic: str) -> None:
    """The admin reads records from ``topic``; ``principal`` is refused its offsets and fetches
    nothing (kafka-python logs the fetch refusals instead of raising them)."""
    partitions = [TopicPartition(topic, p) for p in range(2)]

    def read(as_principal: str) -> int:
        reader = consumer(cluster, as_principal)
        try:
            reader.assign(partitions)
            reader.seek_to_beginning(*partitions)
            found = 0
            for _ in range(3):
                found += sum(len(r) for r in reader.poll(timeout_ms=1000).values())
            return found
        finally:
            reader.close()

    assert read(ADMIN_PRINCIPAL) >= 1
    assert read(principal) == 0
    reader = consumer(cluster, principal)
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            reader.end_offsets(partitions)
    finally:
        reader.close()


def produce(cluster: LocalKafka, principal: str, topic: str, max_block_ms: int = 10_000) -> None:
    p = producer(cluster, principal, max_block_ms)
    try:
        p.send(topic, key=b"k", value=b"v").get(timeout=15)
    finally:
        p.close(timeout=5)


def test_clients_need_a_certificate_of_the_cluster_ca(secure_kafka: LocalKafka) -> None:
    config = secure_kafka.client_config(DISPATCHER)
    without_certificate = {"security_protocol": "SSL", "ssl_cafile": config["ssl_cafile"]}
    for options in (without_certificate, {}):  # a TLS client without a certificate; no TLS
        p = KafkaProducer(
            bootstrap_servers=secure_kafka.bootstrap,
            max_block_ms=5000,
            api_version=(3, 9),
            **options,
        )
        try:
            with pytest.raises((KafkaTimeoutError, KafkaConnectionError)):
                p.send(full("commands_requested"), value=b"v").get(timeout=10)
        finally:
            p.close(timeout=1)


def test_dispatcher_writes_requests_and_approvals_only(secure_kafka: LocalKafka) -> None:
    produce(secure_kafka, DISPATCHER, full("commands_requested"))
    produce(secure_kafka, DISPATCHER, full("commands_approvals"))
    for name in ("commands_outbound", "commands_status", "commands_authorized", "audit"):
        with pytest.raises(TopicAuthorizationFailedError):
            produce(secure_kafka, DISPATCHER, full(name), max_block_ms=2000)
    produce(secure_kafka, WORKER, full("commands_status"))
    assert_read_refused(secure_kafka, DISPATCHER, full("commands_status"))


def test_vehicles_read_outbound_and_answer_but_cannot_send_commands(
    secure_kafka: LocalKafka,
) -> None:
    # The worker writes an outbound record; the vehicle gateway reads it with its group.
    produce(secure_kafka, WORKER, full("commands_outbound"))
    reader = consumer(secure_kafka, VEHICLES, group_id=f"{APP_ID}.vehicles.{uuid.uuid4().hex}")
    try:
        reader.subscribe([full("commands_outbound")])
        records = list(reader)
    finally:
        reader.close()
    assert records, "the vehicle gateway read nothing from commands.outbound"
    produce(secure_kafka, VEHICLES, full("commands_responses"))
    produce(secure_kafka, VEHICLES, full("telemetry_raw"))

    for name in ("commands_requested", "commands_approvals", "commands_outbound"):
        with pytest.raises(TopicAuthorizationFailedError):
            produce(secure_kafka, VEHICLES, full(name), max_block_ms=2000)
    # Another group (e.g. the worker's) is not the vehicles' to use.
    thief = consumer(secure_kafka, VEHICLES, group_id=f"{APP_ID}-seal")
    try:
        thief.subscribe([full("commands_outbound")])
        with pytest.raises(GroupAuthorizationFailedError):
            thief.poll(timeout_ms=5000)
    finally:
        thief.close()
    # Nor may vehicles read what the dispatchers sent.
    assert_read_refused(secure_kafka, VEHICLES, full("commands_requested"))


def test_worker_runs_consume_transform_produce_transactions(secure_kafka: LocalKafka) -> None:
    """The worker principal's grants cover the EOS pattern of processors.eos: a read_committed
    group consumer, a transactional producer under the ``{app_id}-`` prefix, offsets committed
    in the transaction. A transactional id outside the prefix is refused."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import TransactionalIdAuthorizationFailed
    from aiokafka.helpers import create_ssl_context
    from aiokafka.structs import OffsetAndMetadata
    from aiokafka.structs import TopicPartition as ATP

    produce(secure_kafka, DISPATCHER, full("commands_requested"))
    config = secure_kafka.client_config(WORKER)
    context = create_ssl_context(
        cafile=config["ssl_cafile"], certfile=config["ssl_certfile"], keyfile=config["ssl_keyfile"]
    )
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    common = {
        "bootstrap_servers": secure_kafka.bootstrap,
        "security_protocol": "SSL",
        "ssl_context": context,
    }
    group = f"{APP_ID}-authorize"

    async def run() -> int:
        source = AIOKafkaConsumer(
            full("commands_requested"),
            group_id=group,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **common,
        )
        txn = AIOKafkaProducer(transactional_id=f"{APP_ID}-authorize-0", acks="all", **common)
        await source.start()
        await txn.start()
        try:
            batches: dict[Any, list[Any]] = {}
            for _ in range(20):
                batches = await source.getmany(timeout_ms=1000)
                if batches:
                    break
            assert batches, "the worker read nothing from commands.requested"
            offsets = {
                ATP(tp.topic, tp.partition): OffsetAndMetadata(records[-1].offset + 1, "")
                for tp, records in batches.items()
            }
            async with txn.transaction():
                await txn.send(full("commands_authorized"), key=b"c", value=b"authorized")
                await txn.send(full("audit"), value=b"audit record")
                await txn.send_offsets_to_transaction(offsets, group)
            return sum(len(r) for r in batches.values())
        finally:
            await txn.stop()
            await source.stop()

    assert asyncio.run(run()) >= 1

    async def foreign_id() -> None:
        txn = AIOKafkaProducer(transactional_id="someone-else-0", **common)
        try:
            await txn.start()
        finally:
            await txn.stop()

    with pytest.raises(TransactionalIdAuthorizationFailed):
        asyncio.run(foreign_id())


def tls_settings(cluster: LocalKafka, principal: str, **fields: Any) -> FleetbusSettings:
    """``FleetbusSettings`` of a process that connects as ``principal`` over mTLS."""
    config = cluster.client_config(principal)
    return FleetbusSettings(
        kafka_bootstrap=cluster.bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=config["ssl_cafile"],
        kafka_ssl_certfile=config["ssl_certfile"],
        kafka_ssl_keyfile=config["ssl_keyfile"],
        **fields,
    )


def test_pipeline_runs_on_the_mtls_cluster_with_least_privilege_principals(
    secure_kafka: LocalKafka, tmp_path: Path
) -> None:
    """The worker, a dispatch console and a vehicle agent — each its own principal with only
    ``fleet_acls`` grants — take a command from request to a succeeded status over mTLS.
    The console may wait on ``commands.status`` because it is a status reader; a
    dispatcher that is not is refused that topic."""
    from fleetbus.bus.commands import CommandState, Target
    from fleetbus.bus.errors import ConfigError
    from fleetbus.bus.topics import ensure_topics
    from fleetbus.devtools.process import WorkerProcess
    from fleetbus.sdk.dispatch import CommandPublisher
    from fleetbus.sdk.vehicle import HandlerResult, VehicleAgent
    from tests.support.pipeline import DISPATCHER as SIGNER
    from tests.support.pipeline import make_test_fleet, worker_env

    console, fire_and_forget = "dispatch-console", "dispatch-batch"
    app_id, topics = "fleetbus-mtls", TopicNames(prefix="mtls.")
    names = [topics.full(getattr(topics, n)) for n in TopicNames.model_fields if n != "prefix"]
    ensure_topics(
        secure_kafka.bootstrap, names, partitions=2, client_config=secure_kafka.client_config()
    )
    secure_kafka.create_acls(
        fleet_acls(
            topics,
            app_id=app_id,
            worker=WORKER,
            dispatchers=[console, fire_and_forget],
            vehicles=[VEHICLES],
            status_readers=[console],
        )
    )

    fleet = make_test_fleet(tmp_path, vehicles=2)
    common: dict[str, Any] = {"app_id": app_id, "partitions": 2, "topics": topics}
    worker_settings = tls_settings(secure_kafka, WORKER, keys_dir=str(fleet.keys_dir), **common)
    env = worker_env(worker_settings, tmp_path)
    env.update(
        FLEETBUS_KAFKA_SECURITY_PROTOCOL="SSL",
        FLEETBUS_KAFKA_SSL_CAFILE=str(worker_settings.kafka_ssl_cafile),
        FLEETBUS_KAFKA_SSL_CERTFILE=str(worker_settings.kafka_ssl_certfile),
        FLEETBUS_KAFKA_SSL_KEYFILE=str(worker_settings.kafka_ssl_keyfile),
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    ran: list[str] = []
    agent = VehicleAgent(
        tls_settings(secure_kafka, VEHICLES, **common),
        vehicles=fleet.vehicles(),
        directory=fleet.directory,
        minimum_path="xwing",
        handlers={"ping": lambda command: ran.append(command.id) or HandlerResult(200, "ok")},
        store_path=tmp_path / "agent.sqlite",
    ).start()

    def publisher_as(kafka_principal: str) -> CommandPublisher:
        """Commands signed by the fleet's dispatcher key, sent as ``kafka_principal``."""
        return CommandPublisher(
            tls_settings(secure_kafka, kafka_principal, **common),
            principal_id=SIGNER,
            private_key_file=fleet.key_file_path(SIGNER),
        )

    publisher = publisher_as(console)
    try:
        handle = publisher.send(Target(vehicle="V-0001"), "ping")
        final = [CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED]
        try:
            event = handle.wait(120, until=final)
        except Exception:
            pytest.fail(f"no final status; events {handle.events}:\n{worker.output()[-4000:]}")
        assert event.state is CommandState.SUCCEEDED, handle.events
        assert ran == [handle.command_id]
        assert worker.running()
    finally:
        publisher.close()
        agent.close()
        worker.stop()
    # The same wait from a dispatcher without the status grant is refused by the broker.
    batch = publisher_as(fire_and_forget)
    try:
        refused = batch.send(Target(vehicle="V-0002"), "ping")
        with pytest.raises(ConfigError) as caught:
            refused.wait(10, until=final)
        assert "not authorized to read" in str(caught.value)
    finally:
        batch.close()
