"""The directory head's vehicle bucket count, chosen by the root holder: ``fleetbus keys init
--buckets`` (default: the configured partition count) and ``fleetbus keys rehead --buckets``
(the next head over the same records with another count), so that a worker with
``directory_scope`` partitions holds its partitions' vehicles instead of falling back to the
whole fleet; and what processes following the key topic do with such a head."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from fleetbus.bus.directory import (
    MAX_VEHICLE_BUCKETS,
    ROOT_SUITE,
    WHOLE_DIRECTORY,
    DirectoryHead,
    FleetRoot,
    KeyDirectory,
    RootPublicKey,
    SignedDirectoryHead,
    head_store_for,
    load_directory,
    read_directory_file,
    vehicle_agent_scope,
)
from fleetbus.bus.directory.dirfile import MAX_ITEM_BYTES
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.bus.topics import kafka_partition
from fleetbus.cli import keys as cli_keys
from fleetbus.observability.metrics import DIRECTORY_SCOPE_FALLBACK
from fleetbus.processors.keytopic import PartitionBuckets
from fleetbus.sdk.keytopic import KeyTopicFollower, KeyTopicItem, key_topic_items

runner = CliRunner()
VEHICLES = [f"V-{i:04d}" for i in range(18)]
PARTITIONS = 4


def _run(*args: str) -> Result:
    return runner.invoke(cli_keys.keys_app, list(args))


def _ok(*args: str) -> Result:
    result = _run(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _refused(*args: str) -> FleetbusError:
    result = _run(*args)
    assert result.exit_code != 0
    assert isinstance(result.exception, FleetbusError), (result.output, result.exception)
    return result.exception


def _head(keys: Path) -> DirectoryHead:
    content = read_directory_file(keys / "directory.cbor")
    assert content.head is not None
    return content.head.head


def _root(keys: Path) -> RootPublicKey:
    return RootPublicKey.from_bytes((keys / "root.pub").read_bytes())


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI reads FLEETBUS_* (the partition count, a bootstrap that would publish).
    for name in ("FLEETBUS_PARTITIONS", "FLEETBUS_KAFKA_BOOTSTRAP"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[Any], SignedDirectoryHead]]:
    """What the keys commands send to the key topic (nothing reaches a broker)."""
    sent: list[tuple[str, list[Any], SignedDirectoryHead]] = []

    def fake_publish(settings: Any, records: Any, head: SignedDirectoryHead) -> None:
        sent.append((settings.kafka_bootstrap, list(records), head))

    monkeypatch.setattr(cli_keys, "publish_key_change", fake_publish)
    return sent


def _fleet(keys: Path, buckets: int) -> Path:
    """A folder made by ``keys init --buckets`` with a dispatcher and ``VEHICLES``."""
    d = str(keys)
    _ok("init", "--dir", d, "--buckets", str(buckets))
    _ok("issue", "--dir", d, "--principal", "dispatch-1", "--kind", "dispatcher")
    for vid in VEHICLES:
        _ok("issue", "--dir", d, "--principal", vid, "--kind", "vehicle", "--suite", "ed25519")
    return keys


@pytest.fixture(scope="module")
def sixteen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleet whose head has the old default 16 buckets (copied by each test that changes it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("FLEETBUS_KAFKA_BOOTSTRAP", raising=False)
        return _fleet(tmp_path_factory.mktemp("sixteen") / "keys", 16)


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


# --- keys init ------------------------------------------------------------------------------


def test_init_takes_the_configured_partition_count_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _ok("init", "--dir", str(tmp_path / "default"))
    assert _head(tmp_path / "default").vehicle_buckets == FleetbusSettings().partitions == 4
    assert "directory head 1 with 4 vehicle buckets" in result.output
    monkeypatch.setenv("FLEETBUS_PARTITIONS", "6")
    _ok("init", "--dir", str(tmp_path / "six"))
    assert _head(tmp_path / "six").vehicle_buckets == 6
    _ok("init", "--dir", str(tmp_path / "sixteen"), "--buckets", "16")
    assert _head(tmp_path / "sixteen").vehicle_buckets == 16
    # A partition count no head may have is named as the source of the refusal.
    monkeypatch.setenv("FLEETBUS_PARTITIONS", str(MAX_VEHICLE_BUCKETS + 1))
    error = _refused("init", "--dir", str(tmp_path / "too-many"))
    assert error.reason is ReasonCode.CONFIG
    assert "FLEETBUS_PARTITIONS" in str(error)
    assert not (tmp_path / "too-many").exists()


@pytest.mark.parametrize("buckets", ["0", "-1", str(MAX_VEHICLE_BUCKETS + 1)])
def test_init_refuses_a_bucket_count_out_of_range(tmp_path: Path, buckets: str) -> None:
    error = _refused("init", "--dir", str(tmp_path / "keys"), "--buckets", buckets)
    assert error.reason is ReasonCode.CONFIG
    assert f"--buckets must be a whole number from 1 to {MAX_VEHICLE_BUCKETS}" in str(error)
    assert not (tmp_path / "keys").exists()  # nothing created, no root to throw away


# --- keys rehead ----------------------------------------------------------------------------


def test_rehead_signs_the_next_head_over_the_same_records(
    sixteen: Path, tmp_path: Path, published: list[Any]
) -> None:
    keys = _copy(sixteen, tmp_path / "keys")
    before = read_directory_file(keys / "directory.cbor")
    assert before.head is not None
    assert before.head.head.vehicle_buckets == 16
    result = _ok("rehead", "--dir", str(keys), "--buckets", str(PARTITIONS))
    after = read_directory_file(keys / "directory.cbor")
    assert after.head is not None
    head = after.head.head
    assert head.seq == before.head.head.seq + 1
    assert head.vehicle_buckets == PARTITIONS
    # The records, byte for byte: only the head changed.
    assert sorted(r.to_cbor() for r in after.records) == sorted(r.to_cbor() for r in before.records)
    # The folder remembers the head it wrote, and it commits to the records under 4 buckets.
    root = _root(keys)
    stored = head_store_for(keys, root).load(root)
    assert stored is not None
    assert stored.head == head
    assert load_directory(keys / "directory.cbor", root).unsettled_sets() == []
    per_bucket = [0] * PARTITIONS
    for vid in VEHICLES:
        per_bucket[kafka_partition(vid.encode(), PARTITIONS)] += 1
    assert [count for count, _ in head.sets] == [1, *per_bucket]
    assert (
        f"signed directory head {head.seq} over the same {1 + len(VEHICLES)} records with 4 "
        f"vehicle buckets (head {head.seq - 1} had 16)"
    ) in result.output
    assert published == []  # no bootstrap: the folder only
    # Later heads keep the new count.
    _ok("issue", "--dir", str(keys), "--principal", "V-new", "--kind", "vehicle")
    assert _head(keys).vehicle_buckets == PARTITIONS
    assert _head(keys).seq == head.seq + 1
    assert "4 vehicle buckets" in _ok("show", "--dir", str(keys)).output


def test_rehead_publishes_the_new_head_as_issue_rotate_and_revoke_publish_theirs(
    sixteen: Path, tmp_path: Path, published: list[Any]
) -> None:
    keys = _copy(sixteen, tmp_path / "keys")
    result = _ok("rehead", "--dir", str(keys), "--buckets", "4", "--bootstrap", "kafka:9092")
    ((bootstrap, records, head),) = published
    assert bootstrap == "kafka:9092"
    assert records == []  # the records did not change: the head covers what the topic has
    assert head == cli_keys._load_public(keys).signed_head
    assert head.head.vehicle_buckets == 4
    assert "published to the key topic at kafka:9092" in result.output


def test_rehead_with_the_current_count_signs_nothing(sixteen: Path, tmp_path: Path) -> None:
    keys = _copy(sixteen, tmp_path / "keys")
    data = (keys / "directory.cbor").read_bytes()
    result = _ok("rehead", "--dir", str(keys), "--buckets", "16")
    assert "already has 16 vehicle buckets; nothing signed" in result.output
    assert (keys / "directory.cbor").read_bytes() == data


@pytest.mark.parametrize("buckets", ["0", "-3", str(MAX_VEHICLE_BUCKETS + 1)])
def test_rehead_refuses_a_bucket_count_out_of_range(
    sixteen: Path, tmp_path: Path, buckets: str
) -> None:
    keys = _copy(sixteen, tmp_path / "keys")
    data = (keys / "directory.cbor").read_bytes()
    error = _refused("rehead", "--dir", str(keys), "--buckets", buckets)
    assert error.reason is ReasonCode.CONFIG
    assert f"--buckets must be a whole number from 1 to {MAX_VEHICLE_BUCKETS}, not {buckets}" in (
        str(error)
    )
    assert (keys / "directory.cbor").read_bytes() == data


def test_rehead_refuses_what_is_not_a_whole_number_and_needs_the_count(
    sixteen: Path, tmp_path: Path
) -> None:
    keys = _copy(sixteen, tmp_path / "keys")
    for args in (["--buckets", "four"], ["--buckets", "4.5"], []):
        result = _run("rehead", "--dir", str(keys), *args)
        assert result.exit_code == 2, result.output  # typer's usage error
    assert _head(keys).vehicle_buckets == 16


def test_rehead_refuses_a_rolled_back_directory_file(sixteen: Path, tmp_path: Path) -> None:
    keys = _copy(sixteen, tmp_path / "keys")
    older = (keys / "directory.cbor").read_bytes()
    _ok("revoke", "--dir", str(keys), "--principal", VEHICLES[0])
    (keys / "directory.cbor").write_bytes(older)
    error = _refused("rehead", "--dir", str(keys), "--buckets", "4")
    assert error.reason is ReasonCode.DIRECTORY_ROLLBACK
    assert (keys / "directory.cbor").read_bytes() == older  # never signed over


def test_the_largest_count_is_one_the_parser_takes_and_fits_a_head_item() -> None:
    """The CLI's bound is inside what ``DirectoryHead`` accepts (any count >= 1) and what a
    directory file (``MAX_ITEM_BYTES``) and a Kafka message (1 MB by default) carry, with
    set counts of 10^9 records (their longest encoding)."""
    root = FleetRoot.generate(ROOT_SUITE)
    sets = tuple((10**9, bytes(32)) for _ in range(1 + MAX_VEHICLE_BUCKETS))
    signed = root.sign_head(DirectoryHead(2**40, time.time(), MAX_VEHICLE_BUCKETS, sets))
    data = signed.to_cbor()
    assert len(data) < min(MAX_ITEM_BYTES, 1_000_000)
    assert SignedDirectoryHead.from_cbor(data).head.vehicle_buckets == MAX_VEHICLE_BUCKETS
    with pytest.raises(FleetbusError) as refused:
        DirectoryHead(1, time.time(), 0, ((0, bytes(32)),))
    assert refused.value.reason is ReasonCode.MALFORMED


# --- what a worker does with it ---------------------------------------------------------------


def _scoped(tmp_path: Path, state: str = "state") -> FleetbusSettings:
    return FleetbusSettings(
        partitions=PARTITIONS, directory_scope="partitions", data_dir=str(tmp_path / state)
    )


def test_a_scoped_worker_falls_back_before_the_rehead_and_not_after_it(
    sixteen: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fleetbus.processors.app import load_worker_directory

    keys = _copy(sixteen, tmp_path / "keys")
    root, path = _root(keys), keys / "directory.cbor"
    with caplog.at_level(logging.WARNING):
        directory, _ = load_worker_directory(_scoped(tmp_path), root, path)
    assert directory.scope.buckets is None  # the whole fleet: 16 buckets, 4 partitions
    assert DIRECTORY_SCOPE_FALLBACK._value.get() == 1
    assert "16 vehicle buckets but the topics have 4 partitions" in caplog.text

    _ok("rehead", "--dir", str(keys), "--buckets", str(PARTITIONS))
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the restart, with the same state folder
        directory, roster = load_worker_directory(_scoped(tmp_path), root, path)
    assert directory.scope.buckets == frozenset()
    assert DIRECTORY_SCOPE_FALLBACK._value.get() == 0
    assert "vehicle buckets but the topics have" not in caplog.text
    assert directory.head is not None
    assert directory.head.vehicle_buckets == PARTITIONS

    # Its partitions' buckets, and only those, come with its assignment.
    buckets = PartitionBuckets(_scoped(tmp_path), directory, path, roster=roster)
    buckets.reread_topic = lambda follower: follower.finish_catch_up()  # type: ignore[method-assign]
    asyncio.run(buckets.assigned("seal", [0]))
    assert not buckets.fallback
    mine = {v for v in VEHICLES if kafka_partition(v.encode(), PARTITIONS) == 0}
    assert 0 < len(mine) < len(VEHICLES)
    assert directory.vehicles_held() == len(mine)
    assert directory.unsettled_sets() == []
    for vid in VEHICLES:
        if vid in mine:
            assert directory.latest(vid).principal_id == vid
        else:
            with pytest.raises(FleetbusError):
                directory.latest(vid)


def _topic(published: list[Any]) -> list[KeyTopicItem]:
    """The key-topic items of what the keys commands published, in order."""
    items: list[KeyTopicItem] = []
    for _, records, head in published:
        for key, value in key_topic_items(records, head):
            items.append(KeyTopicItem("keys", 0, len(items), key, value))
    return items


def test_processes_following_the_topic_take_the_rehead_live(
    sixteen: Path, tmp_path: Path, published: list[Any]
) -> None:
    keys = _copy(sixteen, tmp_path / "keys")
    root, path = _root(keys), keys / "directory.cbor"
    whole = load_directory(path, root)  # a worker with directory_scope fleet, or fallen back
    agent = load_directory(path, root, scope=vehicle_agent_scope([VEHICLES[0]]))
    _ok("rehead", "--dir", str(keys), "--buckets", "4", "--bootstrap", "k:1")
    _ok("revoke", "--dir", str(keys), "--principal", VEHICLES[1], "--bootstrap", "k:1")
    for directory in (whole, agent):
        follower = KeyTopicFollower(directory, role="test")
        follower.finish_catch_up()  # following live
        for item in _topic(published):
            assert follower.apply(item) != "refused", item
        assert directory.head is not None
        assert directory.head.vehicle_buckets == 4
        assert directory.unsettled_sets() == []
        assert directory.latest(VEHICLES[0]).principal_id == VEHICLES[0]
        assert directory.latest("dispatch-1").kind == "dispatcher"
    assert whole.latest(VEHICLES[1]).revoked
    assert all(not whole.latest(v).revoked for v in VEHICLES[2:])


def test_a_scoped_worker_that_meets_another_bucket_count_never_serves_a_stale_key(
    tmp_path: Path, published: list[Any]
) -> None:
    """A worker holding partition 0 of 4 under a 4-bucket head receives a head with 8 buckets:
    vehicle ``b`` of partition 0 is in bucket 4 of 8, outside the buckets it holds. Its key is
    refused from then on (fail closed) — a revocation of it, which the worker no longer keeps,
    must not leave the old key in use — until the next assignment, where the worker falls back
    to the whole fleet and loads it again, revoked."""
    from fleetbus.processors.app import load_worker_directory

    keys = _fleet(tmp_path / "keys", PARTITIONS)
    root, path = _root(keys), keys / "directory.cbor"
    directory, roster = load_worker_directory(_scoped(tmp_path), root, path)
    buckets = PartitionBuckets(_scoped(tmp_path), directory, path, roster=roster)
    topic: list[KeyTopicItem] = []

    def reread(follower: KeyTopicFollower) -> None:
        for item in topic:
            follower.apply(item)
        follower.finish_catch_up()

    buckets.reread_topic = reread  # type: ignore[method-assign]
    asyncio.run(buckets.assigned("seal", [0]))
    part0 = [v for v in VEHICLES if kafka_partition(v.encode(), PARTITIONS) == 0]
    a = next(v for v in part0 if kafka_partition(v.encode(), 8) == 0)
    b = next(v for v in part0 if kafka_partition(v.encode(), 8) == 4)
    assert not directory.latest(b).revoked

    _ok("rehead", "--dir", str(keys), "--buckets", "8", "--bootstrap", "k:1")
    _ok("revoke", "--dir", str(keys), "--principal", b, "--bootstrap", "k:1")
    topic += _topic(published)
    follower = KeyTopicFollower(directory, role="worker")
    follower.finish_catch_up()  # the running worker's follower, live
    for item in topic:
        follower.apply(item)
    assert directory.head is not None
    assert directory.head.vehicle_buckets == 8
    assert directory.latest(a).principal_id == a  # bucket 0 of 8: held, matches the head
    with pytest.raises(FleetbusError) as refused:
        directory.latest(b)
    assert refused.value.reason is ReasonCode.UNKNOWN_SIGNER

    # The next assignment: 8 buckets are not 4 partitions, every bucket is held and loaded.
    asyncio.run(buckets.assigned("seal", [0]))
    assert buckets.fallback
    assert DIRECTORY_SCOPE_FALLBACK._value.get() == 1
    assert directory.unsettled_sets() == []
    assert directory.latest(b).revoked
    assert directory.vehicles_held() == len(VEHICLES)


def test_a_whole_directory_computes_any_count_from_the_records_it_holds(
    sixteen: Path,
) -> None:
    directory = load_directory(sixteen / "directory.cbor", _root(sixteen))
    assert directory.scope == WHOLE_DIRECTORY
    for buckets in (1, 4, 16, 33):
        head = directory.compute_head(seq=99, at=0.0, vehicle_buckets=buckets)
        assert head.record_count == 1 + len(VEHICLES)
        fresh = KeyDirectory(directory.root)
        fresh.ingest_all(directory.signed_records())
        assert fresh.compute_head(seq=99, at=0.0, vehicle_buckets=buckets) == head
