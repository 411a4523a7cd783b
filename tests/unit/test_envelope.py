"""Sealing and opening envelopes: round trips, key epochs, batch signing, counters."""

from __future__ import annotations

import dataclasses

import pytest

from fleetbus.bus.envelope import (
    ALG_A256GCM,
    ENVELOPE_TAG,
    FORMAT_VERSION,
    BatchSignature,
    EnvelopeError,
    MessageKind,
    SingleSignature,
    decode_envelope,
    decode_protected,
    encode_protected,
    seal_protected,
)
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import KeyPath
from fleetbus.providers.sealing import EpochPolicy, SealRequest
from tests.support.envelope import TOPIC, Vehicle, World, make_vehicle, make_world


def requests(
    world: World, n: int, *, prefix: str = "m", vehicle: Vehicle | None = None
) -> list[SealRequest]:
    return [
        SealRequest(
            kind=MessageKind.COMMAND,
            topic=TOPIC,
            recipient=(vehicle or world.vehicle).keys,
            message_id=f"{prefix}-{i}",
            action="route.push",
            payload=f"payload {i}".encode(),
            issued_at=world.clock.now,
            expires_at=world.clock.now + 120,
            profile=world.profile,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("path", "suite"),
    [
        ("x25519", "ed25519"),
        ("mlkem768", "mldsa65"),
        ("xwing", "composite-mldsa65-ed25519"),
        ("mlkem768+x25519", "ed25519"),
    ],
)
def test_round_trip_each_key_path_and_suite(path: str, suite: str) -> None:
    world = make_world(path=path, suite=suite)
    envelope = world.seal(payload=b"\x00secret route\xff")
    opened = world.opener().open(envelope, topic=TOPIC)
    assert opened.payload == b"\x00secret route\xff"
    assert opened.key_path == KeyPath.parse(path)
    assert opened.signature_suite == suite
    assert opened.sender == world.sender
    assert opened.sender_key_id == world.signer.key_id
    assert opened.recipient == "V-17"
    assert opened.topic == TOPIC
    assert opened.message_id == "cmd-1"
    assert opened.action == "doors.unlock"
    assert opened.kind is MessageKind.COMMAND
    assert opened.issued_at == world.clock.now
    assert opened.expires_at == world.clock.now + 60
    assert [p for p, _ in opened.key_ids] == list(KeyPath.parse(path).providers)
    assert not opened.batch_signed


@pytest.mark.parametrize("kind", ["cmd", "rsp", "tel"])
def test_every_kind_round_trips(kind: str) -> None:
    world = make_world(path="x25519")
    opened = world.opener().open(world.seal(kind=kind), topic=TOPIC)
    assert opened.kind == MessageKind(kind)


def test_empty_payload_and_millisecond_times() -> None:
    world = make_world(path="x25519")
    issued = world.clock.now + 0.1234
    envelope = world.seal(payload=b"", issued_at=issued, expires_at=issued + 1.5)
    opened = world.opener().open(envelope, topic=TOPIC)
    assert opened.payload == b""
    assert opened.issued_at == pytest.approx(world.clock.now + 0.123)
    assert opened.expires_at == pytest.approx(world.clock.now + 1.623)


def test_outer_structure_is_what_the_spec_says() -> None:
    world = make_world(path="x25519")
    envelope = world.seal()
    # 0xda = tag with a 4-byte argument, then "fbus", then a 3-element array, then version 1.
    assert envelope[:7] == b"\xda" + ENVELOPE_TAG.to_bytes(4, "big") + b"\x83\x01"
    assert envelope[7] == 0xD0  # tag 16, COSE_Encrypt0
    parsed = decode_envelope(envelope)
    assert parsed.header.version == FORMAT_VERSION
    assert len(parsed.header.iv) == 12
    assert isinstance(parsed.signature, SingleSignature)
    assert ALG_A256GCM == 3


def test_two_seals_of_the_same_payload_differ() -> None:
    world = make_world(path="x25519", epochs=EpochPolicy())
    a = decode_envelope(world.seal(message_id="a", payload=b"same"))
    b = decode_envelope(world.seal(message_id="b", payload=b"same"))
    assert a.header.epoch_id == b.header.epoch_id
    assert a.header.iv != b.header.iv
    assert a.ciphertext != b.ciphertext


def test_epochs_on_hundred_messages_one_establish_and_one_recovery() -> None:
    world = make_world(path="xwing", epochs=EpochPolicy(max_age_s=300, max_messages=1000))
    envelopes = world.sealer.seal_batch(requests(world, 100))
    assert world.sealer.stats.establishes == 1
    assert world.sealer.stats.signatures == 100
    parsed = [decode_envelope(e) for e in envelopes]
    assert {p.header.epoch_id for p in parsed} == {parsed[0].header.epoch_id}
    assert [p.header.epoch_seq for p in parsed] == list(range(100))
    assert len({p.header.key_refs for p in parsed}) == 1
    opener = world.opener()
    for i, envelope in enumerate(envelopes):
        assert opener.open(envelope, topic=TOPIC).payload == f"payload {i}".encode()
    assert opener.stats.key_recoveries == 1
    assert opener.stats.epoch_cache_hits == 99


def test_each_message_of_an_epoch_opens_on_its_own() -> None:
    world = make_world(path="x25519", epochs=EpochPolicy())
    envelopes = world.sealer.seal_batch(requests(world, 5))
    for envelope in reversed(envelopes):  # a fresh opener per message, any order
        assert world.opener().open(envelope, topic=TOPIC).payload.startswith(b"payload")


def test_epochs_off_every_message_establishes() -> None:
    world = make_world(path="x25519", epochs=None)
    envelopes = world.sealer.seal_batch(requests(world, 5))
    assert world.sealer.stats.establishes == 5
    assert len({decode_envelope(e).header.epoch_id for e in envelopes}) == 5
    assert {decode_envelope(e).header.epoch_seq for e in envelopes} == {0}


def test_epoch_rolls_over_on_message_count() -> None:
    world = make_world(path="x25519", epochs=EpochPolicy(max_age_s=300, max_messages=10))
    envelopes = world.sealer.seal_batch(requests(world, 25))
    assert world.sealer.stats.establishes == 3
    assert [decode_envelope(e).header.epoch_seq for e in envelopes][8:12] == [8, 9, 0, 1]


def test_epoch_rolls_over_on_age() -> None:
    world = make_world(path="x25519", epochs=EpochPolicy(max_age_s=10, max_messages=1000))
    world.seal(message_id="a")
    world.clock.now += 9
    world.seal(message_id="b")
    assert world.sealer.stats.establishes == 1
    world.clock.now += 2
    world.seal(message_id="c")
    assert world.sealer.stats.establishes == 2


def test_epochs_are_per_recipient_and_end_on_key_rotation() -> None:
    world = make_world(path="x25519", epochs=EpochPolicy())
    other = make_vehicle("V-18")
    world.sealer.seal_batch(requests(world, 3) + requests(world, 3, vehicle=other))
    assert world.sealer.stats.establishes == 2
    rotated = make_vehicle("V-17", version=2)
    world.sealer.seal_batch(requests(world, 2, vehicle=rotated))
    assert world.sealer.stats.establishes == 3


def test_batch_of_64_one_signature_and_cheap_opening() -> None:
    world = make_world(path="x25519", suite="mldsa65", epochs=EpochPolicy(), batch_signing=True)
    envelopes = world.sealer.seal_batch(requests(world, 64))
    assert world.sealer.stats.signatures == 1
    assert world.sealer.stats.establishes == 1
    blocks = [decode_envelope(e).signature for e in envelopes]
    assert all(isinstance(b, BatchSignature) for b in blocks)
    assert {b.tree_size for b in blocks if isinstance(b, BatchSignature)} == {64}
    assert [b.leaf_index for b in blocks if isinstance(b, BatchSignature)] == list(range(64))
    opener = world.opener()
    for envelope in envelopes:
        assert opener.open(envelope, topic=TOPIC).batch_signed
    assert opener.stats.signature_verifications == 1
    assert opener.stats.root_cache_hits == 63


def test_batch_of_one_and_seal_with_batch_signing() -> None:
    world = make_world(path="x25519", batch_signing=True)
    envelope = world.seal()
    block = decode_envelope(envelope).signature
    assert isinstance(block, BatchSignature)
    assert (block.tree_size, block.leaf_index, block.path) == (1, 0, ())
    assert world.opener().open(envelope, topic=TOPIC).payload == b"unlock"


def test_seal_batch_without_batch_signing_signs_each() -> None:
    world = make_world(path="x25519")
    envelopes = world.sealer.seal_batch(requests(world, 4))
    assert world.sealer.stats.signatures == 4
    assert world.sealer.stats.envelopes == 4
    assert all(isinstance(decode_envelope(e).signature, SingleSignature) for e in envelopes)
    assert world.sealer.seal_batch([]) == []


def test_profile_signature_suite_must_match_the_signer() -> None:
    world = make_world(path="x25519", suite="ed25519")
    wrong = dataclasses.replace(world.profile, signature_suite="mldsa65")
    with pytest.raises(EnvelopeError) as info:
        world.seal(profile=wrong)
    assert info.value.reason is ReasonCode.CONFIG


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "order"},
        {"message_id": ""},
        {"topic": "t" * 300},
        {"expires_at": 1.0},
        {"payload": "text"},
        {"issued_at": float("nan")},
    ],
)
def test_sealer_refuses_what_recipients_would_reject(changes: dict[str, object]) -> None:
    world = make_world(path="x25519")
    with pytest.raises(EnvelopeError) as info:
        world.seal(**changes)  # type: ignore[arg-type]
    assert info.value.reason is ReasonCode.CONFIG


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"message_id": ""},
        {"key_path": "x25519+xwing"},
        {"epoch_id": b"short"},
        {"iv": b"\x00" * 11},
        {"expires_at_ms": 1},
        {"action": "a" * 1000},
    ],
)
def test_seal_protected_applies_exactly_the_recipients_checks(changes: dict[str, object]) -> None:
    """The sealer checks its header without decoding its own bytes again: same verdict and same
    bytes as encode_protected followed by decode_protected."""
    world = make_world(path="x25519")
    header = dataclasses.replace(
        decode_envelope(world.seal()).header,
        **changes,  # type: ignore[arg-type]
    )
    try:
        expected: bytes | None = encode_protected(header)
        assert decode_protected(expected) == header
    except EnvelopeError:
        expected = None
    if expected is None:
        with pytest.raises(EnvelopeError) as info:
            seal_protected(header)
        assert info.value.reason is ReasonCode.MALFORMED
    else:
        assert seal_protected(header) == expected


