"""Following the key topic: changes apply live, bad input is refused with its reason (never
raised), catch-up reads the log as its compacted form, and a vehicle agent holds set 0 only."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import cbor2
import pytest
from typer.testing import CliRunner

from fleetbus.bus.directory import (
    HEAD_KAFKA_KEY,
    WHOLE_DIRECTORY,
    DirectoryScope,
    FleetRoot,
    IssuedKey,
    KeyDirectory,
    SignedKeyRecord,
    head_to_kafka,
    issue_key,
    load_directory,
    publish_directory_file,
    record_set,
    sign_directory,
    to_kafka,
    vehicle_agent_scope,
    write_directory_file,
)
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.observability.metrics import KEY_TOPIC_ITEMS
from fleetbus.sdk.keytopic import (
    KeyTopicFollower,
    KeyTopicItem,
    KeyTopicRefusal,
    key_topic_items,
)

T0 = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture(scope="module")
def root() -> FleetRoot:
    return FleetRoot.generate()


def _issue(root: FleetRoot, principal: str, kind: str = "vehicle", **kw: Any) -> IssuedKey:
    return issue_key(
        root,
        principal_id=principal,
        kind=kind,
        signature_suite="ed25519",
        not_before=T0,
        not_after=T0 + 30 * DAY,
        **kw,
    )


@dataclasses.dataclass
class Topic:
    """A key topic in memory: what a follower reads, with offsets."""

    items: list[KeyTopicItem] = dataclasses.field(default_factory=list)

    def add(self, key: bytes | None, value: bytes | None) -> KeyTopicItem:
        item = KeyTopicItem("keys", 0, len(self.items), key, value)
        self.items.append(item)
        return item


@pytest.fixture(scope="module")
def fleet(root: FleetRoot) -> dict[str, Any]:
    """A dispatcher, a sealer and 40 vehicles (spread over the 16 buckets), head 2 (head 1:
    the dispatcher alone)."""
    dispatcher = _issue(root, "dispatch-1", "dispatcher")
    sealer = _issue(root, "bus-sealer", "sealer")
    vehicles = [_issue(root, f"V-{n:04d}", groups=["north"]) for n in range(40)]
    records = [dispatcher.signed, sealer.signed, *(v.signed for v in vehicles)]
    old_head, _ = sign_directory(root, records[:1], at=T0 - 1)
    head, merged = sign_directory(root, records, previous=old_head.head, at=T0)
    return {
        "dispatcher": dispatcher,
        "vehicles": vehicles,
        "records": merged,
        "head": head,
        "old_head": old_head,
    }


def _follower(
    root: FleetRoot, fleet: dict[str, Any], scope: DirectoryScope = WHOLE_DIRECTORY
) -> tuple[KeyTopicFollower, list[KeyTopicRefusal]]:
    directory = KeyDirectory(root.public, require_head=True, scope=scope)
    refused: list[KeyTopicRefusal] = []
    follower = KeyTopicFollower(directory, role="test", on_refused=refused.append)
    topic = Topic()
    for key, value in key_topic_items(fleet["records"], fleet["head"]):
        follower.apply(topic.add(key, value))
    follower.finish_catch_up()
    return follower, refused


def _refused_count(reason: ReasonCode) -> float:
    value = KEY_TOPIC_ITEMS.labels(role="test", outcome="refused", reason=reason.value)._value
    return float(value.get())


def test_a_revocation_on_the_topic_is_in_force_at_once(
    root: FleetRoot, fleet: dict[str, Any]
) -> None:
    follower, refused = _follower(root, fleet)
    directory = follower.directory
    kid = fleet["dispatcher"].signed.record.key_id
    directory.verifier_for("dispatch-1", kid, at=T0 + 1)
    revocation = root.sign(fleet["dispatcher"].signed.record.revocation(at=T0 + 2))
    head, _ = sign_directory(
        root, [*fleet["records"], revocation], previous=fleet["head"].head, at=T0 + 2
    )
    topic = Topic()
    assert follower.apply(topic.add(*to_kafka(revocation))) == "applied"
    # In force before its head arrives: a revocation only makes things stricter.
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("dispatch-1", kid, at=T0 + 1)
    assert exc.value.reason is ReasonCode.SIGNER_REVOKED
    assert follower.apply(topic.add(*head_to_kafka(head))) == "applied"
    assert directory.head == head.head
    assert directory.unsettled_sets() == []
    assert refused == []


def test_bad_input_is_refused_with_its_reason_and_never_raised(
    root: FleetRoot, fleet: dict[str, Any]
) -> None:
    follower, refused = _follower(root, fleet)
    stranger = FleetRoot.generate("ed25519")
    foreign = _issue(stranger, "dispatch-9", "dispatcher").signed
    unknown_kind = dict(fleet["dispatcher"].signed.record.to_map(), kind="satellite")
    record_cbor = cbor2.dumps(unknown_kind, canonical=True)
    signed_unknown = cbor2.dumps(
        {
            "fmt": 1,
            "record": record_cbor,
            "sig": root._signer.sign(b"fleetbus/key-directory/record/v1\x00" + record_cbor),
            "root_kid": root.key_id,
        },
        canonical=True,
    )
    key, value = to_kafka(fleet["dispatcher"].signed)
    cases = [
        (b"dispatch-1/x", b"\xff\x00not cbor", ReasonCode.MALFORMED),
        (b"dispatch-1/x", None, ReasonCode.MALFORMED),  # a tombstone
        (*to_kafka(foreign), ReasonCode.BAD_SIGNATURE),
        (*head_to_kafka(fleet["old_head"]), ReasonCode.DIRECTORY_ROLLBACK),
        (b"dispatch-1/y", signed_unknown, ReasonCode.MALFORMED),
        (b"someone/else", value, ReasonCode.MALFORMED),  # the key does not name the record
    ]
    before = {reason: _refused_count(reason) for _, _, reason in cases}
    topic = Topic()
    for item_key, item_value, _ in cases:
        assert follower.apply(topic.add(item_key, item_value)) == "refused"
    assert [r.reason for r in refused] == [reason for _, _, reason in cases]
    assert [r.item.offset for r in refused] == list(range(len(cases)))
    for reason in set(before):
        expected = before[reason] + sum(1 for _, _, r in cases if r is reason)
        assert _refused_count(reason) == expected
    # Still following, and nothing changed.
    assert follower.directory.head == fleet["head"].head
    assert follower.apply(topic.add(key, value)) == "applied"
    follower.directory.verifier_for(
        "dispatch-1", fleet["dispatcher"].signed.record.key_id, at=T0 + 1
    )


def test_a_failing_refusal_report_does_not_stop_the_follower(
    root: FleetRoot, fleet: dict[str, Any]
) -> None:
    directory = KeyDirectory(root.public, require_head=True)

    def broken(_: KeyTopicRefusal) -> None:
        raise RuntimeError("DLQ unreachable")

    follower = KeyTopicFollower(directory, role="test", on_refused=broken)
    follower.finish_catch_up()
    assert follower.apply(Topic().add(b"x/y", b"junk")) == "refused"


def test_catch_up_reads_superseded_heads_as_compaction_would(
    root: FleetRoot, fleet: dict[str, Any]
) -> None:
    """A process that already has head 3 (its file) reads a log holding heads 1, 2, 3: no
    refusal; the log's last head is the one checked."""
    records = fleet["records"]
    h1, _ = sign_directory(root, records[:2], at=T0)
    h2, _ = sign_directory(root, records[:3], previous=h1.head, at=T0 + 1)
    h3, _ = sign_directory(root, records, previous=h2.head, at=T0 + 2)
    directory = KeyDirectory(root.public, require_head=True)
    directory.ingest_all(records)
    directory.ingest_head(h3)
    refused: list[KeyTopicRefusal] = []
    follower = KeyTopicFollower(directory, role="test", on_refused=refused.append)
    topic = Topic()
    log = [
        *key_topic_items(records[:2], h1),
        *key_topic_items(records[2:3], h2),
        *key_topic_items(records[3:], h3),
    ]
    outcomes = [follower.apply(topic.add(k, v)) for k, v in log]
    assert outcomes.count("held") == 3
    follower.finish_catch_up()
    assert refused == []
    assert directory.head == h3.head
    # After the catch-up, an older head is refused outright.
    assert follower.apply(topic.add(*head_to_kafka(h2))) == "refused"
    assert refused[-1].reason is ReasonCode.DIRECTORY_ROLLBACK


