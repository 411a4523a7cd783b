"""Key directory: root signatures, rotation overlap, revocation, expiry, Kafka and file formats."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from pathlib import Path

import cbor2
import pytest

from fleetbus.bus.directory import (
    FleetRoot,
    IssuedKey,
    KeyDirectory,
    KeyRecord,
    PrincipalKeyFile,
    RootPublicKey,
    append_directory_file,
    derive_key_id,
    from_kafka,
    issue_key,
    load_directory,
    load_key_file,
    read_directory_file,
    save_key_file,
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
    write_directory_file(path, [])
    assert read_directory_file(path) == []
    append_directory_file(path, v1.signed)
    revocation = root.sign(v1.signed.record.revocation(at=T0 + 1))
    append_directory_file(path, revocation)
    assert read_directory_file(path) == [v1.signed, revocation]
    directory = load_directory(path, root.public)
    record = directory.record(v1.signed.record.key_id)
    assert record is not None
    assert record.revoked


def test_directory_file_with_forged_record_fails_to_load(
    tmp_path: Path, root: FleetRoot, other_root: FleetRoot, v1: IssuedKey
) -> None:
    path = tmp_path / "directory.cbor"
    write_directory_file(
        path, [v1.signed, other_root.sign(_issue(other_root, "veh-9").signed.record)]
    )
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
