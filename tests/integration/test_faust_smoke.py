"""faust-streaming on the real broker: the create_app() worker forwards A to B, exactly once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from fleetbus.devtools.process import WorkerProcess


def _read_all(topic: str, bootstrap: str, want: int, isolation: str) -> list[bytes]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation,
        consumer_timeout_ms=60000,
    )
    got: list[bytes] = []
    try:
        for record in consumer:
            got.append(record.value)
            if len(got) >= want:
                break
    finally:
        consumer.close()
    return got


def _end_offsets(topic: str, bootstrap: str, partitions: int) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_uncommitted")
    try:
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return sum(ends.values())
    finally:
        consumer.close()


def smoke_env(bootstrap: str, source: str, sink: str, data_dir: str) -> dict[str, str]:
    """The smoke forwarder's settings: ``source`` to ``sink``, exactly once, 2 partitions."""
    return {
        "FLEETBUS_KAFKA_BOOTSTRAP": bootstrap,
        "FLEETBUS_APP_ID": f"smoke-{source}",
        "FLEETBUS_SMOKE_SOURCE": source,
        "FLEETBUS_SMOKE_SINK": sink,
        "FLEETBUS_PARTITIONS": "2",
        "FLEETBUS_DATA_DIR": data_dir,
        "FLEETBUS_WEB_PORT": "0",
        "FLEETBUS_PROCESSING_GUARANTEE": "exactly_once",
    }


def check_forwarded(
    bootstrap: str, source: str, sink: str, *, alive: Callable[[], bool], log: Callable[[], str]
) -> None:
    """Send 40 records to ``source``; the running worker must forward each in transactions."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    sent = {f"cmd-{i}".encode() for i in range(40)}
    for i, value in enumerate(sorted(sent)):
        producer.send(source, key=f"V-{i % 7}".encode(), value=value)
    producer.flush()
    producer.close()

    got = _read_all(sink, bootstrap, want=len(sent), isolation="read_committed")
    assert alive(), log()[-4000:]
    assert sorted(got) == sorted(sent), log()[-4000:]
    # Transactional writes leave commit markers in the log: offsets advance past the data.
    # An at-least-once forwarder would leave exactly len(sent) offsets.
    assert _end_offsets(sink, bootstrap, partitions=2) > len(sent)


def run_smoke(bootstrap: str, source: str, sink: str, workdir: Path) -> None:
    """The forwarding smoke with a ``fleetbus worker`` subprocess, stopped cleanly after."""
    worker = WorkerProcess(
        smoke_env(bootstrap, source, sink, str(workdir / "state")), workdir / "worker.log"
    )
    try:
        check_forwarded(bootstrap, source, sink, alive=worker.running, log=worker.output)
    finally:
        code = worker.stop()
    assert code == 0, worker.output()[-4000:]


def test_worker_forwards_every_record_in_committed_transactions(
    kafka_bootstrap: str, make_topics: Callable[..., list[str]], tmp_path: Path
) -> None:
    source, sink = make_topics("in", "out", partitions=2)
    run_smoke(kafka_bootstrap, source, sink, tmp_path)
