"""The worker's key-topic follower: what it refuses goes to the DLQ and into a signed audit
chain of its own, and a failed report is retried whole (no Kafka: a recording producer)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fleetbus.bus.directory import FleetRoot, KeyDirectory, issue_key, sign_directory
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.settings import FleetbusSettings, TopicNames
from fleetbus.processors.audit import verify_entries
from fleetbus.processors.eos import DeadLetter
from fleetbus.processors.keytopic import KeyTopicService
from fleetbus.sdk.keytopic import KeyTopicItem

T0 = 1_800_000_000.0


class RecordingProducer:
    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[tuple[str, bytes, bytes | None, int | None]] = []
        self.fail_after = fail_after

    async def send_and_wait(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            self.fail_after = None
            raise ConnectionError("broker went away")
        self.sent.append((topic, value, key, partition))


@pytest.fixture
def worker() -> dict[str, Any]:
    root = FleetRoot.generate("ed25519")
    sealer = issue_key(
        root,
        principal_id="bus-sealer",
        kind="sealer",
        signature_suite="ed25519",
        not_before=T0 - 10,
        not_after=T0 + 86400,
    )
    head, records = sign_directory(root, [sealer.signed], at=T0)
    directory = KeyDirectory(root.public, require_head=True)
    directory.ingest_all(records)
    directory.ingest_head(head)
    settings = FleetbusSettings(topics=TopicNames(prefix="t."), audit_checkpoint_every=5)
    service = KeyTopicService(
        settings, directory, audit_signer=sealer.key_file.signer(), clock=lambda: T0
    )
    service.follower.finish_catch_up()
    return {"service": service, "directory": directory, "settings": settings}


def test_a_refused_item_is_dead_lettered_and_audited_in_a_signed_chain(
    worker: dict[str, Any],
) -> None:
    service: KeyTopicService = worker["service"]
    producer = RecordingProducer()
    service._producer = producer
    bad = KeyTopicItem("t.keys", 0, 41, b"dispatch-1/k", b"\xffnot cbor")
    assert service.follower.apply(bad) == "refused"
    asyncio.run(service._report())
    dlq = [s for s in producer.sent if s[0] == "t.dlq"]
    audit = [s for s in producer.sent if s[0] == "t.audit"]
    ((_, value, key, _),) = dlq
    letter = DeadLetter.decode(value)
    assert (letter.stage, letter.reason, letter.offset) == ("keys", ReasonCode.MALFORMED, 41)
    assert (letter.key, letter.value) == (bad.key, bad.value)
    assert key == bad.key
    assert len(audit) == 2  # the record, then a checkpoint over it: nothing left unsigned
    assert all(partition == 0 for *_, partition in audit)
    report = verify_entries(
        [(offset, key, value) for offset, (_, value, key, _) in enumerate(audit)],
        worker["directory"],
        checkpoint_signer="bus-sealer",
        max_checkpoint_every=5,
        max_unsigned_tail=0,
    )
    assert report.ok, report.breaks


def test_a_failed_report_is_retried_whole(worker: dict[str, Any]) -> None:
    service: KeyTopicService = worker["service"]
    producer = RecordingProducer(fail_after=1)  # the DLQ record goes, the audit record fails
    service._producer = producer
    service.follower.apply(KeyTopicItem("t.keys", 0, 7, b"x/y", None))
    with pytest.raises(ConnectionError):
        asyncio.run(service._report())
    asyncio.run(service._report())
    audit = [(i, s[2], s[1]) for i, s in enumerate(s for s in producer.sent if s[0] == "t.audit")]
    report = verify_entries(
        audit, worker["directory"], checkpoint_signer="bus-sealer", max_checkpoint_every=5
    )
    assert report.ok, report.breaks
    assert len([s for s in producer.sent if s[0] == "t.dlq"]) == 2  # at least once
