"""The audit chain: every kind of break is found at the exact seq and offset; a chain must
carry the signed checkpoints its writer promises, signed by the bus sealer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest

from fleetbus.bus.directory import FleetRoot, KeyDirectory, issue_key, publish_directory_file
from fleetbus.bus.keys import Signer
from fleetbus.processors import eos
from fleetbus.processors.audit import (
    AuditChain,
    AuditEvent,
    ChainHead,
    VerifyReport,
    record_hash,
    verify_entries,
)

NOW = 1_800_000_000.0
Entries = list[tuple[int, bytes | None, bytes | None]]


@dataclass(frozen=True)
class Fleet:
    root: FleetRoot
    directory: KeyDirectory
    sealer: Signer
    other_sealer: Signer  # "mallory": a sealer key, but not the principal a verifier trusts
    dispatcher: Signer  # "dispatch-1": a valid directory key of the wrong role


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    root = FleetRoot.generate("ed25519")
    window = {"not_before": NOW - 86400, "not_after": NOW + 86400}
    issued = {
        name: issue_key(root, principal_id=name, kind=kind, signature_suite="ed25519", **window)
        for name, kind in (
            ("bus-sealer", "sealer"),
            ("mallory", "sealer"),
            ("dispatch-1", "dispatcher"),
        )
    }
    directory = KeyDirectory(root.public)
    directory.ingest_all([key.signed for key in issued.values()])
    signers = {name: key.key_file.signer() for name, key in issued.items()}
    return Fleet(root, directory, signers["bus-sealer"], signers["mallory"], signers["dispatch-1"])


@pytest.fixture(scope="module")
def keys(fleet: Fleet) -> tuple[KeyDirectory, Signer, Signer]:
    return fleet.directory, fleet.sealer, fleet.other_sealer


def verify(
    entries: Iterable[tuple[int, bytes | None, bytes | None]],
    directory: KeyDirectory,
    *,
    signer: str = "bus-sealer",
    max_every: int = 100,
    max_unsigned_tail: int | None = None,
) -> VerifyReport:
    return verify_entries(
        entries,
        directory,
        checkpoint_signer=signer,
        max_checkpoint_every=max_every,
        max_unsigned_tail=max_unsigned_tail,
    )


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


def _entries(values: list[bytes]) -> Entries:
    return [(offset, b"authorize-0", v) for offset, v in enumerate(values)]


def _records_only(values: list[bytes]) -> list[int]:
    return [i for i, v in enumerate(values) if cbor2.loads(v)["type"] == "record"]


def test_an_intact_chain_verifies_with_checkpoints(
    keys: tuple[KeyDirectory, Signer, Signer],
) -> None:
    directory, signer, _ = keys
    values = _chain(signer)
    report = verify(_entries(values), directory, max_every=4)
    assert report.ok, report.breaks
    assert report.records == {"authorize-0": 10}
    assert report.checkpoints == {"authorize-0": 2}
    assert report.unsigned_tail == {"authorize-0": 2}


def test_a_tampered_record_is_found_at_its_seq(keys: tuple[KeyDirectory, Signer, Signer]) -> None:
    directory, signer, _ = keys
    values = _chain(signer)
    index = _records_only(values)[3]
    doc = cbor2.loads(values[index])
    body = cbor2.loads(doc["record"])
    body["actor"] = "mallory"
    doc["record"] = cbor2.dumps(body, canonical=True)
    values[index] = cbor2.dumps(doc, canonical=True)
    report = verify(_entries(values), directory)
    assert [(b.seq, b.offset, b.kind) for b in report.breaks] == [(3, index, "tampered")]


def test_a_rehashed_forgery_breaks_the_next_link(keys: tuple[KeyDirectory, Signer, Signer]) -> None:
    directory, signer, _ = keys
    values = _chain(signer, n=3, every=100)
    doc = cbor2.loads(values[1])
    body = cbor2.loads(doc["record"])
    body["reason"] = "forged"
    doc["record"] = cbor2.dumps(body, canonical=True)
    doc["hash"] = record_hash(body["prev_hash"], doc["record"])
    values[1] = cbor2.dumps(doc, canonical=True)
    report = verify(_entries(values), directory)
    assert [(b.seq, b.offset, b.kind) for b in report.breaks] == [(2, 2, "tampered")]


def test_a_missing_record_is_reported_with_the_gap(
    keys: tuple[KeyDirectory, Signer, Signer],
) -> None:
    directory, signer, _ = keys
    values = _chain(signer, n=6, every=100)
    del values[2]
    report = verify(_entries(values), directory)
    assert [(b.seq, b.offset, b.kind) for b in report.breaks] == [(2, 2, "missing")]


def test_reordered_records_are_reported(keys: tuple[KeyDirectory, Signer, Signer]) -> None:
    directory, signer, _ = keys
    values = _chain(signer, n=6, every=100)
    values[2], values[3] = values[3], values[2]
    report = verify(_entries(values), directory)
    # seq 3 arrives where 2 is due: the first break is the gap it opens.
    assert report.breaks[0].offset == 2
    assert report.breaks[0].kind == "missing"
    values = _chain(signer, n=6, every=100)
    values.insert(4, values[1])  # a replayed old record
    report = verify(_entries(values), directory)
    assert [(b.seq, b.offset, b.kind) for b in report.breaks] == [(1, 4, "reordered")]


def test_a_bad_checkpoint_signature_is_reported(keys: tuple[KeyDirectory, Signer, Signer]) -> None:
    directory, signer, _ = keys
    values = _chain(signer)
    cp_index = next(i for i, v in enumerate(values) if cbor2.loads(v)["type"] == "checkpoint")
    doc = cbor2.loads(values[cp_index])
    doc["signature"] = bytes(b ^ 1 for b in doc["signature"])
    values[cp_index] = cbor2.dumps(doc, canonical=True)
    report = verify(_entries(values), directory)
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
    entries: Entries = [(i, b"c", v) for i, v in enumerate(values)]
    assert verify(entries, directory, signer="mallory").ok  # a sealer the verifier names ...
    report = verify(entries, directory)
    assert report.breaks[0].kind == "bad_checkpoint"  # ... but not the one it trusts
    assert "expected 'bus-sealer'" in report.breaks[0].detail


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
    report = verify(entries, directory)
    assert [(b.chain, b.offset, b.kind) for b in report.breaks] == [("seal-1", 2, "malformed")]
    assert report.records["authorize-0"] == 2


def test_a_restored_head_continues_the_chain(keys: tuple[KeyDirectory, Signer, Signer]) -> None:
    directory, _signer, _ = keys
    first = AuditChain("t-0", clock=lambda: NOW)
    values = first.append(AuditEvent("a", "e1")) + first.append(AuditEvent("a", "e2"))
    head = ChainHead.from_cbor(first.head.to_cbor())
    second = AuditChain("t-0", head=head, clock=lambda: NOW)
    values += second.append(AuditEvent("a", "e3"))
    assert verify([(i, b"t-0", v) for i, v in enumerate(values)], directory).ok


# --- checkpoints are required (issue 11, finding 4) -----------------------------------------


def _rewrite_from_genesis(values: list[bytes], edit_seq: int) -> list[bytes]:
    """What an attacker with write access to the topic can do: change one record, recompute
    every SHA-256 link from genesis, and drop the checkpoints (they can't be re-signed)."""
    out: list[bytes] = []
    prev = b"\x00" * 32
    for value in values:
        doc = cbor2.loads(value)
        if doc["type"] != "record":
            continue
        body = cbor2.loads(doc["record"])
        if body["seq"] == edit_seq:
            body["actor"] = "mallory"
        body["prev_hash"] = prev
        doc["record"] = cbor2.dumps(body, canonical=True)
        doc["hash"] = prev = record_hash(prev, doc["record"])
        out.append(cbor2.dumps(doc, canonical=True))
    return out


def test_a_rewritten_chain_stripped_of_its_checkpoints_fails(fleet: Fleet) -> None:
    values = _rewrite_from_genesis(_chain(fleet.sealer, n=10, every=4), edit_seq=2)
    # Every link is consistent: only the missing signatures can give the rewrite away.
    report = verify(_entries(values), fleet.directory, max_every=4)
    assert [(b.seq, b.offset, b.kind) for b in report.breaks] == [(4, 4, "unsigned")]
    assert "more than 4 records since genesis" in report.breaks[0].detail


def test_the_signed_cadence_binds_beyond_the_verifier_maximum(fleet: Fleet) -> None:
    values = _chain(fleet.sealer, n=10, every=4)  # checkpoints after seq 3 and 7
    last_cp = max(i for i, v in enumerate(values) if cbor2.loads(v)["type"] == "checkpoint")
    del values[last_cp]
    # The verifier alone would accept 100 unsigned records; the checkpoint at seq 3 promised
    # the next within 4, so seq 8 without one is a stripped checkpoint.
    report = verify(_entries(values), fleet.directory, max_every=100)
    assert [(b.seq, b.kind) for b in report.breaks] == [(8, "unsigned")]
    assert "since the checkpoint at seq 3" in report.breaks[0].detail


def test_the_cadence_is_signed_and_bounded_by_the_verifier(fleet: Fleet) -> None:
    values = _chain(fleet.sealer, n=4, every=4)
    doc = cbor2.loads(values[-1])
    assert doc["type"] == "checkpoint"
    doc["every"] = 1000  # promise fewer checkpoints than the writer signed
    forged = [*values[:-1], cbor2.dumps(doc, canonical=True)]
    report = verify(_entries(forged), fleet.directory, max_every=2000)
    assert [(b.seq, b.kind) for b in report.breaks] == [(3, "bad_checkpoint")]
    assert "signature" in report.breaks[0].detail
    # A writer promising a sparser cadence than the verifier accepts is refused.
    sparse = AuditChain("authorize-0", signer=fleet.sealer, signer_principal="bus-sealer",
                        checkpoint_every=5, clock=lambda: NOW)  # fmt: skip
    values = sparse.append(AuditEvent("a", "e")) + sparse.seal()
    report = verify(_entries(values), fleet.directory, max_every=4)
    assert [(b.seq, b.kind) for b in report.breaks] == [(0, "bad_checkpoint")]
    assert "at most 4 accepted" in report.breaks[0].detail
    # A format 1 checkpoint (no cadence under its signature) is not accepted at all.
    doc = cbor2.loads(values[-1])
    doc["v"] = 1
    del doc["every"]
    report = verify(_entries([values[0], cbor2.dumps(doc, canonical=True)]), fleet.directory)
    assert [(b.offset, b.kind) for b in report.breaks] == [(1, "malformed")]


def test_the_unsigned_tail_is_reported_and_can_be_required_empty(fleet: Fleet) -> None:
    values = _chain(fleet.sealer, n=10, every=4)
    report = verify(_entries(values), fleet.directory)
    assert report.ok
    assert report.unsigned_tail == {"authorize-0": 2}
    report = verify(_entries(values), fleet.directory, max_unsigned_tail=0)
    first_unsigned = _records_only(values)[8]
    assert [(b.seq, b.offset, b.kind) for b in report.breaks] == [(8, first_unsigned, "unsigned")]
    assert "last 2 records" in report.breaks[0].detail
    # A short chain stripped of everything is within every cadence: reported, all of it.
    short = _rewrite_from_genesis(_chain(fleet.sealer, n=3, every=4), edit_seq=1)
    report = verify(_entries(short), fleet.directory)
    assert report.ok
    assert report.unsigned_tail == {"authorize-0": 3}
    assert not verify(_entries(short), fleet.directory, max_unsigned_tail=0).ok


def test_a_checkpoint_by_a_dispatcher_is_refused_even_when_named(fleet: Fleet) -> None:
    chain = AuditChain(
        "authorize-0",
        signer=fleet.dispatcher,
        signer_principal="dispatch-1",
        checkpoint_every=2,
        clock=lambda: NOW,
    )
    values = [v for i in range(2) for v in chain.append(AuditEvent("a", "e", f"c{i}"))]
    report = verify(_entries(values), fleet.directory)
    assert [(b.seq, b.kind) for b in report.breaks] == [(1, "bad_checkpoint")]
    # A valid signature of a directory key, by the principal the verifier was told to trust:
    # still refused, a dispatcher's key does not hold the sealer role.
    report = verify(_entries(values), fleet.directory, signer="dispatch-1")
    assert [(b.seq, b.kind) for b in report.breaks] == [(1, "bad_checkpoint")]
    assert "is a dispatcher, not the bus sealer" in report.breaks[0].detail


def test_a_resumed_run_signs_the_previous_runs_tail_first(fleet: Fleet) -> None:
    def writer(head: ChainHead | None, every: int) -> AuditChain:
        return AuditChain("authorize-0", head=head, signer=fleet.sealer,
                          signer_principal="bus-sealer", checkpoint_every=every,
                          clock=lambda: NOW)  # fmt: skip

    first = writer(None, 4)
    values = [v for i in range(6) for v in first.append(AuditEvent("a", "e", f"c{i}"))]
    assert first.head.unsigned == 2  # the run ends (a crash) before it can sign these
    second = writer(ChainHead.from_cbor(first.head.to_cbor()), 50)
    resumed = second.append(AuditEvent("a", "e", "c6"))
    assert [cbor2.loads(v)["type"] for v in resumed] == ["checkpoint", "record"]
    values += resumed + second.seal()
    assert second.seal() == []  # nothing left to sign
    report = verify(_entries(values), fleet.directory, max_every=50, max_unsigned_tail=0)
    assert report.ok, report.breaks
    assert report.checkpoints == {"authorize-0": 3}
    # A head saved before checkpoints were tracked reads as unsigned from genesis.
    old = ChainHead.from_cbor(cbor2.dumps([6, first.head.last_hash]))
    assert (old.next_seq, old.unsigned) == (6, 6)


class _Producer:
    """An in-memory transactional producer: what a committed transaction sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None]] = []

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    async def send(self, topic: str, *, value: bytes | None, **_: Any) -> None:
        self.sent.append((topic, value))

    async def stop(self) -> None:
        pass


class _Idle:
    name = "authorize"

    def input_topics(self) -> list[str]:
        return ["in"]

    def tick(self, partition: int, state: eos.PartitionState, now: float) -> eos.StageResult:
        return eos.StageResult()


def test_the_stage_signs_the_tail_on_each_tick_and_at_the_end_of_its_run(fleet: Fleet) -> None:
    stage = eos.TransactionalStage(
        _Idle(),  # type: ignore[arg-type]
        bootstrap="127.0.0.1:1",
        app_id="t",
        state_topic="state",
        audit_topic="audit",
        dlq_topic="dlq",
        audit_signer=fleet.sealer,
        audit_signer_principal="bus-sealer",
        checkpoint_every=100,
        clock=lambda: NOW,
    )
    producer = _Producer()
    chain = AuditChain("authorize-0", signer=fleet.sealer, signer_principal="bus-sealer",
                       checkpoint_every=100, clock=lambda: NOW)  # fmt: skip
    part = eos._Partition(0, producer, eos.PartitionState(), chain)  # type: ignore[arg-type]
    stage._parts[0] = part
    assert len(stage._audit_outputs(part, [AuditEvent("a", "e")])) == 1
    assert chain.head.unsigned == 1

    asyncio.run(stage._tick(0))
    asyncio.run(stage._tick(0))  # nothing new: no second checkpoint
    sent = [value for topic, value in producer.sent if topic == "audit"]
    assert [cbor2.loads(v)["type"] for v in sent if v] == ["checkpoint"]
    assert ChainHead.from_cbor(part.state.get(eos.AUDIT_HEAD_KEY) or b"").unsigned == 0

    stage._audit_outputs(part, [AuditEvent("a", "e2")])
    asyncio.run(stage._shutdown())
    sent = [value for topic, value in producer.sent if topic == "audit"]
    assert [cbor2.loads(v)["type"] for v in sent if v] == ["checkpoint", "checkpoint"]
    assert [topic for topic, _ in producer.sent].count("state") == 2  # the head, each time


def test_the_cli_fails_a_stripped_chain_and_reports_the_unsigned_tail(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fleetbus.bus.directory import DIRECTORY, ROOT_PUB
    from fleetbus.cli import audit as cli_audit
    from fleetbus.cli.main import app

    (tmp_path / ROOT_PUB).write_bytes(fleet.directory.root.to_bytes())
    publish_directory_file(tmp_path / DIRECTORY, fleet.root, fleet.directory.signed_records())
    monkeypatch.setenv("FLEETBUS_AUDIT_CHECKPOINT_EVERY", "4")
    topic: list[Entries] = []
    monkeypatch.setattr(cli_audit, "read_audit_topic", lambda *_a, **_k: topic[-1])
    args = ["audit", "verify", "--bootstrap", "x:1", "--topic", "t", "--keys-dir", str(tmp_path)]

    values = _chain(fleet.sealer, n=10, every=4)
    topic.append(_entries(values))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "10 records, 2 signed checkpoints, 2 at the tail not covered by a signature" in (
        result.output
    )
    result = CliRunner().invoke(app, [*args, "--max-unsigned-tail", "0"])
    assert result.exit_code == 1, result.output

    topic.append(_entries(_rewrite_from_genesis(values, edit_seq=2)))
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 1, result.output
    assert '"kind": "unsigned"' in result.output