def test_a_vehicle_agent_holds_set_0_and_its_own_vehicles_only(
    root: FleetRoot, fleet: dict[str, Any]
) -> None:
    own = fleet["vehicles"][0].signed.record
    follower, refused = _follower(root, fleet, vehicle_agent_scope([own.principal_id]))
    directory = follower.directory
    assert refused == []
    held = {r.principal_id for r in directory.records()}
    assert held == {"dispatch-1", "bus-sealer", own.principal_id}
    assert directory.unsettled_sets() == []
    # Its own record answers group membership; other vehicles are unknown here.
    assert directory.current(own.principal_id, at=T0 + 1).groups == frozenset({"north"})
    other = fleet["vehicles"][1].signed.record
    with pytest.raises(FleetbusError) as exc:
        directory.current(other.principal_id, at=T0 + 1)
    assert exc.value.reason is ReasonCode.UNKNOWN_KEY_ID
    # Another vehicle's record is skipped unverified (not even its signature is checked).
    forged = SignedKeyRecord(other, b"\x00" * 64, root.key_id)
    assert follower.apply(Topic().add(*to_kafka(forged))) == "skipped"
    assert refused == []


def test_a_vehicle_agent_directory_does_not_grow_with_the_fleet(
    root: FleetRoot, fleet: dict[str, Any]
) -> None:
    follower, _ = _follower(root, fleet, vehicle_agent_scope(["V-0000"]))
    assert len(follower.directory.signed_records()) == 3  # dispatcher, sealer, its vehicle


