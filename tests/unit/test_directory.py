"""Key directory: root signatures, rotation overlap, revocation, expiry, Kafka and file formats.

Over 500 lines because it covers the key directory's whole lifecycle (issue, rotate, revoke,
expire, encode) on the same fixture roots.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from pathlib import Path

import cbor2
import pytest

from fleetbus.bus.directory import (
    DirectoryHead,
    FleetRoot,
    HeadStore,
    IssuedKey,
    KeyDirectory,
    KeyRecord,
    PrincipalKeyFile,
    RootPublicKey,
    SignedDirectoryHead,
    SignedKeyRecord,
    build_head,
    derive_key_id,
    from_kafka,
    head_to_kafka,
    issue_key,
    load_directory,
    load_key_file,
    publish_directory_file,
    read_directory_file,
    record_set,
    save_key_file,
    sign_directory,
    to_kafka,
    write_directory_file,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import RecipientKeys

T0 = 1_800_000_000.0
DAY = 86400.0
HOUR = 3600.0


@pytest.fixture(scope="module")
def root() -> FleetRoot:
    return FleetRoot.generate()


@pytest.fixture(scope="module")
def other_root() -> FleetRoot:
    return FleetRoot.generate()


def _issue(root: FleetRoot, principal: str = "veh-1", **kw: object) -> IssuedKey:
    args: dict[str, object] = {
        "principal_id": principal,
        "kind": "vehicle",
        "kems": ["xwing", "x25519"],
        "not_before": T0,
        "not_after": T0 + 30 * DAY,
    }
    args.update(kw)
    return issue_key(root, **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def v1(root: FleetRoot) -> IssuedKey:
    return _issue(root, qkd_sae_id="SAE_VEH_1", groups=["depot-a"])


def _reason(exc: pytest.ExceptionInfo[FleetbusError]) -> ReasonCode:
    return exc.value.reason


def test_issue_verify_ingest(root: FleetRoot, v1: IssuedKey) -> None:
    directory = KeyDirectory(root.public)
    record = directory.ingest(v1.signed)
    assert record.principal_id == "veh-1"
    assert record.version == 1
    assert record.key_id == derive_key_id(record.public_keys)
    assert set(record.public_keys) == {"ed25519", "mldsa65", "xwing", "x25519"}
    assert record.capabilities == {"pqc", "qkd"}
    assert record.groups == {"depot-a"}
    assert directory.record(record.key_id) == record
    assert directory.latest("veh-1") == record
    message = b"command"
    verifier = directory.verifier_for("veh-1", record.key_id, at=T0 + 1)
    assert verifier.verify(message, v1.key_file.signer().sign(message)) is True
    assert verifier.verify(message + b"!", v1.key_file.signer().sign(message)) is False


def test_recipient_keys(root: FleetRoot, v1: IssuedKey) -> None:
    directory = KeyDirectory(root.public)
    directory.ingest(v1.signed)
    keys = directory.recipient_keys("veh-1", at=T0 + 1)
    assert isinstance(keys, RecipientKeys)
    assert set(keys.public_keys) == {"xwing", "x25519"}  # KEM keys only
    assert keys.public_keys["xwing"] == v1.signed.record.public_keys["xwing"]
    assert keys.key_ids == {"xwing": v1.signed.record.key_id, "x25519": v1.signed.record.key_id}
    assert keys.qkd_sae_id == "SAE_VEH_1"
    assert "pqc" in keys.capabilities
    # The private side names the same key ids, so providers can match them.
    assert v1.key_file.key_set().key_ids["xwing"] == keys.key_ids["xwing"]
    with pytest.raises(FleetbusError) as exc:
        directory.recipient_keys("nobody", at=T0)
    assert _reason(exc) is ReasonCode.UNKNOWN_KEY_ID


def test_bad_root_signature_rejected(root: FleetRoot, other_root: FleetRoot, v1: IssuedKey) -> None:
    directory = KeyDirectory(root.public)
    forged = other_root.sign(v1.signed.record)
    with pytest.raises(FleetbusError) as exc:
        directory.ingest(forged)
    assert _reason(exc) is ReasonCode.BAD_SIGNATURE
    # Same root key id but a signature of another root's key.
    relabelled = dataclasses.replace(forged, root_key_id=root.key_id)
    with pytest.raises(FleetbusError) as exc:
        directory.ingest(relabelled)
    assert _reason(exc) is ReasonCode.BAD_SIGNATURE
    # A record changed after signing (extended validity).
    stretched = dataclasses.replace(
        v1.signed, record=dataclasses.replace(v1.signed.record, not_after=T0 + 9999 * DAY)
    )
    with pytest.raises(FleetbusError) as exc:
        directory.ingest(stretched)
    assert _reason(exc) is ReasonCode.BAD_SIGNATURE
    sig = bytearray(v1.signed.signature)
    sig[-1] ^= 1
    with pytest.raises(FleetbusError) as exc:
        directory.ingest(dataclasses.replace(v1.signed, signature=bytes(sig)))
    assert _reason(exc) is ReasonCode.BAD_SIGNATURE
    assert directory.records() == []


def test_key_id_must_match_keys(root: FleetRoot, v1: IssuedKey) -> None:
    lying = dataclasses.replace(v1.signed.record, key_id="k" + "0" * 32)
    with pytest.raises(FleetbusError) as exc:
        KeyDirectory(root.public).ingest(root.sign(lying))
    assert _reason(exc) is ReasonCode.MALFORMED


def test_unknown_signer(root: FleetRoot, v1: IssuedKey) -> None:
    directory = KeyDirectory(root.public)
    directory.ingest(v1.signed)
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("veh-1", "k-nope", at=T0 + 1)
    assert _reason(exc) is ReasonCode.UNKNOWN_SIGNER
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("veh-2", v1.signed.record.key_id, at=T0 + 1)
    assert _reason(exc) is ReasonCode.UNKNOWN_SIGNER


def test_expiry_and_not_yet_valid(root: FleetRoot, v1: IssuedKey) -> None:
    directory = KeyDirectory(root.public)
    directory.ingest(v1.signed)
    kid = v1.signed.record.key_id
    directory.verifier_for("veh-1", kid, at=T0)
    directory.verifier_for("veh-1", kid, at=T0 + 30 * DAY - 1)
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("veh-1", kid, at=T0 + 30 * DAY)
    assert _reason(exc) is ReasonCode.SIGNER_EXPIRED
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("veh-1", kid, at=T0 - 1)
    assert _reason(exc) is ReasonCode.NOT_YET_VALID
    with pytest.raises(FleetbusError) as exc:
        directory.recipient_keys("veh-1", at=T0 + 31 * DAY)
    assert _reason(exc) is ReasonCode.SIGNER_EXPIRED


def test_rotation_overlap(root: FleetRoot, v1: IssuedKey) -> None:
    directory = KeyDirectory(root.public)
    directory.ingest(v1.signed)
    rotate_at = T0 + 10 * DAY
    v2 = _issue(
        root,
        version=2,
        not_before=rotate_at,
        not_after=rotate_at + 30 * DAY,
        overlap_s=6 * HOUR,
    )
    directory.ingest(v2.signed)
    old, new = v1.signed.record.key_id, v2.signed.record.key_id
    assert old != new
    assert directory.latest("veh-1").key_id == new
    # Before the new key starts, the old one is current and the new one is not yet valid.
    assert directory.recipient_keys("veh-1", at=rotate_at - 1).key_ids["xwing"] == old
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("veh-1", new, at=rotate_at - 1)
    assert _reason(exc) is ReasonCode.NOT_YET_VALID
    # Inside the overlap window both verify; sealing uses the new key.
    directory.verifier_for("veh-1", old, at=rotate_at + 6 * HOUR - 1)
    directory.verifier_for("veh-1", new, at=rotate_at + 1)
    assert directory.recipient_keys("veh-1", at=rotate_at + 1).key_ids["xwing"] == new
    # After the window the old key is rotated out.
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("veh-1", old, at=rotate_at + 6 * HOUR)
    assert _reason(exc) is ReasonCode.SIGNER_EXPIRED
    assert directory.superseded_at(v1.signed.record) == rotate_at + 6 * HOUR
    assert math.isinf(directory.superseded_at(v2.signed.record))


def test_revocation_is_immediate_and_sticky(root: FleetRoot, v1: IssuedKey) -> None:
    directory = KeyDirectory(root.public)
    directory.ingest(v1.signed)
    kid = v1.signed.record.key_id
    directory.verifier_for("veh-1", kid, at=T0 + 1)
    revocation = root.sign(v1.signed.record.revocation(at=T0 + 2 * DAY))
    directory.ingest(revocation)
    # Immediate: even for times before revoked_at, the key no longer verifies.
    for at in (T0 + 1, T0 + 2 * DAY, T0 + 3 * DAY):
        with pytest.raises(FleetbusError) as exc:
            directory.verifier_for("veh-1", kid, at=at)
        assert _reason(exc) is ReasonCode.SIGNER_REVOKED
    with pytest.raises(FleetbusError) as exc:
        directory.recipient_keys("veh-1", at=T0 + 1)
    assert _reason(exc) is ReasonCode.SIGNER_REVOKED
    # Re-ingesting the original (unrevoked) record does not undo the revocation.
    directory.ingest(v1.signed)
    record = directory.record(kid)
    assert record is not None
    assert record.revoked
    # An unsigned revocation cannot be injected.
    other = KeyDirectory(root.public)
    other.ingest(v1.signed)
    fake = dataclasses.replace(revocation, signature=b"\x00" * len(revocation.signature))
    with pytest.raises(FleetbusError) as exc:
        other.ingest(fake)
    assert _reason(exc) is ReasonCode.BAD_SIGNATURE


def test_kafka_round_trip_byte_exact(root: FleetRoot, v1: IssuedKey) -> None:
    key, value = to_kafka(v1.signed)
    assert key == f"veh-1/{v1.signed.record.key_id}".encode()
    parsed = from_kafka(value)
    assert parsed == v1.signed
    assert to_kafka(parsed) == (key, value)
    directory = KeyDirectory(root.public)
    assert directory.ingest_kafka(value) == v1.signed.record
    # Deterministic: encoding twice gives the same bytes.
    assert v1.signed.to_cbor() == value
    revocation_key, _ = to_kafka(root.sign(v1.signed.record.revocation(at=T0)))
    assert revocation_key == key  # compaction keeps the revocation, not the issuance


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"", id="empty"),
        pytest.param(None, id="tombstone"),
        pytest.param(b"\xff\x00garbage", id="not-cbor"),
        pytest.param(cbor2.dumps([1, 2, 3]), id="array"),
        pytest.param(cbor2.dumps({"fmt": 1}), id="missing-fields"),
        pytest.param(
            cbor2.dumps({"fmt": 1, "record": b"\xa0", "sig": b"", "root_kid": "x"}),
            id="empty-record",
        ),
        pytest.param(
            cbor2.dumps({"fmt": 1, "record": "text", "sig": b"", "root_kid": "x"}),
            id="record-not-bytes",
        ),
    ],
)
def test_malformed_bytes(value: bytes | None) -> None:
    with pytest.raises(FleetbusError) as exc:
        from_kafka(value)
    assert _reason(exc) is ReasonCode.MALFORMED


def test_malformed_variants_of_a_valid_record(v1: IssuedKey) -> None:
    _, value = to_kafka(v1.signed)
    with pytest.raises(FleetbusError) as exc:
        from_kafka(value[:-1])  # truncated
    assert _reason(exc) is ReasonCode.MALFORMED
    # Non-canonical: same content, keys in another order.
    outer = cbor2.loads(value)
    reordered = cbor2.dumps(dict(reversed(list(outer.items()))))
    assert reordered != value
    with pytest.raises(FleetbusError) as exc:
        from_kafka(reordered)
    assert _reason(exc) is ReasonCode.MALFORMED
    # Duplicate map key inside the record.
    record_bytes = outer["record"]
    duplicate = b"\xb0" + record_bytes[1:] + cbor2.dumps("kind") + cbor2.dumps("edge")
    bad = cbor2.dumps({**outer, "record": duplicate}, canonical=True)
    with pytest.raises(FleetbusError) as exc:
        from_kafka(bad)
    assert _reason(exc) is ReasonCode.MALFORMED
    # Wrong field type.
    record_map = cbor2.loads(record_bytes)
    record_map["version"] = "1"
    bad = cbor2.dumps({**outer, "record": cbor2.dumps(record_map, canonical=True)}, canonical=True)
    with pytest.raises(FleetbusError) as exc:
        from_kafka(bad)
    assert _reason(exc) is ReasonCode.MALFORMED


def test_record_validation() -> None:
    base = {
        "principal_id": "veh-1",
        "kind": "vehicle",
        "version": 1,
        "key_id": "k",
        "public_keys": {},
        "signature_suite": "ed25519",
        "not_before": 10.0,
        "not_after": 20.0,
    }
    KeyRecord(**base)  # type: ignore[arg-type]
    for change in (
        {"kind": "spaceship"},
        {"version": 0},
        {"not_after": 10.0},
        {"principal_id": "a/b"},
        {"revoked": True},
    ):
        with pytest.raises(FleetbusError) as exc:
            KeyRecord(**{**base, **change})  # type: ignore[arg-type]
        assert _reason(exc) is ReasonCode.MALFORMED


def test_root_public_key_round_trip(root: FleetRoot) -> None:
    data = root.public.to_bytes()
    assert RootPublicKey.from_bytes(data) == root.public
    assert root.public.suite == "composite-mldsa65-ed25519"
    assert set(root.public.public_keys) == {"ed25519", "mldsa65"}
    with pytest.raises(FleetbusError) as exc:
        RootPublicKey.from_bytes(data[:-3])
    assert _reason(exc) is ReasonCode.MALFORMED


def test_private_key_file_mode_and_round_trip(tmp_path: Path, v1: IssuedKey) -> None:
    path = tmp_path / "veh-1.key"
    old_umask = os.umask(0)  # even with a permissive umask the file is 0600
    try:
        save_key_file(path, v1.key_file)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = load_key_file(path)
    assert loaded == v1.key_file
    key_set = loaded.key_set()
    assert key_set.principal_id == "veh-1"
    assert set(key_set.private_keys) == {"ed25519", "mldsa65", "xwing", "x25519"}
    assert key_set.qkd_sae_id == "SAE_VEH_1"
    signer = loaded.signer()
    assert signer.key_id == v1.signed.record.key_id
    for raw in v1.key_file.private_keys.values():
        assert raw.hex() not in repr(loaded) + repr(key_set) + repr(signer)
    # Replacing the file keeps 0600.
    save_key_file(path, v1.key_file)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_private_key_file_with_loose_mode_is_refused(tmp_path: Path, v1: IssuedKey) -> None:
    path = tmp_path / "loose.key"
    path.write_bytes(v1.key_file.to_json())
    path.chmod(0o644)
    with pytest.raises(FleetbusError) as exc:
        load_key_file(path)
    assert _reason(exc) is ReasonCode.CONFIG


def test_private_key_file_garbage_is_malformed_without_echo() -> None:
    secret = "c2VjcmV0LWtleS1tYXRlcmlhbA=="
    with pytest.raises(FleetbusError) as exc:
        PrincipalKeyFile.from_json(("{" + secret).encode())
    assert _reason(exc) is ReasonCode.MALFORMED
    assert secret not in str(exc.value)


def test_directory_file_round_trip(tmp_path: Path, root: FleetRoot, v1: IssuedKey) -> None:
    path = tmp_path / "directory.cbor"
    first = publish_directory_file(path, root, [], at=T0)
    assert read_directory_file(path).records == []
    assert first.head.seq == 1
    assert first.head.record_count == 0
    publish_directory_file(path, root, [v1.signed], at=T0 + 1)
    revocation = root.sign(v1.signed.record.revocation(at=T0 + 1))
    third = publish_directory_file(path, root, [v1.signed, revocation], at=T0 + 2)
    content = read_directory_file(path)
    # Merged: the revocation replaced the issuance; the head covers exactly that.
    assert content.records == [revocation]
    assert content.head == third
    assert third.head.seq == 3
    directory = load_directory(path, root.public)
    assert directory.head == third.head
    record = directory.record(v1.signed.record.key_id)
    assert record is not None
    assert record.revoked


def test_directory_file_with_forged_record_fails_to_load(
    tmp_path: Path, root: FleetRoot, other_root: FleetRoot, v1: IssuedKey
) -> None:
    path = tmp_path / "directory.cbor"
    head, records = sign_directory(root, [v1.signed], at=T0)
    forged = other_root.sign(_issue(other_root, "veh-9").signed.record)
    write_directory_file(path, head, [*records, forged])
    with pytest.raises(FleetbusError) as exc:
        load_directory(path, root.public)
    assert _reason(exc) is ReasonCode.BAD_SIGNATURE


def test_record_repr_is_short(v1: IssuedKey) -> None:
    text = repr(v1.signed)
    assert v1.signed.record.key_id in text
    assert repr(v1.signed.signature) not in text
    assert repr(v1.signed.record.public_keys["mldsa65"]) not in text


def test_records_of_one_principal_are_the_fleet_records_filtered_in_the_same_order(
    root: FleetRoot, v1: IssuedKey
) -> None:
    directory = KeyDirectory(root.public)
    issued = [
        v1,
        _issue(root, version=3, not_before=T0 + 2 * DAY),
        _issue(root, version=2, not_before=T0 + DAY),
        _issue(root, "veh-0"),
        _issue(root, "veh-2", version=2),
    ]
    for key in issued:
        directory.ingest(key.signed)
    everything = directory.records()
    assert [r.principal_id for r in everything] == ["veh-0", "veh-1", "veh-1", "veh-1", "veh-2"]
    for principal in ("veh-0", "veh-1", "veh-2"):
        assert directory.records(principal) == [
            r for r in everything if r.principal_id == principal
        ]
    assert [r.version for r in directory.records("veh-1")] == [1, 2, 3]
    assert directory.records("nobody") == []
    assert directory.latest("veh-1").version == 3


# --- directory head: rollback of signed material ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class History:
    """A dispatcher issued (head 1), a vehicle added (head 2), the dispatcher revoked (head 3)."""

    dispatcher: SignedKeyRecord
    vehicle: SignedKeyRecord
    revocation: SignedKeyRecord
    heads: list[SignedDirectoryHead]

    @property
    def kid(self) -> str:
        return self.dispatcher.record.key_id


@pytest.fixture(scope="module")
def history(root: FleetRoot) -> History:
    dispatcher = _issue(root, "dispatch-1", kind="dispatcher", kems=[]).signed
    vehicle = _issue(root, "veh-7").signed
    revocation = root.sign(dispatcher.record.revocation(at=T0 + 2 * DAY))
    h1, _ = sign_directory(root, [dispatcher], at=T0)
    h2, _ = sign_directory(root, [dispatcher, vehicle], previous=h1.head, at=T0 + 1)
    h3, _ = sign_directory(root, [dispatcher, vehicle, revocation], previous=h2.head, at=T0 + 2)
    return History(dispatcher, vehicle, revocation, [h1, h2, h3])


def _value(item: SignedKeyRecord | SignedDirectoryHead) -> bytes:
    return item.to_cbor()


def _rollback(call: object) -> None:
    assert callable(call)
    with pytest.raises(FleetbusError) as exc:
        call()
    assert _reason(exc) is ReasonCode.DIRECTORY_ROLLBACK


def test_republished_issuance_on_a_live_topic_leaves_the_key_revoked(
    root: FleetRoot, history: History
) -> None:
    directory = KeyDirectory(root.public)
    for item in (history.dispatcher, history.heads[0], history.vehicle, history.heads[1]):
        directory.ingest_kafka(_value(item))
    directory.verifier_for("dispatch-1", history.kid, at=T0 + 1)
    directory.ingest_kafka(_value(history.revocation))
    directory.ingest_kafka(_value(history.heads[2]))
    # The attacker re-publishes the genuine issuance record under its Kafka key.
    key, value = to_kafka(history.dispatcher)
    directory.ingest_kafka(value, key)
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("dispatch-1", history.kid, at=T0 + 1)
    assert _reason(exc) is ReasonCode.SIGNER_REVOKED


def test_a_topic_consumer_without_a_head_uses_nothing(root: FleetRoot, history: History) -> None:
    """After compaction the topic may hold only the re-published issuance: no head, no use."""
    directory = KeyDirectory(root.public)
    key, value = to_kafka(history.dispatcher)
    assert directory.ingest_kafka(value, key) == history.dispatcher.record
    _rollback(lambda: directory.verifier_for("dispatch-1", history.kid, at=T0 + 1))


def test_restart_on_a_compacted_topic_refuses_the_republished_issuance(
    tmp_path: Path, root: FleetRoot, history: History
) -> None:
    """Compaction let the re-published issuance replace the revocation (same Kafka key)."""
    store = HeadStore(tmp_path / "head.cbor")
    store.save(history.heads[2])
    # What a consumer reading the compacted topic from the start sees.
    compacted = [history.vehicle, history.heads[2], history.dispatcher]
    directory = KeyDirectory(root.public, head_store=store)
    for item in compacted:
        directory.ingest_kafka(_value(item))
    _rollback(lambda: directory.verifier_for("dispatch-1", history.kid, at=T0 + 1))
    _rollback(lambda: directory.latest("dispatch-1"))
    # The other record set is untouched: vehicles still resolve.
    assert directory.recipient_keys("veh-7", at=T0 + 1).principal_id == "veh-7"
    # With head 3 remembered, the older head is refused outright.
    _rollback(lambda: directory.ingest_kafka(_value(history.heads[1])))
    assert directory.head == history.heads[2].head


def test_directory_file_without_the_revocation_is_refused(
    tmp_path: Path, root: FleetRoot, history: History
) -> None:
    path = tmp_path / "directory.cbor"
    # The current head, but the revocation dropped from the records.
    write_directory_file(path, history.heads[2], [history.dispatcher, history.vehicle])
    _rollback(lambda: load_directory(path, root.public))
    # An older (genuine) head whose records are consistent, after head 3 was seen.
    store = HeadStore(tmp_path / "head.cbor")
    store.save(history.heads[2])
    write_directory_file(path, history.heads[1], [history.dispatcher, history.vehicle])
    load_directory(path, root.public)  # nothing remembered: head 2 is all this loader knows
    _rollback(lambda: load_directory(path, root.public, head_store=store))
    # No head at all (the format before heads): a migration error, or rollback after a head.
    path.write_bytes(cbor2.dumps([history.dispatcher.to_cbor(), history.vehicle.to_cbor()]))
    with pytest.raises(FleetbusError) as exc:
        load_directory(path, root.public)
    assert _reason(exc) is ReasonCode.CONFIG
    assert "keys migrate" in str(exc.value)
    _rollback(lambda: load_directory(path, root.public, head_store=store))
    # An extra record the head does not cover (here: an issuance never published) is refused.
    stray = _issue(root, "veh-8").signed
    write_directory_file(path, history.heads[2], [history.revocation, history.vehicle, stray])
    _rollback(lambda: load_directory(path, root.public))


def test_restart_with_an_older_directory_file_is_refused(
    tmp_path: Path, root: FleetRoot, history: History
) -> None:
    from fleetbus.sdk.vehicle import load_key_directory

    (tmp_path / "root.pub").write_bytes(root.public.to_bytes())
    path = tmp_path / "directory.cbor"
    write_directory_file(path, history.heads[2], [history.revocation, history.vehicle])
    directory = load_key_directory(tmp_path)
    assert directory.head == history.heads[2].head
    # The file is swapped for the one from before the revocation; the process restarts.
    write_directory_file(path, history.heads[1], [history.dispatcher, history.vehicle])
    _rollback(lambda: load_key_directory(tmp_path))
    # The same head again is fine (an idempotent restart).
    write_directory_file(path, history.heads[2], [history.revocation, history.vehicle])
    assert load_key_directory(tmp_path).head == history.heads[2].head


def test_records_wait_for_their_head_but_revocations_do_not(
    root: FleetRoot, history: History
) -> None:
    directory = KeyDirectory(root.public)
    directory.ingest_kafka(_value(history.dispatcher))
    directory.ingest_kafka(_value(history.heads[0]))
    # Published before its head: held, not usable yet.
    directory.ingest_kafka(_value(history.vehicle))
    with pytest.raises(FleetbusError) as exc:
        directory.recipient_keys("veh-7", at=T0 + 1)
    assert _reason(exc) is ReasonCode.UNKNOWN_KEY_ID
    directory.ingest_kafka(_value(history.heads[1]))
    directory.recipient_keys("veh-7", at=T0 + 1)
    # A revocation is in force before the head that covers it.
    directory.ingest_kafka(_value(history.revocation))
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("dispatch-1", history.kid, at=T0 + 1)
    assert _reason(exc) is ReasonCode.SIGNER_REVOKED
    directory.ingest_kafka(_value(history.heads[2]))
    assert directory.unsettled_sets() == []


def test_a_head_before_its_records_fails_closed_until_they_arrive(
    root: FleetRoot, history: History
) -> None:
    directory = KeyDirectory(root.public)
    for item in (history.dispatcher, history.vehicle, history.heads[1]):
        directory.ingest_kafka(_value(item))
    directory.verifier_for("dispatch-1", history.kid, at=T0 + 1)
    # Head 3 says the non-vehicle set changed; its record (the revocation) is not here yet.
    directory.ingest_kafka(_value(history.heads[2]))
    _rollback(lambda: directory.verifier_for("dispatch-1", history.kid, at=T0 + 1))
    directory.recipient_keys("veh-7", at=T0 + 1)  # the vehicle set did not change
    directory.ingest_kafka(_value(history.revocation))
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("dispatch-1", history.kid, at=T0 + 1)
    assert _reason(exc) is ReasonCode.SIGNER_REVOKED
    assert directory.unsettled_sets() == []


def test_a_subset_holder_checks_only_the_sets_it_holds(root: FleetRoot, history: History) -> None:
    """What issue 12's per-partition holders do: the non-vehicle set alone settles."""
    directory = KeyDirectory(root.public)
    directory.ingest_kafka(_value(history.heads[1]))
    directory.ingest_kafka(_value(history.dispatcher))
    directory.verifier_for("dispatch-1", history.kid, at=T0 + 1)
    vehicle_set = record_set(history.vehicle.record, history.heads[1].head.vehicle_buckets)
    assert vehicle_set != 0
    assert directory.unsettled_sets() == [vehicle_set]


