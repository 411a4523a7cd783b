"""Wire format v2: establishment + message round trips, every reject reason of the check order
(docs/wire-format.md V2.2-V2.5), replay window, recovery status, v1/v2 dispatch."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import cbor2
import pytest

from fleetbus.bus.commands import Command, SignedCommand, Target
from fleetbus.bus.envelope import ENVELOPE_TAG, EnvelopeError, MessageKind, canonical_dumps
from fleetbus.bus.envelope_v2 import (
    Direction,
    Message,
    ParsedEstablishment,
    RecordType,
    decode_record,
    encode_establishment,
    encode_message,
    encode_message_header,
    establishment_bytes,
    message_aad,
    record_version,
)
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import KeyPath
from fleetbus.providers.keypath import ProfileSealer
from fleetbus.providers.sealing import EpochPolicy, SealRequest
from fleetbus.providers.sealing_v2 import (
    REPLAY_WINDOW,
    AcceptedEpoch,
    AuthenticatedRejectError,
    EpochOpener,
    EpochSealer,
    EpochUnknownError,
    MemoryEpochStore,
    SqliteEpochStore,
    derive_message_key_nonce,
    make_status,
    open_status,
    sign_status,
)
from tests.support.envelope import TOPIC, World, make_vehicle, make_world, profile


def sealer_v2(world: World, **kw: object) -> EpochSealer:
    return EpochSealer(
        world.sender,
        world.signer,
        ProfileSealer(world.runner, provider_timeout_s=None),
        clock=world.clock,
        **kw,  # type: ignore[arg-type]
    )


def opener_v2(world: World, **kw: object) -> EpochOpener:
    args: dict[str, object] = {"clock": world.clock}
    args.update(kw)
    own = args.pop("own", world.vehicle.own)
    return EpochOpener(
        own,  # type: ignore[arg-type]
        world.directory,
        world.runner,
        world.profile.minimum_path,
        **args,  # type: ignore[arg-type]
    )


def cid(label: str) -> str:
    """A command id (a canonical UUIDv7) named by a short test label."""
    return f"0190f3a0-0000-7000-8000-{hashlib.sha256(label.encode()).hexdigest()[:12]}"


def signed_command(world: World, label: str, action: str = "doors.unlock") -> bytes:
    """What a `cmd` message carries: a dispatcher-signed command (here signed by the test's
    sender key; the opener leaves the issuer's signature to the vehicle)."""
    command = Command(
        id=cid(label),
        issuer="dispatch-1",
        target=Target(vehicle="V-17"),
        action=action,
        params={},
        issued_at=world.clock.now,
        expires_at=world.clock.now + 60,
    )
    return SignedCommand.sign(command, world.signer).encode()


def request(world: World, message_id: str = "cmd-1", **kw: object) -> SealRequest:
    args: dict[str, object] = {
        "kind": "cmd",
        "topic": TOPIC,
        "recipient": world.vehicle.keys,
        "message_id": cid(message_id),
        "action": "doors.unlock",
        "payload": signed_command(world, message_id),
        "issued_at": world.clock.now,
        "expires_at": world.clock.now + 60,
        "profile": world.profile,
    }
    args.update(kw)
    return SealRequest(**args)  # type: ignore[arg-type]


def reason_of(opener: EpochOpener, data: bytes, topic: str = TOPIC) -> ReasonCode:
    with pytest.raises(EnvelopeError) as info:
        opener.open(data, topic=topic)
    return info.value.reason


@pytest.fixture
def world() -> World:
    return make_world(path="xwing")


def test_round_trip_establishment_then_small_messages(world: World) -> None:
    sealer = sealer_v2(world)
    opener = opener_v2(world)
    first = sealer.seal(request(world, "cmd-1"))
    assert len(first) == 2  # establishment, then the message
    accepted = opener.open(first[0], topic=TOPIC)
    assert isinstance(accepted, AcceptedEpoch)
    assert accepted.new
    opened = opener.open(first[1], topic=TOPIC)
    assert not isinstance(opened, AcceptedEpoch)
    assert (opened.message_id, opened.action, opened.payload) == (
        cid("cmd-1"),
        "doors.unlock",
        signed_command(world, "cmd-1"),
    )
    assert opened.sender == world.sender
    assert opened.key_path.name == "xwing"
    assert opened.epoch_seq == 0
    second = sealer.seal(request(world, "cmd-2"))
    assert len(second) == 1  # same epoch: no establishment, no KEM, no signature
    assert sealer.establishes == 1
    assert sealer.signatures == 1
    assert opener.open(second[0], topic=TOPIC).message_id == cid("cmd-2")  # type: ignore[union-attr]
    # The action and the command id are not on the wire in clear.
    assert b"doors.unlock" not in second[0]
    assert cid("cmd-2").encode() not in second[0]
    # OSCORE class: header + tag, independent of the key path's KEM and the signature suite;
    # the command's id, action and times travel once, inside its signed form (issue 13).
    assert len(second[0]) - len(signed_command(world, "cmd-2")) <= 96


def test_a_cmd_message_carries_its_command_once_and_is_bound_to_it(world: World) -> None:
    # Issue 13: the cmd plaintext is the signed command itself; the sealer refuses to name
    # another command than it carries, the opener reads id, action and times from the command
    # and refuses a clear expiry that differs from the signed one.
    sealer = sealer_v2(world)
    for wrong in (
        {"message_id": cid("other")},
        {"action": "doors.lock"},
        {"expires_at": world.clock.now + 61},
        {"issued_at": world.clock.now - 1},
        {"payload": b"not a signed command"},
    ):
        with pytest.raises(EnvelopeError) as info:
            sealer.prepare(dataclasses.replace(request(world), **wrong))  # type: ignore[arg-type]
        assert info.value.reason is ReasonCode.CONFIG
    est, message = sealer.seal(request(world))
    parsed = decode_record(message)
    assert isinstance(parsed, Message)
    epoch = sealer._by_id[parsed.header.epoch_id]
    key, nonce = derive_message_key_nonce(epoch.secret, 0)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    assert AESGCM(key).decrypt(nonce, parsed.ciphertext, message_aad(parsed.protected)) == (
        signed_command(world, "cmd-1")
    )

    def forged(plaintext: bytes, expires_at_ms: int, sequence: int) -> bytes:
        # What only a holder of the epoch secret (the bus) can make: it authenticates.
        header = dataclasses.replace(parsed.header, sequence=sequence, expires_at_ms=expires_at_ms)
        protected = encode_message_header(header)
        k, n = derive_message_key_nonce(epoch.secret, sequence)
        return encode_message(protected, AESGCM(k).encrypt(n, plaintext, message_aad(protected)))

    opener = opener_v2(world)
    opener.open(est, topic=TOPIC)
    expires = parsed.header.expires_at_ms
    assert reason_of(opener, forged(b"\xa0", expires, 1)) is ReasonCode.MALFORMED
    later = forged(signed_command(world, "cmd-1"), expires + 1000, 2)
    assert reason_of(opener, later) is ReasonCode.MALFORMED
    assert opener.open(message, topic=TOPIC).issued_at == world.clock.now  # type: ignore[union-attr]


def test_reestablished_delivery_is_idempotent_and_a_different_est_is_replayed(
    world: World,
) -> None:
    sealer = sealer_v2(world)
    opener = opener_v2(world)
    est, message = sealer.seal(request(world))
    opener.open(est, topic=TOPIC)
    again = opener.open(est, topic=TOPIC)
    assert isinstance(again, AcceptedEpoch)
    assert not again.new
    parsed = decode_record(est)
    assert isinstance(parsed, ParsedEstablishment)
    other = dataclasses.replace(parsed.establishment, max_messages=5)
    body = establishment_bytes(other)
    forged = sealer_v2(world)._signer.sign  # the real key: the signature verifies
    from fleetbus.bus.envelope import SingleSignature
    from fleetbus.bus.envelope_v2 import signed_to_be_signed

    record = encode_establishment(body, SingleSignature(forged(signed_to_be_signed(body))))
    assert reason_of(opener, record) is ReasonCode.REPLAYED
    assert opener.open(message, topic=TOPIC).message_id == cid("cmd-1")  # type: ignore[union-attr]


def test_unknown_epoch_is_epoch_unknown_with_what_the_status_needs(world: World) -> None:
    sealer = sealer_v2(world)
    _est, message = sealer.seal(request(world))
    opener = opener_v2(world)
    with pytest.raises(EpochUnknownError) as info:
        opener.open(message, topic=TOPIC)
    assert info.value.reason is ReasonCode.EPOCH_UNKNOWN
    assert info.value.sequence == 0
    assert len(info.value.epoch_id) == 8


def test_reused_sequence_is_replayed_and_window_allows_reordering(world: World) -> None:
    sealer = sealer_v2(world)
    opener = opener_v2(world)
    records = [sealer.seal(request(world, f"cmd-{i}")) for i in range(REPLAY_WINDOW + 3)]
    opener.open(records[0][0], topic=TOPIC)
    messages = [r[-1] for r in records]
    opener.open(messages[2], topic=TOPIC)
    opener.open(messages[1], topic=TOPIC)  # late but inside the window: fine
    with pytest.raises(AuthenticatedRejectError) as info:
        opener.open(messages[1], topic=TOPIC)
    # Refused after authentication: the recipient may answer the redelivery by its id.
    assert info.value.reason is ReasonCode.REPLAYED
    assert info.value.message_id == cid("cmd-1")
    opener.open(messages[-1], topic=TOPIC)  # jumps ahead: 0 falls out of the window
    assert reason_of(opener, messages[0]) is ReasonCode.REPLAYED


def _with_header(world: World, message: bytes, **changes: object) -> bytes:
    parsed = decode_record(message)
    assert isinstance(parsed, Message)
    header = dataclasses.replace(parsed.header, **changes)  # type: ignore[arg-type]
    return encode_message(encode_message_header(header), parsed.ciphertext)


def test_sequence_far_ahead_is_epoch_exhausted_and_a_forged_one_tampered(world: World) -> None:
    sealer = sealer_v2(world, epochs=EpochPolicy(max_age_s=300, max_messages=10))
    opener = opener_v2(world)
    est, message = sealer.seal(request(world))
    opener.open(est, topic=TOPIC)
    assert reason_of(opener, _with_header(world, message, sequence=10)) is (
        ReasonCode.EPOCH_EXHAUSTED
    )
    assert reason_of(opener, _with_header(world, message, sequence=9)) is ReasonCode.TAMPERED
    # The forgery burnt nothing: the genuine message still opens.
    assert opener.open(message, topic=TOPIC).epoch_seq == 0  # type: ignore[union-attr]


def test_header_and_ciphertext_changes_are_tampered(world: World) -> None:
    sealer = sealer_v2(world)
    opener = opener_v2(world)
    est, message = sealer.seal(request(world))
    opener.open(est, topic=TOPIC)
    later = world.clock.now + 61
    assert reason_of(opener, _with_header(world, message, expires_at_ms=round(later * 1000))) is (
        ReasonCode.TAMPERED
    )
    assert reason_of(opener, _with_header(world, message, kind=MessageKind.TELEMETRY)) is (
        ReasonCode.TAMPERED
    )
    flipped = bytearray(message)
    flipped[-1] ^= 1
    assert reason_of(opener, bytes(flipped)) is ReasonCode.TAMPERED


def test_epoch_of_another_recipient(world: World) -> None:
    other = make_vehicle("V-18")
    sealer = sealer_v2(world)
    est_other, msg_other = sealer.seal(request(world, recipient=other.keys))
    est_mine, _ = sealer.seal(request(world))
    opener = opener_v2(world)
    opener.open(est_mine, topic=TOPIC)
    assert reason_of(opener, est_other) is ReasonCode.WRONG_RECIPIENT
    # Readdressed to V-17 with V-18's epoch id: V-17 holds no such epoch.
    readdressed = _with_header(world, msg_other, recipient="V-17")
    assert reason_of(opener, readdressed) is ReasonCode.EPOCH_UNKNOWN
    assert reason_of(opener, msg_other) is ReasonCode.WRONG_RECIPIENT


def test_truncated_and_malformed_records(world: World) -> None:
    sealer = sealer_v2(world)
    opener = opener_v2(world)
    est, message = sealer.seal(request(world))
    for cut in (1, 10, len(est) // 2, len(est) - 1):
        assert reason_of(opener, est[:cut]) is ReasonCode.MALFORMED
    assert reason_of(opener, message[:-3]) is ReasonCode.MALFORMED
    bad_type = canonical_dumps(cbor2.CBORTag(ENVELOPE_TAG, [2, 7, b""]))
    assert reason_of(opener, bad_type) is ReasonCode.MALFORMED
    negative = canonical_dumps(cbor2.CBORTag(ENVELOPE_TAG, [-2, 1]))
    assert reason_of(opener, negative) is ReasonCode.MALFORMED
    text_version = canonical_dumps(cbor2.CBORTag(ENVELOPE_TAG, ["2", 1]))
    assert reason_of(opener, text_version) is ReasonCode.MALFORMED
    future = canonical_dumps(cbor2.CBORTag(ENVELOPE_TAG, [3, 1]))
    assert reason_of(opener, future) is ReasonCode.UNSUPPORTED_VERSION
    assert reason_of(opener_v2(world, max_size=64), est) is ReasonCode.OVERSIZE


def test_v1_v2_confusion(world: World) -> None:
    v1_envelope = world.seal()
    est, message = sealer_v2(world).seal(request(world))
    v1_opener = world.opener()
    assert reason_of(v1_opener, est) is ReasonCode.UNSUPPORTED_VERSION  # type: ignore[arg-type]
    assert reason_of(v1_opener, message) is ReasonCode.UNSUPPORTED_VERSION  # type: ignore[arg-type]
    assert reason_of(opener_v2(world), v1_envelope) is ReasonCode.UNSUPPORTED_VERSION
    both = opener_v2(world, v1=world.opener())
    assert both.open(v1_envelope, topic=TOPIC).message_id == "cmd-1"  # type: ignore[union-attr]
    assert record_version(v1_envelope) == 1
    assert record_version(message) == 2
    # A v1 protected header under a v2 outer array: a different label set.
    from fleetbus.bus.envelope import decode_envelope

    v1_protected = decode_envelope(v1_envelope).protected
    parsed = decode_record(message)
    assert isinstance(parsed, Message)
    assert reason_of(both, encode_message(v1_protected, parsed.ciphertext)) is ReasonCode.MALFORMED


def test_establishment_checks(world: World) -> None:
    sealer = sealer_v2(world)
    est, _ = sealer.seal(request(world))
    assert reason_of(opener_v2(world), est, topic="fleet.other") is ReasonCode.WRONG_RECIPIENT
    uplink = opener_v2(world, direction=Direction.UPLINK)
    assert reason_of(uplink, est) is ReasonCode.WRONG_RECIPIENT
    strict = EpochOpener(
        world.vehicle.own,
        world.directory,
        world.runner,
        KeyPath.parse("qkd-etsi014+xwing"),
        clock=world.clock,
    )
    assert reason_of(strict, est) is ReasonCode.DOWNGRADE
    assert reason_of(opener_v2(world, max_epoch_s=60), est) is ReasonCode.POLICY_DENIED
    world.clock.now += 301 + 30
    assert reason_of(opener_v2(world), est) is ReasonCode.EXPIRED
    world.clock.now -= 2 * (301 + 30)
    assert reason_of(opener_v2(world), est) is ReasonCode.NOT_YET_VALID


def test_establishment_signature_and_signer(world: World) -> None:
    sealer = sealer_v2(world)
    est, message = sealer.seal(request(world))
    parsed = decode_record(est)
    assert isinstance(parsed, ParsedEstablishment)
    from fleetbus.bus.envelope import SingleSignature

    bad = encode_establishment(parsed.body, SingleSignature(b"\x00" * 64))
    assert reason_of(opener_v2(world), bad) is ReasonCode.BAD_SIGNATURE
    changed = dataclasses.replace(parsed.establishment, max_messages=7)
    resigned_wrong = encode_establishment(establishment_bytes(changed), parsed.signature)
    assert reason_of(opener_v2(world), resigned_wrong) is ReasonCode.BAD_SIGNATURE
    opener = opener_v2(world)
    opener.open(est, topic=TOPIC)
    # Revocation is in force per message, not only at establishment.
    world.directory.entries[(world.sender, world.signer.key_id)].revoked = True
    assert reason_of(opener, message) is ReasonCode.SIGNER_REVOKED
    assert reason_of(opener_v2(world), est) is ReasonCode.SIGNER_REVOKED


def test_sealer_ends_epochs_by_count_age_and_rotation(world: World) -> None:
    sealer = sealer_v2(world, epochs=EpochPolicy(max_age_s=10, max_messages=2))
    assert len(sealer.seal(request(world, "a"))) == 2
    assert len(sealer.seal(request(world, "b"))) == 1
    assert len(sealer.seal(request(world, "c"))) == 2  # count
    world.clock.now += 11
    assert len(sealer.seal(request(world, "d"))) == 2  # age
    rotated = make_vehicle("V-17", version=2)
    assert len(sealer.seal(request(world, "e", recipient=rotated.keys))) == 2  # rotation
    assert sealer.establishes == 4


def test_unannounced_epoch_keeps_its_establishment_in_front(world: World) -> None:
    sealer = sealer_v2(world)
    first = sealer.prepare(request(world, "a"))
    second = sealer.prepare(request(world, "b"))
    records = sealer.records_for([first, second])
    assert [len(r) for r in records] == [2, 1]
    # The transaction aborted: nothing was announced, so the next batch carries it again.
    third = sealer.prepare(request(world, "c"))
    assert len(sealer.records_for([third])[0]) == 2
    sealer.announced([third.epoch_id])
    fourth = sealer.prepare(request(world, "d"))
    assert len(sealer.records_for([fourth])[0]) == 1
    assert sealer.signatures == 1  # the establishment was signed once
    assert sealer.establishment(third.epoch_id) == records[0][0]


def test_batch_signed_establishments_for_many_recipients(world: World) -> None:
    sealer = sealer_v2(world, batch_signing=True)
    vehicles = [make_vehicle(f"V-{i}") for i in range(4)]
    prepared = [sealer.prepare(request(world, recipient=v.keys)) for v in vehicles]
    records = sealer.records_for(prepared)
    assert sealer.signatures == 1
    for vehicle, (est, message) in zip(vehicles, records, strict=True):
        opener = opener_v2(world, own=vehicle.own)
        assert isinstance(opener.open(est, topic=TOPIC), AcceptedEpoch)
        assert opener.open(message, topic=TOPIC).payload == signed_command(world, "cmd-1")  # type: ignore[union-attr]


def test_durable_store_survives_a_restart(world: World, tmp_path: Path) -> None:
    sealer = sealer_v2(world)
    est, m0 = sealer.seal(request(world, "a"))
    (m1,) = sealer.seal(request(world, "b"))
    store = SqliteEpochStore(tmp_path / "epochs.db")
    opener_v2(world, store=store).open(est, topic=TOPIC)
    opener_v2(world, store=store).open(m0, topic=TOPIC)
    store.close()
    again = SqliteEpochStore(tmp_path / "epochs.db")
    reopened = opener_v2(world, store=again)
    assert reason_of(reopened, m0) is ReasonCode.REPLAYED  # the window is durable too
    assert reopened.open(m1, topic=TOPIC).message_id == cid("b")  # type: ignore[union-attr]
    world.clock.now += 400
    assert again.prune(world.clock.now) == 1  # ended epochs are erased with their secret
    assert again.get("V-17", m0[0:0] or decode_record(m0).header.epoch_id) is None  # type: ignore[union-attr]


def test_status_round_trip_and_checks(world: World) -> None:
    vehicle_suite = world.suite
    private, public = vehicle_suite.generate()
    vsigner = vehicle_suite.signer(private, "V-17/sig/1")
    world.directory.add("V-17", "V-17/sig/1", vehicle_suite.verifier(public))
    status = make_status(
        topic="fleet.commands.responses",
        recipient=world.sender,
        epoch_id=b"\x01" * 8,
        sequence=3,
        at=world.clock.now,
    )
    record = sign_status(vsigner, "V-17", status)
    opened = open_status(
        record,
        topic="fleet.commands.responses",
        own_id=world.sender,
        directory=world.directory,
        clock=world.clock,
    )
    assert (opened.sender, opened.epoch_id, opened.sequence) == ("V-17", b"\x01" * 8, 3)
    with pytest.raises(EnvelopeError) as info:
        open_status(
            record, topic="fleet.commands.responses", own_id="other", directory=world.directory,
            clock=world.clock,
        )  # fmt: skip
    assert info.value.reason is ReasonCode.WRONG_RECIPIENT
    world.clock.now += 1000
    with pytest.raises(EnvelopeError) as info:
        open_status(
            record, topic="fleet.commands.responses", own_id=world.sender,
            directory=world.directory, clock=world.clock,
        )  # fmt: skip
    assert info.value.reason is ReasonCode.EXPIRED
    # A status is never taken for a message or an establishment.
    assert reason_of(opener_v2(world), record) is ReasonCode.MALFORMED


def test_memory_store_counts(world: World) -> None:
    store = MemoryEpochStore()
    sealer = sealer_v2(world)
    est, _ = sealer.seal(request(world))
    opener_v2(world, store=store).open(est, topic=TOPIC)
    assert len(store) == 1
    assert RecordType.MESSAGE == 1
    assert profile().name == "standard"


def test_sealer_forgets_ended_epochs(world: World) -> None:
    sealer = sealer_v2(world, epochs=EpochPolicy(max_age_s=10, max_messages=100))
    est, _ = sealer.seal(request(world))
    first = decode_record(est)
    assert isinstance(first, ParsedEstablishment)
    world.clock.now += 11
    other = make_vehicle("V-18")
    sealer.seal(request(world, recipient=other.keys))  # any establishment sweeps
    assert sealer.establishment(first.establishment.epoch_id) is None


def test_the_sqlite_epoch_store_creates_its_folder_and_an_owner_only_file(tmp_path: Path) -> None:
    # It holds epoch secrets, like a key file; the agent may open it before anything else
    # created the store's folder.
    from fleetbus.providers.sealing_v2 import SqliteEpochStore

    path = tmp_path / "new" / "vehicle.sqlite"
    SqliteEpochStore(path)
    assert path.stat().st_mode & 0o077 == 0


def test_an_in_memory_epoch_store_writes_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetbus.providers.sealing_v2 import SqliteEpochStore

    monkeypatch.chdir(tmp_path)
    SqliteEpochStore(":memory:")
    assert list(tmp_path.iterdir()) == []
