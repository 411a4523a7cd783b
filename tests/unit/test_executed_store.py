"""The vehicle's execute-once store and the agent's per-poll-batch claim / finish (no Kafka: a
scripted transport hands the agent records; commands skip the envelope through a codec, which
other tests cover)."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kafka
import pytest
from kafka.errors import CommitFailedError

from fleetbus.bus.commands import Command, Response, Target
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.providers.signers import Ed25519Suite
from fleetbus.sdk import vehicle as vehicle_module
from fleetbus.sdk.kafka_transport import KafkaTransport
from fleetbus.sdk.transport import MemoryTransport
from fleetbus.sdk.vehicle import ExecutedStore, HandlerResult, VehicleAgent, VehicleIdentity
from tests.support.envelope import make_vehicle

V1, V2 = "V-1", "V-2"


# --- the store ---------------------------------------------------------------------------


def test_begin_many_claims_each_command_once_in_one_transaction(tmp_path: Path) -> None:
    store = ExecutedStore(tmp_path / "executed.sqlite")
    assert store.begin_many([(V1, "a", 1e12), (V1, "b", 1e12), (V2, "a", 1e12)]) == {
        (V1, "a"),
        (V1, "b"),
        (V2, "a"),
    }
    assert store.begin_many([(V1, "a", 1e12), (V1, "c", 1e12)]) == {(V1, "c")}
    assert not store.begin(V1, "b", keep_until=1e12)
    store.finish_many([(V1, "a", b"ra"), (V2, "a", b"rb")])
    assert store.lookup(V1, "a") == ("finished", b"ra")
    assert store.lookup(V2, "a") == ("finished", b"rb")
    assert store.lookup(V1, "b") == ("started", None)
    assert store.lookup(V1, "zzz") is None
    store.close()
    # Durable: a new process sees the same states.
    reopened = ExecutedStore(tmp_path / "executed.sqlite")
    assert reopened.lookup(V1, "c") == ("started", None)
    assert reopened.lookup(V1, "a") == ("finished", b"ra")
    reopened.close()


def test_held_messages_are_durable_bounded_and_expire(tmp_path: Path) -> None:
    store = ExecutedStore(tmp_path / "agent.sqlite")
    epoch, other = b"E" * 8, b"F" * 8

    def hold(record: bytes, sequence: int, expires_at: float, now: float = 100.0) -> bool:
        return store.hold(V1, epoch, sequence, expires_at, record, "t", expired_before=now, limit=2)

    assert hold(b"second", 2, 200.0)
    assert hold(b"second", 2, 200.0)  # a redelivery: the same message, counted once
    # A forged copy of the clear header (same epoch and sequence) is a message of its own.
    assert hold(b"forged", 2, 150.0)
    assert not hold(b"third", 3, 200.0)  # full
    assert store.hold(V2, other, 1, 200.0, b"v2's", "t", expired_before=100.0, limit=2)
    store.close()
    store = ExecutedStore(tmp_path / "agent.sqlite")  # a restart keeps them
    kept = store.held(V1, epoch, expired_before=100.0)
    assert sorted(m.record for m in kept) == [b"forged", b"second"]
    assert store.held(V1, other, expired_before=100.0) == []
    # The forged one expires first and makes room; an expired one is never handed out.
    assert [m.record for m in store.held(V1, epoch, expired_before=160.0)] == [b"second"]
    assert hold(b"first", 1, 200.0, now=160.0)
    ready = store.held(V1, epoch, expired_before=160.0)
    assert [m.record for m in ready] == [b"first", b"second"]  # sequence order
    store.release(V1, [ready[0].digest])
    assert [m.record for m in store.held(V1, epoch, expired_before=160.0)] == [b"second"]
    assert store.prune(201.0, skew_s=0.5) == 2  # V-1's "second" and V-2's
    assert store.held(V1, epoch, expired_before=0.0) == []
    store.close()


def test_a_failing_claim_records_nothing(tmp_path: Path) -> None:
    store = ExecutedStore(tmp_path / "executed.sqlite")
    with pytest.raises(sqlite3.Error):
        # The third row cannot be stored: the whole claim rolls back.
        store.begin_many([(V1, "a", 1e12), (V1, "b", 1e12), (V1, object(), 1e12)])  # type: ignore[list-item]
    assert store.lookup(V1, "a") is None
    assert store.lookup(V1, "b") is None
    assert store.begin_many([(V1, "a", 1e12)]) == {(V1, "a")}  # usable afterwards
    store.close()


# --- the agent's batch -------------------------------------------------------------------


@dataclass
class _TP:
    topic: str
    partition: int

    def __hash__(self) -> int:
        return hash((self.topic, self.partition))


@dataclass
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class _Scripted(MemoryTransport):
    """A transport whose polls hand out the given batches, one per poll."""

    def __init__(self, batches: list[dict[_TP, list[_Record]]]) -> None:
        super().__init__()
        self.batches = batches

    def poll(self, timeout_s: float, max_records: int) -> Any:
        return self.batches.pop(0) if self.batches else {}


class _Consumer:
    """A kafka-python consumer stand-in (behind the real ``KafkaTransport``) that never has
    records."""

    def __init__(self, batches: list[dict[_TP, list[_Record]]]) -> None:
        self.batches = batches

    def poll(self, timeout_ms: int, max_records: int) -> dict[_TP, list[_Record]]:
        return self.batches.pop(0) if self.batches else {}


class _Agent(VehicleAgent):
    """The real loop and store; records carry a command id instead of an envelope, answers are
    recorded instead of sealed (``_Codec``)."""

    commands: dict[bytes, Command]
    answers: list[Response]
    events: list[str]


class _Codec:
    """The agent's codec seam: a record's value is the id of a command of ``agent.commands``;
    an answer is recorded in ``agent.answers``."""

    agent: _Agent

    def open_command(self, vehicle_id: str, value: bytes, topic: str) -> Command:
        command = self.agent.commands[value]
        self.agent.events.append(f"open {command.params['n']}")
        return command

    def encode_response(self, vehicle_id: str, response: Response) -> bytes:
        self.agent.events.append(f"answer {response.status}")
        self.agent.answers.append(response)
        return response.encode()


class _CountingStore(ExecutedStore):
    def __init__(self, path: Path, events: list[str]) -> None:
        super().__init__(path)
        self.events = events

    def begin_many(self, claims: Any) -> set[tuple[str, str]]:
        self.events.append(f"claim {len(claims)}")
        return super().begin_many(claims)

    def finish_many(self, results: Any) -> None:
        self.events.append(f"finish {len(results)}")
        super().finish_many(results)


def _identity(vid: str) -> VehicleIdentity:
    private, _public = Ed25519Suite().generate()
    return VehicleIdentity(vid, make_vehicle(vid).own, Ed25519Suite().signer(private, f"{vid}/sig"))


def _make_agent(
    tmp_path: Path,
    handler: Callable[[Command], HandlerResult | None],
    batches: list[Any],
    transport: Any = None,
) -> _Agent:
    settings = FleetbusSettings(kafka_bootstrap="127.0.0.1:1", app_id="unit")
    codec = _Codec()
    agent = _Agent(
        settings,
        vehicles=[_identity(V1), _identity(V2)],
        directory=None,  # type: ignore[arg-type]  # never consulted: _handle skips the envelope
        minimum_path="xwing",
        handlers={"ping": handler},
        store_path=tmp_path / "executed.sqlite",
        transport=transport if transport is not None else _Scripted(batches),
        codec=codec,
    )
    codec.agent = agent
    agent.events = []
    agent.store.close()
    agent.store = _CountingStore(tmp_path / "executed.sqlite", agent.events)
    agent.commands = {}
    agent.answers = []
    return agent


def _commands(n: int) -> list[Command]:
    return [
        Command.create(
            issuer="dispatcher-1",
            target=Target(vehicle=V1 if i % 2 == 0 else V2),
            action="ping",
            params={"n": i},
            ttl_s=600.0,
        )
        for i in range(n)
    ]


def _batch(commands: list[Command], first_offset: int = 0) -> dict[_TP, list[_Record]]:
    tp = _TP("outbound", 0)
    records = [
        _Record(
            "outbound",
            0,
            first_offset + i,
            (c.target.vehicle or "").encode(),
            c.id.encode(),
        )
        for i, c in enumerate(commands)
    ]
    return {tp: records}


def test_a_poll_batch_is_claimed_before_any_handler_and_finished_before_any_answer(
    tmp_path: Path,
) -> None:
    commands = _commands(4)
    calls: list[str] = []
    agent = _make_agent(tmp_path, lambda c: calls.append(c.id) and None, [_batch(commands)])
    agent.commands = {c.id.encode(): c for c in commands}
    # A handler appends to events through the calls list: record order of everything.
    original = agent.handlers["ping"]
    agent.handlers["ping"] = lambda c: (agent.events.append(f"run {c.params['n']}"), original(c))[1]

    assert agent.poll_once(0.01) == 4
    assert agent.events == [
        "open 0",
        "open 1",
        "open 2",
        "open 3",
        "claim 4",  # one durable write before any handler runs
        "run 0",
        "run 1",
        "run 2",
        "run 3",
        "finish 4",  # one durable write before any answer is produced
        "answer 200",
        "answer 200",
        "answer 200",
        "answer 200",
    ]
    assert calls == [c.id for c in commands]
    assert agent.stats.executed == 4
    assert agent.transport.commits == [{0: 4}]
    for c in commands:
        vid = c.target.vehicle or ""
        state, stored = agent.store.lookup(vid, c.id) or ("", None)
        assert state == "finished"
        assert stored is not None
        assert Response.decode(stored).status == 200


def test_redelivery_in_the_same_and_a_later_batch_is_answered_from_the_store(
    tmp_path: Path,
) -> None:
    commands = _commands(2)
    calls: list[str] = []
    # The first command twice in one poll batch, then both again in the next poll.
    first = _batch([commands[0], commands[1], commands[0]])
    again = _batch(commands, first_offset=3)
    agent = _make_agent(tmp_path, lambda c: calls.append(c.id) and None, [first, again])
    agent.commands = {c.id.encode(): c for c in commands}

    agent.poll_once(0.01)
    assert calls == [commands[0].id, commands[1].id]
    assert [a.command_id for a in agent.answers] == [commands[0].id, commands[1].id, commands[0].id]
    agent.poll_once(0.01)
    assert calls == [commands[0].id, commands[1].id]  # never executed twice
    assert len(agent.answers) == 5
    assert {(a.command_id, a.status, a.executed_at) for a in agent.answers} == {
        (a.command_id, a.status, a.executed_at) for a in agent.answers[:2]
    }
    assert agent.stats.duplicates == 3
    assert agent.transport.commits == [{0: 3}, {0: 5}]


class _EvictedConsumer(_Scripted):
    """A consumer the group has evicted: its first commit is refused, as kafka-python refuses
    it after a stall past the session timeout (it then rejoins on the next poll)."""

    refused = False

    def commit(self, offsets: dict[Any, Any]) -> None:
        if not self.refused:
            self.refused = True
            raise CommitFailedError("UnknownMemberIdError")
        super().commit(offsets)


def test_a_refused_commit_keeps_the_agent_serving_and_the_redelivery_is_answered_from_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    commands = _commands(2)
    calls: list[str] = []
    # After the refused commit the group hands the same records out again.
    evicted = _EvictedConsumer([_batch(commands), _batch(commands)])
    agent = _make_agent(tmp_path, lambda c: calls.append(c.id) and None, [], evicted)
    agent.commands = {c.id.encode(): c for c in commands}

    with caplog.at_level(logging.WARNING, logger="fleetbus.sdk.vehicle"):
        assert agent.poll_once(0.01) == 2
    assert any("offsets not committed (CommitFailedError)" in r.message for r in caplog.records)
    assert agent.stats.errors == 1
    assert agent.poll_once(0.01) == 2
    assert calls == [c.id for c in commands]  # executed once
    assert len(agent.answers) == 4  # answered again from the store
    assert agent.stats.duplicates == 2
    assert agent.transport.commits == [{0: 2}]


class _Crash(BaseException):
    """The process dying inside a handler (not an Exception: nothing catches it)."""


def test_a_crash_after_the_claim_never_runs_the_claimed_commands_again(tmp_path: Path) -> None:
    commands = _commands(3)
    calls: list[int] = []

    def crashing(command: Command) -> None:
        calls.append(int(command.params["n"]))  # type: ignore[arg-type]
        if command.params["n"] == 1:
            raise _Crash

    agent = _make_agent(tmp_path, crashing, [_batch(commands)])
    agent.commands = {c.id.encode(): c for c in commands}
    with pytest.raises(_Crash):
        agent.poll_once(0.01)
    assert calls == [0, 1]
    assert agent.transport.commits == []  # nothing committed: the batch comes again
    assert agent.answers == []
    agent.store.close()

    # A restarted agent on the same store gets the same records again.
    restarted = _make_agent(tmp_path, lambda c: calls.append(-1) and None, [_batch(commands)])
    restarted.commands = {c.id.encode(): c for c in commands}
    restarted.poll_once(0.01)
    assert calls == [0, 1]  # none of the claimed commands runs again, not even the third
    assert [(a.command_id, a.status) for a in restarted.answers] == [(c.id, 500) for c in commands]
    assert all("interrupted" in a.detail for a in restarted.answers)
    assert restarted.transport.commits == [{0: 3}]
    restarted.store.close()


def test_a_failing_store_claims_nothing_and_redelivers_the_batch(tmp_path: Path) -> None:
    commands = _commands(2)
    calls: list[str] = []
    agent = _make_agent(tmp_path, lambda c: calls.append(c.id) and None, [_batch(commands)])
    agent.commands = {c.id.encode(): c for c in commands}

    def broken(claims: Any) -> set[tuple[str, str]]:
        raise sqlite3.OperationalError("disk I/O error")

    agent.store.begin_many = broken  # type: ignore[method-assign]
    agent.poll_once(0.01)
    assert calls == []
    assert agent.answers == []
    assert agent.stats.errors == 1
    assert [(tp.partition, offset) for tp, offset in agent.transport.seeks] == [(0, 0)]
    assert agent.transport.commits == [{0: 0}]  # nothing of the batch counted as done


class _StuckConsumer(_Consumer):
    """kafka-python's consumer outside its group: poll loops and returns nothing, spending
    ``share`` of its time as CPU in the calling thread and waiting for the rest (kafka-python
    3 hands each step to its IO thread); ``share`` 0 is a healthy idle consumer."""

    def __init__(self, share: float) -> None:
        super().__init__([])
        self.share = share
        self.closed: list[bool] = []

    def poll(self, timeout_ms: int, max_records: int) -> dict[_TP, list[_Record]]:
        deadline = time.monotonic() + timeout_ms / 1000
        while (now := time.monotonic()) < deadline:
            busy_until = min(now + 0.01 * self.share, deadline)
            while time.monotonic() < busy_until:
                pass
            time.sleep(max(0.0, min(0.01 * (1 - self.share), deadline - time.monotonic())))
        return {}

    def close(self, autocommit: bool = True, timeout_ms: int | None = None) -> None:
        assert timeout_ms is not None  # a stuck client must not hold the agent
        self.closed.append(autocommit)


@pytest.mark.parametrize("share", [1.0, 0.4, 0.0])
def test_a_consumer_spinning_without_records_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: float
) -> None:
    """Polls that return nothing while burning CPU for SPIN_RESET_S get the consumer closed
    (without committing) and a new one made, also when the calling thread carries only part
    of the loop (0.4: kafka-python 3's share); an idle consumer, asleep in poll, is left
    alone."""
    monkeypatch.setattr(vehicle_module, "SPIN_RESET_S", 0.3)
    busy = share > 0
    transport = KafkaTransport(FleetbusSettings(), client_id="unit", topic="outbound")
    agent = _make_agent(tmp_path, lambda c: None, [], transport)
    stuck = _StuckConsumer(share)
    made: list[_Consumer] = []

    def new_consumer(*topics: str, **options: Any) -> _Consumer:
        made.append(_Consumer([]))
        return made[-1]

    transport.consumer, transport.producer = stuck, object()
    monkeypatch.setattr(kafka, "KafkaConsumer", new_consumer)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        agent.poll_once(0.06)
    if busy:
        assert stuck.closed == [False]
        assert agent.stats.consumer_resets == 1
        assert transport.consumer is made[0]
    else:
        assert stuck.closed == []
        assert agent.stats.consumer_resets == 0
        assert transport.consumer is stuck
    agent.store.close()