def test_two_heads_with_one_sequence_number_are_refused(root: FleetRoot, history: History) -> None:
    directory = KeyDirectory(root.public)
    directory.ingest_head(history.heads[1])
    fork, _ = sign_directory(root, [history.dispatcher], previous=history.heads[0].head, at=T0 + 9)
    assert fork.head.seq == history.heads[1].head.seq
    _rollback(lambda: directory.ingest_head(fork))
    # The same head again is idempotent, whatever its signature bytes.
    again = root.sign_head(history.heads[1].head)
    assert directory.ingest_head(again) == history.heads[1].head


def test_head_wire_format_is_strict(
    root: FleetRoot, other_root: FleetRoot, history: History
) -> None:
    signed = history.heads[1]
    key, value = head_to_kafka(signed)
    assert key == b"head"
    assert from_kafka(value) == signed
    assert SignedDirectoryHead.from_cbor(value).to_cbor() == value
    # Signed by another root, or a signature over another head.
    forged = other_root.sign_head(signed.head)
    with pytest.raises(FleetbusError) as exc:
        KeyDirectory(root.public).ingest_head(dataclasses.replace(forged, root_key_id=root.key_id))
    assert _reason(exc) is ReasonCode.BAD_SIGNATURE
    swapped = dataclasses.replace(signed, head=history.heads[2].head)
    with pytest.raises(FleetbusError) as exc:
        KeyDirectory(root.public).ingest_head(swapped)
    assert _reason(exc) is ReasonCode.BAD_SIGNATURE
    # Malformed heads.
    outer = cbor2.loads(value)
    inner = cbor2.loads(outer["head"])
    bad_inners = [
        {**inner, "seq": 0},
        {**inner, "seq": True},
        {**inner, "extra": 1},
        {**inner, "sets": inner["sets"][:-1]},
        {**inner, "sets": [[c, d[:31]] for c, d in inner["sets"]]},
        {**inner, "at": 1},
    ]
    for bad in bad_inners:
        blob = cbor2.dumps({**outer, "head": cbor2.dumps(bad, canonical=True)}, canonical=True)
        with pytest.raises(FleetbusError) as exc:
            from_kafka(blob)
        assert _reason(exc) is ReasonCode.MALFORMED, bad
    with pytest.raises(FleetbusError) as exc:
        from_kafka(cbor2.dumps({**outer, "fmt": 2}, canonical=True))
    assert _reason(exc) is ReasonCode.UNSUPPORTED_VERSION
    with pytest.raises(FleetbusError) as exc:
        from_kafka(cbor2.dumps(dict(reversed(outer.items()))))  # keys not in canonical order
    assert _reason(exc) is ReasonCode.MALFORMED
    # A record under the head's Kafka key, or a head under a record's key.
    directory = KeyDirectory(root.public)
    with pytest.raises(FleetbusError) as exc:
        directory.ingest_kafka(history.vehicle.to_cbor(), b"head")
    assert _reason(exc) is ReasonCode.MALFORMED
    with pytest.raises(FleetbusError) as exc:
        directory.ingest_kafka(value, to_kafka(history.vehicle)[0])
    assert _reason(exc) is ReasonCode.MALFORMED


