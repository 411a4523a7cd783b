"""The audit chain: every kind of break is found at the exact seq and offset."""

from __future__ import annotations

import cbor2
import pytest

from fleetbus.bus.directory import FleetRoot, KeyDirectory, issue_key
from fleetbus.bus.keys import Signer
from fleetbus.processors.audit import (
    AuditChain,
    AuditEvent,
    ChainHead,
    decode_entry,
    verify_entries,
)

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def keys() -> tuple[KeyDirectory, Signer, Signer]:
    root = FleetRoot.generate("ed25519")
    window = {"not_before": NOW - 86400, "not_after": NOW + 86400}
    sealer = issue_key(
        root, principal_id="bus-sealer", kind="sealer", signature_suite="ed25519", **window
    )
    other = issue_key(
        root, principal_id="mallory", kind="sealer", signature_suite="ed25519", **window
    )
    directory = KeyDirectory(root.public)
    directory.ingest_all([sealer.signed, other.signed])
    return directory, sealer.key_file.signer(), other.key_file.signer()


def _chain(signer: Signer, n: int = 10, every: int = 4) -> list[bytes]:
    chain = AuditChain(
        "authorize-0",
        signer=signer,
        signer_principal="bus-sealer",
        checkpoint_every=every,
        clock=lambda: NOW,
    )
    values: list[bytes] = []
    for i in range(n):
        values += chain.append(AuditEvent("dispatch-1", "authorized", f"cmd-{i}", None, {"i": i}))
    return values


def _entries(values: list[bytes]) -> list[tuple[int, bytes | None, bytes | None]]:
    return [(offset, b"authorize-0", v) for offset, v in enumerate(values)]


def _records_only(values: list[bytes]) -> list[int]:
    return [i for i, v in enumerate(values) if cbor2.loads(v)["type"] == "record"]


def test_an_intact_chain_verifies_with_checkpoints(
    keys: tuple[KeyDirectory, Signer, Signer],
) -> None:
    directory, signer, _ = keys
    values = _chain(signer)
    report = verify_entries(_entries(values), directory, require_checkpoint_signer="bus-sealer")
    assert report.ok, report.breaks
    assert report.records == {"authorize-0": 10}
    assert report.checkpoints == {"authorize-0": 2}


def test_a_tampered_record_is_found_at_its_seq(keys: tuple[KeyDirectory, Signer, Signer]) -> None:
    directory, signer, _ = keys
    values = _chain(signer)
    index = _records_only(values)[3]
    doc = cbor2.loads(values[index])
    body = cbor2.loads(doc["record"])
    body["actor"] = "mallory"
    doc["record"] = cbor2.dumps(body, canonical=True)
    values[index] = cbor2.dumps(doc, canonical=True)
    report = verify_entries(_entries(values), directory)
    assert [(b.seq, b.offset, b.kind) for b in report.breaks] == [(3, index, "tampered")]


def test_a_rehashed_forgery_breaks_the_next_link(keys: tuple[KeyDirectory, Signer, Signer]) -> None:
    directory, signer, _ = keys
    values = _chain(signer, n=3, every=100)
    doc = cbor2.loads(values[1])
    body = cbor2.loads(doc["record"])
    body["reason"] = "forged"
    entry = decode_entry(values[1])
    assert not isinstance(entry, type(None))
    from fleetbus.processors.audit import record_hash

    doc["record"] = cbor2.dumps(body, canonical=True)
    doc["hash"] = record_hash(body["prev_hash"], doc["record"])
    values[1] = cbor2.dumps(doc, canonical=True)
    report = verify_entries(_entries(values), directory)
    assert [(b.seq, b.offset, b.kind) for b in report.breaks] == [(2, 2, "tampered")]


def test_a_missing_record_is_reported_with_the_gap(
    keys: tuple[KeyDirectory, Signer, Signer],
) -> None:
    directory, signer, _ = keys
    values = _chain(signer, n=6, every=100)
    del values[2]
    report = verify_entries(_entries(values), directory)
    assert [(b.seq, b.offset, b.kind) for b in report.breaks] == [(2, 2, "missing")]


def test_reordered_records_are_reported(keys: tuple[KeyDirectory, Signer, Signer]) -> None:
    directory, signer, _ = keys
    values = _chain(signer, n=6, every=100)
    values[2], values[3] = values[3], values[2]
    report = verify_entries(_entries(values), directory)
    # seq 3 arrives where 2 is due: the first break is the gap it opens.
    assert report.breaks[0].offset == 2
    assert report.breaks[0].kind == "missing"
    values = _chain(signer, n=6, every=100)
    values.insert(4, values[1])  # a replayed old record
    report = verify_entries(_entries(values), directory)
    assert [(b.seq, b.offset, b.kind) for b in report.breaks] == [(1, 4, "reordered")]


def test_a_bad_checkpoint_signature_is_reported(keys: tuple[KeyDirectory, Signer, Signer]) -> None:
    directory, signer, _ = keys
    values = _chain(signer)
    cp_index = next(i for i, v in enumerate(values) if cbor2.loads(v)["type"] == "checkpoint")
    doc = cbor2.loads(values[cp_index])
    doc["signature"] = bytes(b ^ 1 for b in doc["signature"])
    values[cp_index] = cbor2.dumps(doc, canonical=True)
    report = verify_entries(_entries(values), directory)
    assert [(b.seq, b.offset, b.kind) for b in report.breaks] == [(3, cp_index, "bad_checkpoint")]
    assert "signature" in report.breaks[0].detail


def test_a_checkpoint_by_another_principal_is_refused(
    keys: tuple[KeyDirectory, Signer, Signer],
) -> None:
    directory, _, other = keys
    chain = AuditChain(
        "c", signer=other, signer_principal="mallory", checkpoint_every=1, clock=lambda: NOW
    )
    values = chain.append(AuditEvent("x", "y"))
    entries = [(i, b"c", v) for i, v in enumerate(values)]
    assert verify_entries(entries, directory).ok  # valid signature of a directory key ...
    report = verify_entries(entries, directory, require_checkpoint_signer="bus-sealer")
    assert report.breaks[0].kind == "bad_checkpoint"  # ... but not the bus sealer's


def test_garbage_is_malformed_and_chains_are_independent(
    keys: tuple[KeyDirectory, Signer, Signer],
) -> None:
    directory, signer, _ = keys
    a = _chain(signer, n=3, every=100)
    b_chain = AuditChain("seal-1", clock=lambda: NOW)
    b = [v for i in range(3) for v in b_chain.append(AuditEvent("bus", "sealed", f"c{i}"))]
    entries = [
        (0, b"authorize-0", a[0]),
        (1, b"seal-1", b[0]),
        (2, b"seal-1", b"\xff\xfe"),
        (3, b"authorize-0", a[1]),
        (4, b"seal-1", b[1]),
    ]
    report = verify_entries(entries, directory)
    assert [(b.chain, b.offset, b.kind) for b in report.breaks] == [("seal-1", 2, "malformed")]
    assert report.records["authorize-0"] == 2


def test_a_restored_head_continues_the_chain(keys: tuple[KeyDirectory, Signer, Signer]) -> None:
    directory, _signer, _ = keys
    first = AuditChain("t-0", clock=lambda: NOW)
    values = first.append(AuditEvent("a", "e1")) + first.append(AuditEvent("a", "e2"))
    head = ChainHead.from_cbor(first.head.to_cbor())
    second = AuditChain("t-0", head=head, clock=lambda: NOW)
    values += second.append(AuditEvent("a", "e3"))
    assert verify_entries([(i, b"t-0", v) for i, v in enumerate(values)], directory).ok
