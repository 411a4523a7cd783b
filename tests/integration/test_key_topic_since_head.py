"""Reading the key topic from the directory file's head (issue 12), on the real broker.

A fleet whose every record is on the key topic would make each process read all of it at
start-up and a scoped worker at each bucket it takes. What a directory file lacks was published
after the root signed the file's head, so a reader starts at the head's time less
``key_topic_read_margin_s`` (by Kafka timestamps): here it reads only the change published after
the file, applies it (the revocation is in force), and with a negative margin reads everything.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from fleetbus.bus.directory import (
    FleetRoot,
    KeyDirectory,
    issue_key,
    load_directory,
    write_directory_file,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.settings import FleetbusSettings, TopicNames
from fleetbus.bus.topics import ensure_topics
from fleetbus.sdk.keytopic import KeyTopicFollower, KeyTopicItem, KeyTopicReader, publish_key_change

DAY = 86400.0
VEHICLES = 60


class _Counting(KeyTopicFollower):
    def __init__(self, directory: KeyDirectory) -> None:
        super().__init__(directory, role="test")
        self.offsets: list[int] = []

    def apply(self, item: KeyTopicItem) -> str:
        self.offsets.append(item.offset)
        return super().apply(item)


def _read(
    settings: FleetbusSettings, path: Path, root: FleetRoot
) -> tuple[KeyDirectory, list[int]]:
    directory = load_directory(path, root.public)
    follower = _Counting(directory)
    reader = KeyTopicReader(settings, follower)
    try:
        reader.start(30.0)
    finally:
        reader.close()
    return directory, follower.offsets


def test_a_reader_starts_at_the_files_head_and_misses_nothing_published_after_it(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    now = time.time()
    settings = FleetbusSettings(
        kafka_bootstrap=kafka_bootstrap,
        topics=TopicNames(prefix=f"test.{uuid.uuid4().hex[:10]}."),
        key_topic_read_margin_s=0.0,
    )
    ensure_topics(
        kafka_bootstrap,
        [settings.topics.full(settings.topics.keys)],
        partitions=1,
        configs={"cleanup.policy": "compact"},
    )
    root = FleetRoot.generate()
    issued = [
        issue_key(
            root,
            principal_id=pid,
            kind=kind,
            signature_suite="ed25519",
            not_before=now - DAY,
            not_after=now + DAY,
        )
        for pid, kind in [("dispatch-1", "dispatcher")]
        + [(f"V-{i:03d}", "vehicle") for i in range(VEHICLES)]
    ]
    holder = KeyDirectory(root.public)
    holder.ingest_all([i.signed for i in issued])
    # Every record published to the topic first (as `keys issue --bootstrap` does, one by one),
    head_1 = root.sign_head(holder.compute_head(seq=1, at=time.time(), vehicle_buckets=4))
    holder.ingest_head(head_1)
    publish_key_change(settings, holder.signed_records(), head_1)
    time.sleep(0.05)
    # ... then the file exported under a head signed after them,
    head_2 = root.sign_head(holder.compute_head(seq=2, at=time.time(), vehicle_buckets=4))
    holder.ingest_head(head_2)
    path = tmp_path / "directory.cbor"
    write_directory_file(path, head_2, holder.signed_records())
    time.sleep(0.05)
    # ... then a revocation published after the file.
    revocation = root.sign(holder.latest("dispatch-1").revocation(at=time.time()))
    holder.ingest(revocation)
    head_3 = root.sign_head(holder.compute_head(seq=3, at=time.time(), vehicle_buckets=4))
    publish_key_change(settings, [revocation], head_3)
    first_change = 1 + VEHICLES + 1  # the records and head 1 come first

    directory, offsets = _read(settings, path, root)
    assert offsets == [first_change, first_change + 1]  # the revocation and head 3 only
    assert directory.head is not None
    assert directory.head.seq == 3
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("dispatch-1", revocation.record.key_id, at=time.time())
    assert exc.value.reason is ReasonCode.SIGNER_REVOKED

    # A negative margin reads the whole topic, with the same outcome.
    whole = settings.model_copy(update={"key_topic_read_margin_s": -1.0})
    directory, offsets = _read(whole, path, root)
    assert offsets == list(range(first_change + 2))
    assert directory.head is not None
    assert directory.head.seq == 3
