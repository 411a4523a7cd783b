"""Every way ``EnvelopeOpener.open`` says no, with its reason code, and the order of the checks."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest

from fleetbus.bus.envelope import (
    ENVELOPE_TAG,
    BatchSignature,
    EnvelopeError,
    KeyRef,
    SingleSignature,
    decode_envelope,
    encode_envelope,
)
from fleetbus.bus.errors import FleetbusError, KafkaUnavailableError, ReasonCode
from fleetbus.bus.keys import PrivateKeySet, Verifier
from fleetbus.providers.sealing import EnvelopeOpener, EpochPolicy, SealRequest
from tests.support.envelope import (
    TOPIC,
    World,
    flip,
    make_vehicle,
    make_world,
    rebuild,
    with_header,
)


def reason_of(world: World, envelope: bytes, *, topic: str = TOPIC, **opener: object) -> ReasonCode:
    with pytest.raises(EnvelopeError) as info:
        world.opener(**opener).open(envelope, topic=topic)  # type: ignore[arg-type]
    return info.value.reason


@pytest.fixture
def world() -> World:
    return make_world(path="x25519", suite="ed25519")


# --- parsing -------------------------------------------------------------------------------


def test_oversize_is_rejected_before_parsing(world: World) -> None:
    assert reason_of(world, b"\xff" * 2000, max_size=1024) is ReasonCode.OVERSIZE
    envelope = world.seal()
    assert reason_of(world, envelope, max_size=len(envelope) - 1) is ReasonCode.OVERSIZE


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        b"not cbor at all",
        cbor2.dumps([1, 2, 3]),  # untagged
        cbor2.dumps(cbor2.CBORTag(ENVELOPE_TAG, [])),
        cbor2.dumps(cbor2.CBORTag(ENVELOPE_TAG, "text")),
        cbor2.dumps(cbor2.CBORTag(ENVELOPE_TAG, [1, b"", b""])),
    ],
)
def test_garbage_is_malformed(world: World, data: bytes) -> None:
    assert reason_of(world, data) is ReasonCode.MALFORMED


def test_non_canonical_encodings_are_malformed(world: World) -> None:
    envelope = world.seal()
    # The version 1 re-encoded as a one-byte-argument integer (0x18 0x01): same value, longer.
    longer = envelope[:6] + b"\x18\x01" + envelope[7:]
    assert envelope[6] == 0x01
    assert reason_of(world, longer) is ReasonCode.MALFORMED
    # Indefinite-length outer array.
    parsed = decode_envelope(envelope)
    body = cbor2.dumps(cbor2.CBORTag(16, [parsed.protected, {}, parsed.ciphertext]))
    sig = cbor2.dumps([0, parsed.signature.signature])  # type: ignore[union-attr]
    indefinite = envelope[:5] + b"\x9f\x01" + body + sig + b"\xff"
    assert reason_of(world, indefinite) is ReasonCode.MALFORMED
    # Trailing bytes after the envelope.
    assert reason_of(world, envelope + b"\x00") is ReasonCode.MALFORMED


def test_duplicate_keys_in_the_protected_header_are_malformed(world: World) -> None:
    parsed = decode_envelope(world.seal())
    # Map header 0xb1 (17 entries) -> 0xb2 with a repeated alg entry appended.
    assert parsed.protected[0] == 0xB1
    duplicated = b"\xb2" + parsed.protected[1:] + b"\x01\x03"
    envelope = world.resign(parsed, duplicated, parsed.ciphertext)
    assert reason_of(world, envelope) is ReasonCode.MALFORMED


def test_extra_or_missing_fields_are_malformed(world: World) -> None:
    parsed = decode_envelope(world.seal())
    fields = dict(cbor2.loads(parsed.protected))
    extra = cbor2.dumps({**fields, -70000: "x"}, canonical=True)
    assert reason_of(world, world.resign(parsed, extra, parsed.ciphertext)) is ReasonCode.MALFORMED
    del fields[-65542]  # action
    missing = cbor2.dumps(fields, canonical=True)
    assert reason_of(world, world.resign(parsed, missing, parsed.ciphertext)) is (
        ReasonCode.MALFORMED
    )
    # A non-empty unprotected header.
    encrypt0 = cbor2.CBORTag(16, [parsed.protected, {5: b"\x00" * 12}, parsed.ciphertext])
    sig = [0, parsed.signature.signature]  # type: ignore[union-attr]
    data = cbor2.dumps(cbor2.CBORTag(ENVELOPE_TAG, [1, encrypt0, sig]), canonical=True)
    assert reason_of(world, data) is ReasonCode.MALFORMED


@pytest.mark.parametrize(
    ("label", "value"),
    [
        (-65543, "1700000000000"),  # issued-at as text
        (-65541, 42),  # message id as int
        (-65538, "order"),  # unknown kind
        (5, b"\x00" * 8),  # short IV
        (1, 1),  # alg A128GCM
        (-65550, b"\x00" * 15),  # short epoch id
        (-65545, "x25519+xwing"),  # path not matching the refs
        (-65544, 0),  # expiry before issue
        (-65551, True),  # bool is not an int
        (-65551, 1.0),  # nor is a float
    ],
)
def test_wrong_types_and_values_are_malformed(world: World, label: int, value: object) -> None:
    parsed = decode_envelope(world.seal())
    fields = dict(cbor2.loads(parsed.protected))
    fields[label] = value
    protected = cbor2.dumps(fields, canonical=True)
    assert reason_of(world, world.resign(parsed, protected, parsed.ciphertext)) is (
        ReasonCode.MALFORMED
    )


def test_unsupported_version_outer_and_protected(world: World) -> None:
    envelope = world.seal()
    assert envelope[6] == 0x01
    assert reason_of(world, envelope[:6] + b"\x02" + envelope[7:]) is (
        ReasonCode.UNSUPPORTED_VERSION
    )
    # Even a future version with a different body shape is named as a version problem.
    future = cbor2.dumps(cbor2.CBORTag(ENVELOPE_TAG, [2, "whatever"]))
    assert reason_of(world, future) is ReasonCode.UNSUPPORTED_VERSION
    parsed = decode_envelope(envelope)
    protected = with_header(parsed, version=2)
    assert reason_of(world, world.resign(parsed, protected, parsed.ciphertext)) is (
        ReasonCode.UNSUPPORTED_VERSION
    )


def test_bad_signature_block_shapes_are_malformed(world: World) -> None:
    parsed = decode_envelope(world.seal())
    encrypt0 = cbor2.CBORTag(16, [parsed.protected, {}, parsed.ciphertext])
    for block in ([2, b"sig"], [0], [1, b"sig", 1, 1, []], [1, b"sig", 2, 0, [b"short"]]):
        data = cbor2.dumps(cbor2.CBORTag(ENVELOPE_TAG, [1, encrypt0, block]), canonical=True)
        assert reason_of(world, data) is ReasonCode.MALFORMED, block


# --- binding and freshness -----------------------------------------------------------------


def test_wrong_recipient(world: World) -> None:
    envelope = world.seal()
    assert reason_of(world, envelope, vehicle=make_vehicle("V-18")) is ReasonCode.WRONG_RECIPIENT


def test_wrong_topic(world: World) -> None:
    envelope = world.seal()
    assert reason_of(world, envelope, topic="fleet.telemetry.raw") is ReasonCode.WRONG_RECIPIENT


def test_expired_with_skew_allowance(world: World) -> None:
    envelope = world.seal(expires_at=world.clock.now + 10)
    world.clock.now += 10 + 29  # inside the 30 s skew allowance
    assert world.opener().open(envelope, topic=TOPIC).payload == b"unlock"
    world.clock.now += 2
    assert reason_of(world, envelope) is ReasonCode.EXPIRED
    assert reason_of(world, envelope, skew_s=0) is ReasonCode.EXPIRED
    assert world.opener(skew_s=120).open(envelope, topic=TOPIC).payload == b"unlock"


def test_not_yet_valid(world: World) -> None:
    envelope = world.seal(issued_at=world.clock.now + 31, expires_at=world.clock.now + 90)
    assert reason_of(world, envelope) is ReasonCode.NOT_YET_VALID
    early = world.seal(
        message_id="ok", issued_at=world.clock.now + 29, expires_at=world.clock.now + 90
    )
    assert world.opener().open(early, topic=TOPIC).message_id == "ok"


def test_downgrade() -> None:
    world = make_world(path="x25519")
    assert reason_of(world, world.seal(), minimum="xwing") is ReasonCode.DOWNGRADE
    hybrid = make_world(path="mlkem768+x25519")
    opened = hybrid.opener(minimum="mlkem768").open(hybrid.seal(), topic=TOPIC)
    assert opened.key_path.name == "mlkem768+x25519"


# --- signer and signature ------------------------------------------------------------------


def test_unknown_signer(world: World) -> None:
    world.directory.entries.clear()
    assert reason_of(world, world.seal()) is ReasonCode.UNKNOWN_SIGNER


class _BrokenDirectory:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def verifier_for(self, principal_id: str, key_id: str, *, at: float) -> Verifier:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (KeyError("x"), ReasonCode.UNKNOWN_SIGNER),
        (FleetbusError("odd", reason=ReasonCode.POLICY_DENIED), ReasonCode.UNKNOWN_SIGNER),
        (KafkaUnavailableError("down"), ReasonCode.KAFKA_UNAVAILABLE),
    ],
)
def test_directory_failures(world: World, exc: Exception, reason: ReasonCode) -> None:
    opener = EnvelopeOpener(
        world.vehicle.own,
        _BrokenDirectory(exc),
        world.runner,
        world.profile.minimum_path,
        clock=world.clock,
    )
    with pytest.raises(EnvelopeError) as info:
        opener.open(world.seal(), topic=TOPIC)
    assert info.value.reason is reason


def test_expired_signer(world: World) -> None:
    entry = world.directory.entries[(world.sender, world.signer.key_id)]
    entry.not_after = world.clock.now - 1
    assert reason_of(world, world.seal()) is ReasonCode.SIGNER_EXPIRED


def test_revoked_signer(world: World) -> None:
    world.directory.entries[(world.sender, world.signer.key_id)].revoked = True
    assert reason_of(world, world.seal()) is ReasonCode.SIGNER_REVOKED


def test_bad_signature(world: World) -> None:
    envelope = world.seal()
    parsed = decode_envelope(envelope)
    assert isinstance(parsed.signature, SingleSignature)
    bad = SingleSignature(flip(parsed.signature.signature, 5))
    assert reason_of(world, rebuild(envelope, signature=bad)) is ReasonCode.BAD_SIGNATURE


def test_swapped_signature_from_another_envelope(world: World) -> None:
    first, second = world.seal(message_id="a"), world.seal(message_id="b")
    swapped = rebuild(first, signature=decode_envelope(second).signature)
    assert reason_of(world, swapped) is ReasonCode.BAD_SIGNATURE


def test_suite_in_header_must_match_the_directory_key(world: World) -> None:
    parsed = decode_envelope(world.seal())
    protected = with_header(parsed, signature_suite="mldsa65")
    envelope = world.resign(parsed, protected, parsed.ciphertext)
    assert reason_of(world, envelope) is ReasonCode.BAD_SIGNATURE


def test_signature_by_another_key_of_the_same_suite(world: World) -> None:
    private, _ = world.suite.generate()
    impostor = world.suite.signer(private, world.signer.key_id)
    forged = make_world(path="x25519")
    forged.sealer = type(world.sealer)(
        world.sender, impostor, world.sealer._sealer, clock=world.clock
    )
    envelope = forged.sealer.seal(
        "cmd", TOPIC, world.vehicle.keys, "m", "a", b"p", world.clock.now,
        world.clock.now + 60, world.profile,
    )  # fmt: skip
    assert reason_of(world, envelope) is ReasonCode.BAD_SIGNATURE


def _batch_world() -> World:
    return make_world(path="x25519", epochs=EpochPolicy(), batch_signing=True)


def _batch(world: World, prefix: str, n: int = 4) -> list[bytes]:
    return world.sealer.seal_batch(
        [
            SealRequest(
                "cmd",
                TOPIC,
                world.vehicle.keys,
                f"{prefix}{i}",
                "a",
                b"p",
                world.clock.now,
                world.clock.now + 60,
                world.profile,
            )
            for i in range(n)
        ]
    )


def test_merkle_path_from_another_batch() -> None:
    world = _batch_world()
    first, second = _batch(world, "a"), _batch(world, "b")
    foreign = rebuild(first[1], signature=decode_envelope(second[1]).signature)
    assert reason_of(world, foreign) is ReasonCode.BAD_SIGNATURE
    # Even when the other batch's root is already verified and cached.
    opener = world.opener()
    opener.open(second[0], topic=TOPIC)
    with pytest.raises(EnvelopeError) as info:
        opener.open(foreign, topic=TOPIC)
    assert info.value.reason is ReasonCode.BAD_SIGNATURE


def test_batch_index_and_tree_size_are_bound() -> None:
    world = _batch_world()
    envelopes = _batch(world, "a", 5)
    block = decode_envelope(envelopes[2]).signature
    assert isinstance(block, BatchSignature)
    moved = dataclasses.replace(block, leaf_index=3)
    assert reason_of(world, rebuild(envelopes[2], signature=moved)) is ReasonCode.BAD_SIGNATURE
    grown = dataclasses.replace(block, tree_size=6)
    assert reason_of(world, rebuild(envelopes[2], signature=grown)) is ReasonCode.BAD_SIGNATURE
    forged_root_sig = dataclasses.replace(block, root_signature=flip(block.root_signature, 0))
    assert reason_of(world, rebuild(envelopes[2], signature=forged_root_sig)) is (
        ReasonCode.BAD_SIGNATURE
    )


# --- replay, key ids, tampering ------------------------------------------------------------


def test_replayed_message_id(world: World) -> None:
    envelope = world.seal()
    opener = world.opener()
    opener.open(envelope, topic=TOPIC)
    with pytest.raises(EnvelopeError) as info:
        opener.open(envelope, topic=TOPIC)
    assert info.value.reason is ReasonCode.REPLAYED
    # A fresh envelope re-using the message id is a replay too, even with a new epoch and IV.
    with pytest.raises(EnvelopeError) as info:
        opener.open(world.seal(payload=b"other"), topic=TOPIC)
    assert info.value.reason is ReasonCode.REPLAYED


def test_a_rejected_envelope_does_not_burn_its_message_id(world: World) -> None:
    envelope = world.seal()
    opener = world.opener()
    parsed = decode_envelope(envelope)
    tampered = world.resign(parsed, parsed.protected, flip(parsed.ciphertext, 0))
    with pytest.raises(EnvelopeError):
        opener.open(tampered, topic=TOPIC)
    assert opener.open(envelope, topic=TOPIC).payload == b"unlock"


def test_unknown_key_id(world: World) -> None:
    keys = world.vehicle.keys
    renamed = dataclasses.replace(keys, key_ids={**keys.key_ids, "x25519": "V-17/x25519/99"})
    envelope = world.seal(recipient=renamed)
    assert reason_of(world, envelope) is ReasonCode.UNKNOWN_KEY_ID


def test_unknown_key_id_for_a_provider_we_do_not_run(world: World) -> None:
    parsed = decode_envelope(world.seal())
    protected = with_header(
        parsed,
        key_refs=(*parsed.header.key_refs, KeyRef("kyber-ng", "k1", b"\x01")),
        key_path="x25519+kyber-ng",
    )
    envelope = world.resign(parsed, protected, parsed.ciphertext)
    assert reason_of(world, envelope) is ReasonCode.UNKNOWN_KEY_ID


def test_tampered_ciphertext(world: World) -> None:
    envelope = world.seal()
    parsed = decode_envelope(envelope)
    flipped = flip(parsed.ciphertext, 3)
    # Unsigned tampering is caught by the signature, which covers the ciphertext ...
    assert reason_of(world, rebuild(envelope, ciphertext=flipped)) is ReasonCode.BAD_SIGNATURE
    # ... and a signer that signs a bad ciphertext still cannot make the AEAD accept it.
    assert reason_of(world, world.resign(parsed, parsed.protected, flipped)) is (
        ReasonCode.TAMPERED
    )


@pytest.mark.parametrize("change", ["action", "topic", "expires_at_ms", "epoch_seq", "iv"])
def test_tampered_header(world: World, change: str) -> None:
    envelope = world.seal()
    parsed = decode_envelope(envelope)
    changes: dict[str, object] = {
        "action": {"action": "doors.lock"},
        "topic": {"topic": TOPIC},  # same value, re-encoded: must still be byte-identical
        "expires_at_ms": {"expires_at_ms": parsed.header.expires_at_ms + 1},
        "epoch_seq": {"epoch_seq": 7},
        "iv": {"iv": flip(parsed.header.iv, 0)},
    }[change]  # type: ignore[assignment]
    protected = with_header(parsed, **changes)
    if change == "topic":
        assert protected == parsed.protected
        return
    tampered = rebuild(envelope, protected=protected)
    # Public path: the signature covers the protected header, so it fails first.
    assert reason_of(world, tampered) is ReasonCode.BAD_SIGNATURE
    # Internal path without the signature check: the AEAD's associated data catches it.
    opener = world.opener()
    with pytest.raises(EnvelopeError) as info:
        opener._decrypt(decode_envelope(tampered))
    assert info.value.reason is ReasonCode.TAMPERED
    # And a re-signed changed header (a malicious or buggy signer) still fails the AEAD.
    assert reason_of(world, world.resign(parsed, protected, parsed.ciphertext)) is (
        ReasonCode.TAMPERED
    )


def test_any_flipped_protected_byte_never_opens(world: World) -> None:
    envelope = world.seal()
    parsed = decode_envelope(envelope)
    start = envelope.index(parsed.protected)
    for offset in range(0, len(parsed.protected), 7):
        with pytest.raises(EnvelopeError) as info:
            world.opener().open(flip(envelope, start + offset), topic=TOPIC)
        assert info.value.reason in {
            ReasonCode.MALFORMED,
            ReasonCode.UNSUPPORTED_VERSION,
            ReasonCode.WRONG_RECIPIENT,
            ReasonCode.NOT_YET_VALID,
            ReasonCode.EXPIRED,
            ReasonCode.DOWNGRADE,
            ReasonCode.UNKNOWN_SIGNER,
            ReasonCode.BAD_SIGNATURE,
        }


def test_key_recovery_failure_is_tampered(world: World) -> None:
    parsed = decode_envelope(world.seal())
    ref = parsed.header.key_refs[0]
    broken = dataclasses.replace(ref, key_ref=flip(ref.key_ref, 40))
    protected = with_header(parsed, key_refs=(broken,))
    assert reason_of(world, world.resign(parsed, protected, parsed.ciphertext)) is (
        ReasonCode.TAMPERED
    )


def test_wrong_private_key_is_tampered(world: World) -> None:
    envelope = world.seal()
    other = make_vehicle("V-17")  # same name and key ids, other key material
    own = PrivateKeySet("V-17", other.own.private_keys, world.vehicle.own.key_ids)
    opener = EnvelopeOpener(
        own, world.directory, world.runner, world.profile.minimum_path, clock=world.clock
    )
    with pytest.raises(EnvelopeError) as info:
        opener.open(envelope, topic=TOPIC)
    assert info.value.reason is ReasonCode.TAMPERED


# --- check order ---------------------------------------------------------------------------


def test_check_order(world: World) -> None:
    """Each earlier check wins over every later one (docs/wire-format.md, "Opening")."""
    envelope = world.seal(expires_at=world.clock.now + 1)
    parsed = decode_envelope(envelope)
    unsigned = rebuild(envelope, ciphertext=flip(parsed.ciphertext, 0))  # bad signature
    world.directory.entries[(world.sender, world.signer.key_id)].revoked = True
    # signer before signature
    assert reason_of(world, unsigned) is ReasonCode.SIGNER_REVOKED
    # downgrade before signer
    assert reason_of(world, unsigned, minimum="xwing") is ReasonCode.DOWNGRADE
    world.clock.now += 60
    # time before downgrade
    assert reason_of(world, unsigned, minimum="xwing") is ReasonCode.EXPIRED
    # binding before time
    assert reason_of(world, unsigned, topic="other") is ReasonCode.WRONG_RECIPIENT
    # parsing before binding, size before parsing
    assert reason_of(world, unsigned + b"\x00", topic="other") is ReasonCode.MALFORMED
    assert reason_of(world, unsigned, topic="other", max_size=10) is ReasonCode.OVERSIZE


def test_replay_is_checked_after_the_signature(world: World) -> None:
    envelope = world.seal()
    opener = world.opener()
    opener.open(envelope, topic=TOPIC)
    parsed = decode_envelope(envelope)
    forged = rebuild(envelope, signature=SingleSignature(b"\x00" * 64))
    with pytest.raises(EnvelopeError) as info:
        opener.open(forged, topic=TOPIC)
    assert info.value.reason is ReasonCode.BAD_SIGNATURE
    assert parsed.header.message_id == "cmd-1"


def test_encode_envelope_round_trips_exactly(world: World) -> None:
    envelope = world.seal()
    parsed = decode_envelope(envelope)
    assert encode_envelope(parsed.protected, parsed.ciphertext, parsed.signature) == envelope
