"""The SDK clients over their public seams: the in-memory transport shipped in the SDK, the
plaintext codec (the benchmark's baseline) and handlers told which vehicle they run for."""

from __future__ import annotations

from pathlib import Path

from fleetbus.bus.commands import Command, Response, SignedApproval, SignedCommand, Target
from fleetbus.providers.signers import Ed25519Suite
from fleetbus.sdk import (
    CommandPublisher,
    FleetbusSettings,
    HandlerResult,
    KafkaTransport,
    MemoryTransport,
    PlaintextCodec,
    Transport,
    VehicleAgent,
    VehicleHandler,
    VehicleIdentity,
)
from tests.support.envelope import make_vehicle

V1, V2 = "V-1", "V-2"
SETTINGS = FleetbusSettings(kafka_bootstrap="127.0.0.1:1", app_id="unit")
OUTBOUND = SETTINGS.topics.full(SETTINGS.topics.commands_outbound)
RESPONSES = SETTINGS.topics.full(SETTINGS.topics.commands_responses)


def _identity(vid: str) -> VehicleIdentity:
    private, _public = Ed25519Suite().generate()
    return VehicleIdentity(vid, make_vehicle(vid).own, Ed25519Suite().signer(private, f"{vid}/sig"))


def _signed(vid: str, action: str = "ping") -> SignedCommand:
    private, _public = Ed25519Suite().generate()
    command = Command.create(issuer="dispatch-1", target=Target(vehicle=vid), action=action)
    return SignedCommand.sign(command, Ed25519Suite().signer(private, "dispatch-1/sig"))


def test_both_transports_satisfy_the_interface() -> None:
    assert isinstance(MemoryTransport(), Transport)
    assert isinstance(KafkaTransport(SETTINGS, client_id="unit"), Transport)


def test_an_agent_over_the_memory_transport_executes_once_and_tells_the_handler_its_vehicle(
    tmp_path: Path,
) -> None:
    ran: list[tuple[str, str]] = []

    def ping(vid: str, command: Command) -> HandlerResult:
        ran.append((vid, command.id))
        return HandlerResult(200, f"pong from {vid}")

    transport = MemoryTransport()
    agent = VehicleAgent(
        SETTINGS,
        vehicles=[_identity(V1), _identity(V2)],
        directory=None,  # type: ignore[arg-type]  # the plaintext codec never consults it
        minimum_path="xwing",
        handlers={"ping": VehicleHandler(ping), "lock_doors": lambda command: None},
        store_path=tmp_path / "executed.sqlite",
        transport=transport,
        codec=PlaintextCodec(),
    )
    try:
        first, second, plain = _signed(V1), _signed(V2), _signed(V2, "lock_doors")
        for signed in (first, second, plain):
            vid = signed.command.target.vehicle or ""
            transport.feed(OUTBOUND, vid.encode(), signed.encode())
        transport.feed(OUTBOUND, V1.encode(), first.encode())  # a redelivery
        transport.feed(OUTBOUND, b"V-9", first.encode())  # another process's vehicle

        assert agent.poll_once(0) == 5
        assert ran == [(V1, first.command.id), (V2, second.command.id)]
        answers = [Response.decode(r.value or b"") for r in transport.sent]
        assert [r.topic for r in transport.sent] == [RESPONSES] * 4
        assert [(a.command_id, a.vehicle_id, a.status, a.detail) for a in answers] == [
            (first.command.id, V1, 200, f"pong from {V1}"),
            (second.command.id, V2, 200, f"pong from {V2}"),
            (plain.command.id, V2, 200, ""),
            (first.command.id, V1, 200, f"pong from {V1}"),  # answered again, not run again
        ]
        assert transport.commits == [{0: 5}]
        assert agent.stats.ignored == 1
        assert agent.stats.duplicates == 1
        assert agent.poll_once(0) == 0
    finally:
        agent.close()
    assert transport.closed


def test_a_publisher_over_the_memory_transport(tmp_path: Path) -> None:
    private, _public = Ed25519Suite().generate()
    signer = Ed25519Suite().signer(private, "dispatch-1/sig")
    transport = MemoryTransport()
    with CommandPublisher(
        SETTINGS, principal_id="dispatch-1", signer=signer, transport=transport
    ) as publisher:
        handle = publisher.send(Target(vehicle=V1), "ping", {"n": 1})
        publisher.approve(handle.signed)
    command, approval = transport.sent
    assert command.topic == SETTINGS.topics.full(SETTINGS.topics.commands_requested)
    assert command.key == approval.key == handle.command_id.encode()
    assert SignedCommand.decode(command.value or b"").command.id == handle.command_id
    assert approval.topic == SETTINGS.topics.full(SETTINGS.topics.commands_approvals)
    assert SignedApproval.decode(approval.value or b"").approval.is_for(handle.signed)
    assert (handle.partition, handle.offset) == (0, 0)
    assert handle.published_at_ms == command.timestamp
    assert transport.closed
