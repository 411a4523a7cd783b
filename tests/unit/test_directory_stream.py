"""``directory.cbor`` read as a stream: the same refusals as a whole-document parse, other
buckets' records never parsed, records held by their position in the file answering as parsed
ones do (and refused if the file changes in place under them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cbor2
import pytest

from fleetbus.bus.directory import (
    DirectoryScope,
    FleetRoot,
    IssuedKey,
    KeyDirectory,
    SignedKeyRecord,
    issue_key,
    load_directory,
    next_head,
    read_directory_file,
    record_set,
    sign_directory,
    write_directory_file,
)
from fleetbus.bus.directory import keydirectory as keydirectory_module
from fleetbus.bus.errors import FleetbusError, ReasonCode

T0 = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture(scope="module")
def root() -> FleetRoot:
    return FleetRoot.generate()


def _issue(root: FleetRoot, principal: str, kind: str = "vehicle") -> IssuedKey:
    return issue_key(
        root,
        principal_id=principal,
        kind=kind,
        kems=["x25519"] if kind == "vehicle" else [],
        signature_suite="ed25519",
        not_before=T0,
        not_after=T0 + 30 * DAY,
    )


@pytest.fixture(scope="module")
def fleet(root: FleetRoot) -> dict[str, Any]:
    """A dispatcher and 24 vehicles (over the 16 buckets) under one head."""
    issued = [_issue(root, "dispatch-1", "dispatcher")]
    issued += [_issue(root, f"V-{n:04d}") for n in range(24)]
    head, merged = sign_directory(root, [i.signed for i in issued], at=T0)
    return {"head": head, "records": merged, "issued": issued}


@pytest.fixture
def valid(tmp_path: Path, fleet: dict[str, Any]) -> bytes:
    path = tmp_path / "directory.cbor"
    write_directory_file(path, fleet["head"], fleet["records"])
    data = path.read_bytes()
    # The streaming writer writes what a whole-document canonical encoder would.
    doc = {
        "fmt": "fleetbus-directory/v2",
        "head": fleet["head"].to_cbor(),
        "records": [s.to_cbor() for s in fleet["records"]],
    }
    assert data == cbor2.dumps(doc, canonical=True)
    return data


def _refused(path: Path, data: bytes, root: FleetRoot) -> set[ReasonCode]:
    """The reason codes of reading and of loading ``data`` as a directory file."""
    path.write_bytes(data)
    reasons = set()
    for read in (lambda: read_directory_file(path), lambda: load_directory(path, root.public)):
        with pytest.raises(FleetbusError) as exc:
            read()
        reasons.add(exc.value.reason)
    return reasons


def test_a_streamed_file_refuses_what_a_whole_parse_refused(
    tmp_path: Path, root: FleetRoot, valid: bytes
) -> None:
    path = tmp_path / "bad.cbor"
    doc = cbor2.loads(valid)
    malformed = {
        "empty": b"",
        "truncated in the head": valid[:40],
        "truncated in a record": valid[: len(valid) // 2],
        "truncated by a byte": valid[:-1],
        "trailing bytes": valid + b"\x00",
        "not a map or array": cbor2.dumps(7),
        "head as text": cbor2.dumps({**doc, "head": "x"}, canonical=True),
        "records as a map": cbor2.dumps({**doc, "records": {"a": b""}}, canonical=True),
        "a record as text": cbor2.dumps({**doc, "records": ["x"]}, canonical=True),
        "an extra field": cbor2.dumps({**doc, "more": 1}, canonical=True),
        "a missing field": cbor2.dumps({"fmt": doc["fmt"], "head": doc["head"]}, canonical=True),
        "keys out of canonical order": cbor2.dumps(
            {"fmt": doc["fmt"], "records": doc["records"], "head": doc["head"]}
        ),
        "indefinite-length records": valid.replace(
            cbor2.dumps("records") + bytes([0x98, len(doc["records"])]),
            cbor2.dumps("records") + b"\x9f",
        )
        + b"\xff",
        "array length in a longer form than needed": valid.replace(
            cbor2.dumps("records") + bytes([0x98, len(doc["records"])]),
            cbor2.dumps("records") + bytes([0x99, 0, len(doc["records"])]),
        ),
        "a record that is not one": cbor2.dumps({**doc, "records": [b"\x01"]}, canonical=True),
        "a record of an extra field": cbor2.dumps(
            {**doc, "records": [cbor2.dumps({**cbor2.loads(doc["records"][0]), "x": 1})]},
            canonical=True,
        ),
    }
    for name, data in malformed.items():
        assert data != valid, name
        assert _refused(path, data, root) == {ReasonCode.MALFORMED}, name
    for fmt in (2, "fleetbus-directory/v9"):
        data = cbor2.dumps({**doc, "fmt": fmt}, canonical=True)
        assert _refused(path, data, root) == {ReasonCode.UNSUPPORTED_VERSION}, fmt


def test_a_scoped_load_never_parses_other_buckets_records(
    tmp_path: Path, root: FleetRoot, fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "directory.cbor"
    write_directory_file(path, fleet["head"], fleet["records"])
    bucket = record_set(fleet["issued"][3].signed.record, 16) - 1
    scope = DirectoryScope(frozenset({bucket}))
    read: list[str] = []
    real_fields = keydirectory_module.signed_record_fields

    def fields(data: bytes) -> tuple[str, str, str, bytes]:
        named = real_fields(data)
        read.append(named[0])
        return named

    parsed: list[str] = []
    real_parse = SignedKeyRecord.from_cbor.__func__  # type: ignore[attr-defined]

    def parse(cls: type[SignedKeyRecord], data: bytes) -> SignedKeyRecord:
        signed: SignedKeyRecord = real_parse(cls, data)
        parsed.append(signed.record.principal_id)
        return signed

    monkeypatch.setattr(keydirectory_module, "signed_record_fields", fields)
    monkeypatch.setattr(SignedKeyRecord, "from_cbor", classmethod(parse))
    directory = load_directory(path, root.public, scope=scope)
    in_scope = {
        s.record.principal_id
        for s in fleet["records"]
        if record_set(s.record, 16) in (0, 1 + bucket)
    }
    assert len(in_scope) < len(fleet["records"])
    assert sorted(read) == sorted(in_scope)  # each once; nothing of other buckets
    assert parsed == ["dispatch-1"]  # set 0 parsed; the bucket held by position until used
    assert {s.record.principal_id for s in directory.signed_records()} == in_scope
    assert set(parsed) == in_scope


def _answers(directory: KeyDirectory, fleet: dict[str, Any]) -> list[Any]:
    out: list[Any] = [[s.to_cbor() for s in directory.signed_records()], directory.records()]
    for issued in fleet["issued"]:
        record = issued.signed.record
        principal = record.principal_id
        out.append(directory.records(principal))
        out.append(directory.latest(principal))
        for at in (T0 - 1, T0 + DAY):
            try:
                out.append(directory.current(principal, at=at))
                if record.kind == "vehicle":
                    out.append(directory.recipient_keys(principal, at=at))
            except FleetbusError as exc:
                out.append(exc.reason)
            try:
                directory.verifier_for(principal, record.key_id, at=at)
                out.append("verifier")
            except FleetbusError as exc:
                out.append(exc.reason)
    return out


def test_records_held_by_position_answer_as_parsed_ones_after_a_revocation(
    tmp_path: Path, root: FleetRoot, fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keydirectory_module, "PARSED_RECORDS_CACHED", 3)  # evictions
    path = tmp_path / "directory.cbor"
    write_directory_file(path, fleet["head"], fleet["records"])
    lazy = load_directory(path, root.public)  # held by position in the file, unparsed
    eager = KeyDirectory(root.public, require_head=True)
    eager.ingest_committed(fleet["records"], fleet["head"])  # parsed records
    eager.ingest_head(fleet["head"])
    checked = load_directory(path, root.public, verify_each=True)
    assert _answers(lazy, fleet) == _answers(eager, fleet) == _answers(checked, fleet)
    # Revoke a vehicle and the dispatcher under the next head.
    revocations = [
        root.sign(fleet["issued"][i].signed.record.revocation(at=T0 + DAY / 2)) for i in (0, 5)
    ]
    holder = KeyDirectory(root.public)
    holder.ingest_all([*fleet["records"], *revocations])
    head = next_head(root, holder, previous=fleet["head"].head, at=T0 + DAY)
    for directory in (lazy, eager, checked):
        for revocation in revocations:
            directory.ingest(revocation)
        directory.ingest_head(head)
        assert directory.unsettled_sets() == []
    assert _answers(lazy, fleet) == _answers(eager, fleet) == _answers(checked, fleet)
    for issued in (fleet["issued"][0], fleet["issued"][5]):
        record = issued.signed.record
        with pytest.raises(FleetbusError) as exc:
            lazy.verifier_for(record.principal_id, record.key_id, at=T0 + DAY)
        assert exc.value.reason is ReasonCode.SIGNER_REVOKED
    # A file of the new head loads as lazily, with the revocations in force.
    write_directory_file(path, head, holder.signed_records())
    again = load_directory(path, root.public)
    assert _answers(again, fleet) == _answers(eager, fleet)


def test_records_held_by_position_follow_the_file_they_were_read_from(
    tmp_path: Path, root: FleetRoot, fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keydirectory_module, "PARSED_RECORDS_CACHED", 1)
    path = tmp_path / "directory.cbor"
    write_directory_file(path, fleet["head"], fleet["records"])
    vehicle = fleet["issued"][7].signed.record
    directory = load_directory(path, root.public)
    expected = directory.recipient_keys(vehicle.principal_id, at=T0 + 1)
    # Replaced the way every writer replaces it (a new file renamed over it): the open file
    # still holds what was loaded.
    write_directory_file(path, fleet["head"], fleet["records"][:1])
    directory.recipient_keys(fleet["issued"][3].signed.record.principal_id, at=T0 + 1)
    assert directory.recipient_keys(vehicle.principal_id, at=T0 + 1) == expected
    # Changed in place under the process: a record that no longer matches its digest.
    write_directory_file(path, fleet["head"], fleet["records"])
    directory = load_directory(path, root.public)
    data = bytearray(path.read_bytes())
    at = data.find(vehicle.public_keys["x25519"])
    data[at] ^= 1
    with path.open("r+b") as fh:
        fh.write(data)
    with pytest.raises(FleetbusError) as exc:
        directory.recipient_keys(vehicle.principal_id, at=T0 + 1)
    assert exc.value.reason is ReasonCode.DIRECTORY_ROLLBACK


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts open descriptors in /proc")
def test_only_a_directory_holding_vehicle_buckets_keeps_the_file_open(
    tmp_path: Path, root: FleetRoot, fleet: dict[str, Any]
) -> None:
    from fleetbus.bus.directory import vehicle_agent_scope

    path = tmp_path / "directory.cbor"
    write_directory_file(path, fleet["head"], fleet["records"])

    def open_files() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    before = open_files()
    agent = load_directory(path, root.public, scope=vehicle_agent_scope(["V-0003"]))
    assert open_files() == before  # set 0 and its own vehicle held parsed
    worker = load_directory(path, root.public)
    assert open_files() == before + 1
    del worker
    assert open_files() == before
    assert agent.latest("V-0003").principal_id == "V-0003"