def test_sealer_refuses_oversize_output() -> None:
    world = make_world(path="x25519")
    with pytest.raises(EnvelopeError) as info:
        world.seal(payload=b"x" * (64 * 1024))
    assert info.value.reason is ReasonCode.OVERSIZE


def test_failover_path_is_the_one_recorded() -> None:
    world = make_world(path="x25519")
    # A profile preferring a path the recipient cannot use falls over to the next one.
    bare = dataclasses.replace(
        world.vehicle.keys,
        public_keys={"x25519": world.vehicle.keys.public_keys["x25519"]},
        key_ids={"x25519": world.vehicle.keys.key_ids["x25519"]},
    )
    prof = dataclasses.replace(
        world.profile, key_paths=[KeyPath.parse("xwing"), KeyPath.parse("x25519")]
    )
    envelope = world.seal(recipient=bare, profile=prof)
    assert decode_envelope(envelope).header.key_path == "x25519"
    assert world.opener().open(envelope, topic=TOPIC).key_path.name == "x25519"


def test_reprs_hold_no_secrets() -> None:
    world = make_world(path="x25519")
    opened = world.opener().open(world.seal(payload=b"TOPSECRET"), topic=TOPIC)
    assert "TOPSECRET" not in repr(opened)
    assert "TOPSECRET" not in repr(world.sealer)
    assert world.sender in repr(world.sealer)


def test_epoch_policy_validates() -> None:
    with pytest.raises(EnvelopeError):
        EpochPolicy(max_age_s=0)
    with pytest.raises(EnvelopeError):
        EpochPolicy(max_messages=0)