def test_set_0_is_still_checked_against_the_head_in_a_partial_scope(
    root: FleetRoot, fleet: dict[str, Any]
) -> None:
    """Dropping the dispatcher's revocation from what a vehicle agent is shown is refused."""
    revocation = root.sign(fleet["dispatcher"].signed.record.revocation(at=T0 + 2))
    head, _ = sign_directory(
        root, [*fleet["records"], revocation], previous=fleet["head"].head, at=T0 + 2
    )
    directory = KeyDirectory(root.public, require_head=True, scope=vehicle_agent_scope([]))
    directory.ingest_all(fleet["records"])  # the issuance, not the revocation
    directory.ingest_head(head)
    assert directory.unsettled_sets() == [0]
    with pytest.raises(FleetbusError) as exc:
        directory.latest("dispatch-1")
    assert exc.value.reason is ReasonCode.DIRECTORY_ROLLBACK


def test_load_directory_with_a_scope_checks_only_the_held_sets(
    tmp_path: Path, root: FleetRoot, fleet: dict[str, Any]
) -> None:
    path = tmp_path / "directory.cbor"
    publish_directory_file(path, root, fleet["records"])
    one = fleet["vehicles"][3].signed.record
    bucket = record_set(one, 16) - 1
    directory = load_directory(path, root.public, scope=DirectoryScope(frozenset({bucket})))
    held = {r.principal_id for r in directory.records() if r.kind == "vehicle"}
    assert one.principal_id in held
    assert all(record_set(r, 16) == bucket + 1 for r in directory.records() if r.kind == "vehicle")
    with pytest.raises(ConfigError):
        directory.compute_head(seq=9, at=T0, vehicle_buckets=16)


def test_a_partial_load_skips_other_buckets_before_parsing_them(
    tmp_path: Path, root: FleetRoot, fleet: dict[str, Any]
) -> None:
    """A seal stage holding some buckets of a large fleet must not parse the rest of the file
    (most of its start-up time and memory): a record of another bucket is skipped unparsed, by
    the file's own head's bucket count (so unreadable bytes there cannot stop the load)."""
    import cbor2

    from fleetbus.bus.directory import principal_set

    path = tmp_path / "directory.cbor"
    head = publish_directory_file(path, root, fleet["records"])
    one = fleet["vehicles"][3].signed.record
    bucket = record_set(one, 16) - 1
    other = next(
        f"V-x{i}" for i in range(999) if principal_set(f"V-x{i}", "vehicle", 16) != 1 + bucket
    )
    # Peekable (principal and kind readable) but not a valid signed record.
    junk = cbor2.dumps({"record": cbor2.dumps({"principal": other, "kind": "vehicle"})})
    doc = cbor2.loads(path.read_bytes())
    doc["records"].append(junk)
    path.write_bytes(cbor2.dumps(doc, canonical=True))
    directory = load_directory(path, root.public, scope=DirectoryScope(frozenset({bucket})))
    assert directory.latest(one.principal_id).key_id == one.key_id
    assert directory.head == head.head


