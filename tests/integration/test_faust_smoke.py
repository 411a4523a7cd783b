"""faust-streaming on the real broker: the create_app() worker forwards A to B, exactly once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from fleetbus.bus.dev.smoke import WorkerProcess


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


def test_worker_forwards_every_record_in_committed_transactions(
    kafka_bootstrap: str, make_topics: Callable[..., list[str]], tmp_path: Path
) -> None:
    source, sink = make_topics("in", "out", partitions=2)
    worker = WorkerProcess(
        {
            "FLEETBUS_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "FLEETBUS_APP_ID": f"smoke-{source}",
            "FLEETBUS_SMOKE_SOURCE": source,
            "FLEETBUS_SMOKE_SINK": sink,
            "FLEETBUS_PARTITIONS": "2",
            "FLEETBUS_DATA_DIR": str(tmp_path / "state"),
            "FLEETBUS_WEB_PORT": "0",
            "FLEETBUS_PROCESSING_GUARANTEE": "exactly_once",
        },
        tmp_path / "worker.log",
    )
    try:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        sent = {f"cmd-{i}".encode() for i in range(40)}
        for i, value in enumerate(sorted(sent)):
            producer.send(source, key=f"V-{i % 7}".encode(), value=value)
        producer.flush()
        producer.close()

        got = _read_all(sink, kafka_bootstrap, want=len(sent), isolation="read_committed")
        assert worker.running(), worker.output()[-4000:]
        assert sorted(got) == sorted(sent), worker.output()[-4000:]
        # Transactional writes leave commit markers in the log: offsets advance past the data.
        # An at-least-once forwarder would leave exactly len(sent) offsets.
        assert _end_offsets(sink, kafka_bootstrap, partitions=2) > len(sent)
    finally:
        code = worker.stop()
    assert code == 0, worker.output()[-4000:]