def test_head_commits_to_every_record_field(root: FleetRoot, history: History) -> None:
    records = [history.dispatcher.record, history.vehicle.record]
    head = build_head(records, seq=1, at=T0, vehicle_buckets=4)
    assert head.record_count == 2
    assert len(head.sets) == 5
    assert head.sets[0][0] == 1  # the dispatcher; the vehicle is in one of the buckets
    changed = dataclasses.replace(history.dispatcher.record, groups=frozenset({"x"}))
    other = build_head([changed, history.vehicle.record], seq=1, at=T0, vehicle_buckets=4)
    assert other.sets[0] != head.sets[0]
    assert other.sets[1:] == head.sets[1:]
    with pytest.raises(FleetbusError):
        build_head([*records, history.dispatcher.record], seq=1, at=T0, vehicle_buckets=4)
    assert DirectoryHead.from_cbor(head.to_cbor()) == head


def test_head_store_is_verified_on_load(tmp_path: Path, root: FleetRoot, other_root: FleetRoot,
                                        history: History) -> None:  # fmt: skip
    store = HeadStore(tmp_path / "state" / "head.cbor")
    assert store.load(root.public) is None
    directory = KeyDirectory(root.public, head_store=store)
    directory.ingest_head(history.heads[2])
    assert store.load(root.public) == history.heads[2]
    # A later process starts from it.
    assert KeyDirectory(root.public, head_store=store).head == history.heads[2].head
    with pytest.raises(FleetbusError) as exc:
        KeyDirectory(other_root.public, head_store=store)
    assert _reason(exc) is ReasonCode.CONFIG
    # A process that got less far does not lower what another one stored.
    store.save(history.heads[1])
    assert store.load(root.public) == history.heads[2]
    store.path.write_bytes(b"\xa0")
    with pytest.raises(FleetbusError) as exc:
        KeyDirectory(root.public, head_store=store)
    assert _reason(exc) is ReasonCode.CONFIG