def test_publication_order_is_records_then_head(root: FleetRoot, fleet: dict[str, Any]) -> None:
    items = key_topic_items(fleet["records"][:2], fleet["head"])
    assert [k for k, _ in items][-1] == HEAD_KAFKA_KEY
    assert all(b"/" in k for k, _ in items[:-1])


def test_keys_revoke_publishes_the_revocation_and_the_new_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetbus.cli import keys as cli_keys

    sent: list[tuple[str, list[SignedKeyRecord], Any]] = []

    def fake_publish(settings: Any, records: Any, head: Any) -> None:
        sent.append((settings.kafka_bootstrap, list(records), head))

    monkeypatch.setattr(cli_keys, "publish_key_change", fake_publish)
    runner = CliRunner()
    folder = str(tmp_path / "keys")
    assert runner.invoke(cli_keys.keys_app, ["init", "--dir", folder]).exit_code == 0
    args = ["--dir", folder, "--principal", "dispatch-1"]
    result = runner.invoke(
        cli_keys.keys_app, ["issue", *args, "--kind", "dispatcher", "--suite", "ed25519"]
    )
    assert result.exit_code == 0, result.output
    assert sent == []  # no bootstrap: the folder only
    result = runner.invoke(cli_keys.keys_app, ["revoke", *args, "--bootstrap", "127.0.0.1:1"])
    assert result.exit_code == 0, result.output
    ((bootstrap, records, head),) = sent
    assert bootstrap == "127.0.0.1:1"
    assert [r.record.revoked for r in records] == [True]
    on_disk = cli_keys._load_public(tmp_path / "keys")
    assert head == on_disk.signed_head
    assert head.head.seq == 3
    result = runner.invoke(cli_keys.keys_app, ["publish", "--dir", folder, "--bootstrap", "b:1"])
    assert result.exit_code == 0, result.output
    assert len(sent[-1][1]) == 1
    assert sent[-1][2] == head


def test_a_file_set_matching_its_head_is_authenticated_by_the_head(
    tmp_path: Path, root: FleetRoot, fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-record signatures are not checked one by one where the root-signed head commits to
    the records' digests; the root holder (verify_each) and a mismatching set still check."""
    from fleetbus.bus.directory import keydirectory as directory_module

    path = tmp_path / "directory.cbor"
    head = publish_directory_file(path, root, fleet["records"])
    checked: list[str] = []
    real = directory_module.verify_signed_record

    def counting(signed: SignedKeyRecord, *args: Any) -> Any:
        checked.append(signed.record.principal_id)
        return real(signed, *args)

    monkeypatch.setattr(directory_module, "verify_signed_record", counting)
    loaded = load_directory(path, root.public)
    assert checked == []
    assert len(loaded.records()) == len(fleet["records"])
    load_directory(path, root.public, verify_each=True)
    assert len(checked) == len(fleet["records"])

    # A record whose own signature is garbage: the head still vouches for its content...
    damaged = [
        SignedKeyRecord(s.record, b"\x01" * 64, s.root_key_id) if i == 0 else s
        for i, s in enumerate(fleet["records"])
    ]
    write_directory_file(path, head, damaged)
    assert load_directory(path, root.public).latest(damaged[0].record.principal_id)
    # ...but the root holder, which passes records on, refuses it.
    with pytest.raises(FleetbusError) as exc:
        load_directory(path, root.public, verify_each=True)
    assert exc.value.reason is ReasonCode.BAD_SIGNATURE
    # A set that does not match its head is checked record by record: a forged extra record
    # is refused for its signature, a missing one for the rollback it is.
    stranger = FleetRoot.generate("ed25519")
    extra = _issue(stranger, "dispatch-x", "dispatcher").signed
    forged = SignedKeyRecord(extra.record, extra.signature, root.key_id)
    write_directory_file(path, head, [*fleet["records"], forged])
    with pytest.raises(FleetbusError) as exc:
        load_directory(path, root.public)
    assert exc.value.reason is ReasonCode.BAD_SIGNATURE
    write_directory_file(path, head, fleet["records"][1:])
    with pytest.raises(FleetbusError) as exc:
        load_directory(path, root.public)
    assert exc.value.reason is ReasonCode.DIRECTORY_ROLLBACK


def test_an_identical_topic_value_is_not_parsed_again(
    root: FleetRoot, fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetbus.bus.directory import keydirectory as directory_module

    follower, _ = _follower(root, fleet)
    parsed: list[bytes] = []
    real = directory_module.from_kafka

    def counting(value: bytes | None) -> Any:
        parsed.append(value or b"")
        return real(value)

    monkeypatch.setattr(directory_module, "from_kafka", counting)
    signed = fleet["records"][0]
    key, value = to_kafka(signed)
    assert follower.apply(Topic().add(key, value)) == "applied"
    assert parsed == []
    # The same key with other bytes is parsed (and judged) as usual.
    assert follower.apply(Topic().add(key, value[:-1] + b"\x00")) == "refused"
    assert len(parsed) == 1


def test_a_vehicle_agent_does_not_parse_other_vehicles_records(
    tmp_path: Path, root: FleetRoot, fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its start-up cost follows what it holds: other vehicles are skipped before the strict
    parse, from the file and from the topic."""
    path = tmp_path / "directory.cbor"
    publish_directory_file(path, root, fleet["records"])
    parsed: list[str] = []
    real = SignedKeyRecord.from_cbor.__func__  # type: ignore[attr-defined]

    def counting(cls: type[SignedKeyRecord], data: bytes) -> SignedKeyRecord:
        signed: SignedKeyRecord = real(cls, data)
        parsed.append(signed.record.principal_id)
        return signed

    monkeypatch.setattr(SignedKeyRecord, "from_cbor", classmethod(counting))
    scope = vehicle_agent_scope(["V-0007"])
    directory = load_directory(path, root.public, scope=scope)
    assert sorted(parsed) == ["V-0007", "bus-sealer", "dispatch-1"]
    assert directory.unsettled_sets() == []
    parsed.clear()
    follower = KeyTopicFollower(directory, role="test")
    follower.finish_catch_up()
    topic = Topic()
    outcomes = [follower.apply(topic.add(*to_kafka(s))) for s in fleet["records"]]
    assert outcomes.count("skipped") == len(fleet["records"]) - 3
    assert parsed == []  # the three held were identical to what it had


def test_acls_let_vehicles_read_and_only_key_publishers_write_the_key_topic() -> None:
    from fleetbus.bus.settings import TopicNames
    from fleetbus.devtools.kafka import fleet_acls

    topics = TopicNames(prefix="f.")
    grants = fleet_acls(
        topics,
        app_id="fb",
        worker="w",
        dispatchers=["d"],
        vehicles=["v"],
        key_publishers=["k"],
    )
    on_keys = {(g.principal, g.operation) for g in grants if g.name == "f.keys"}
    assert on_keys == {("v", "READ"), ("v", "DESCRIBE"), ("k", "WRITE"), ("k", "DESCRIBE")}


def test_fleet_simulate_follows_the_key_topic_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: the simulated fleet (compose's and the CLI's) follows the key topic by default,
    holding set 0 and its own vehicles; ``--no-follow-key-topic`` keeps the file only."""
    from fleetbus.bus.settings import FleetbusSettings
    from fleetbus.cli import fleet as cli_fleet
    from fleetbus.cli.main import app as main_app
    from fleetbus.observability import logging as fb_logging
    from fleetbus.observability import tracing_setup
    from tests.support.pipeline import make_test_fleet

    fleet = make_test_fleet(tmp_path, vehicles=3)
    agent = cli_fleet.simulator_agent(
        FleetbusSettings(kafka_bootstrap="127.0.0.1:9"),
        fleet.keys_dir,
        ["V-0001"],
        store_path=tmp_path / "state" / "sim.sqlite",
    )
    try:
        assert agent._key_reader is not None  # nothing read yet: the catch-up is at start
        held = {r.principal_id for r in agent.directory.records() if r.kind == "vehicle"}
        assert held == {"V-0001"}
    finally:
        agent.close()

    asked: list[bool] = []

    class Built(Exception):
        pass

    def capture(*args: Any, follow_key_topic: bool, **kwargs: Any) -> Any:
        asked.append(follow_key_topic)
        raise Built

    monkeypatch.setattr(cli_fleet, "simulator_agent", capture)
    monkeypatch.setattr(fb_logging, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(tracing_setup, "setup_tracing", lambda *a, **k: None)
    args = ["fleet", "simulate", "--keys-dir", str(fleet.keys_dir), "--vehicles", "1"]
    for extra in ([], ["--no-follow-key-topic"], ["--follow-key-topic"]):
        result = CliRunner().invoke(main_app, [*args, *extra])
        assert isinstance(result.exception, Built), result.output
    assert asked == [True, False, True]
