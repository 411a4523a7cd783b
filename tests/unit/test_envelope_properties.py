"""Property tests: whatever bytes arrive, ``open`` raises only ``EnvelopeError`` with a reason
code (never another exception, never a half-verified result); valid inputs round-trip."""

from __future__ import annotations

from functools import cache

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetbus.bus.envelope import ENVELOPE_TAG, EnvelopeError, decode_envelope
from fleetbus.bus.errors import ReasonCode
from fleetbus.providers.keypath import ProfileSealer
from fleetbus.providers.merkle import inclusion_proofs, leaf_hash, root_from_inclusion_proof
from fleetbus.providers.sealing import EnvelopeSealer, EpochPolicy, SealRequest
from tests.support.envelope import TOPIC, World, make_world

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def world() -> World:
    return make_world(path="x25519", suite="ed25519")


@cache
def samples() -> tuple[bytes, ...]:
    """One single-signed and three batch-signed envelopes, all from ``world()``'s sender."""
    w = world()
    single = w.seal(message_id="sample-single")
    batch_sealer = EnvelopeSealer(
        w.sender,
        w.signer,
        ProfileSealer(w.runner, provider_timeout_s=None),
        epochs=EpochPolicy(),
        batch_signing=True,
        clock=w.clock,
    )
    batch = batch_sealer.seal_batch(
        [
            SealRequest(
                "tel", TOPIC, w.vehicle.keys, f"sample-batch-{i}", "telemetry.push",
                b"x" * i, w.clock.now, w.clock.now + 60, w.profile,
            )
            for i in range(3)
        ]
    )  # fmt: skip
    return (single, *batch)


def assert_rejected(data: bytes) -> None:
    """Open with a fresh opener (no caches, no replay state) and demand a typed rejection."""
    with pytest.raises(EnvelopeError) as info:
        world().opener().open(data, topic=TOPIC)
    assert isinstance(info.value.reason, ReasonCode)
    assert not str(info.value).startswith("unexpected"), str(info.value)


def test_the_samples_open() -> None:
    for envelope in samples():
        assert world().opener().open(envelope, topic=TOPIC).recipient == "V-17"


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_rejected_with_a_reason(data: bytes) -> None:
    assert_rejected(data)


@FUZZ
@given(st.data())
def test_mutated_valid_envelopes_never_open(data: st.DataObject) -> None:
    original = data.draw(st.sampled_from(samples()))
    mutation = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]))
    pos = data.draw(st.integers(0, len(original) - 1))
    if mutation == "flip":
        bit = data.draw(st.integers(0, 7))
        mutated = original[:pos] + bytes([original[pos] ^ (1 << bit)]) + original[pos + 1 :]
    elif mutation == "truncate":
        mutated = original[:pos]
    elif mutation == "insert":
        mutated = original[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + original[pos:]
    elif mutation == "delete":
        mutated = original[:pos] + original[pos + data.draw(st.integers(1, 8)) :]
    else:
        other = data.draw(st.sampled_from(samples()))
        cut = data.draw(st.integers(0, len(other) - 1))
        mutated = original[:pos] + other[cut:]
    if mutated in samples():  # e.g. a splice that reproduced another whole sample
        return
    assert_rejected(mutated)


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=True)
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.integers(-70000, 10) | st.text(max_size=3), children, max_size=5)
        | st.builds(cbor2.CBORTag, st.sampled_from([16, 2, 1, ENVELOPE_TAG]), children)
    ),
    max_leaves=25,
)


@FUZZ
@given(cbor_values, st.booleans())
def test_structured_cbor_inside_the_envelope_tag_is_rejected(value: object, tag: bool) -> None:
    try:
        data = cbor2.dumps(cbor2.CBORTag(ENVELOPE_TAG, value) if tag else value)
    except Exception:  # hypothesis built something cbor2 cannot encode; nothing to test
        return
    assert_rejected(data)


@FUZZ
@given(
    st.lists(cbor_values, min_size=3, max_size=3),
    st.sampled_from(["protected", "sig", "cose"]),
)
def test_valid_outer_shape_with_random_parts_is_rejected(parts: list[object], where: str) -> None:
    parsed = decode_envelope(samples()[0])
    protected: object = parsed.protected
    cose: object = cbor2.CBORTag(16, [parsed.protected, {}, parsed.ciphertext])
    sig: object = [0, b"\x00" * 64]
    if where == "protected":
        try:
            protected = cbor2.dumps(parts[0], canonical=True)
        except Exception:
            return
        cose = cbor2.CBORTag(16, [protected, {}, parsed.ciphertext])
    elif where == "sig":
        sig = parts
    else:
        cose = cbor2.CBORTag(16, parts)
    try:
        data = cbor2.dumps(cbor2.CBORTag(ENVELOPE_TAG, [1, cose, sig]), canonical=True)
    except Exception:
        return
    assert_rejected(data)


text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(max_size=2048),
    message_id=text,
    action=text,
    kind=st.sampled_from(["cmd", "rsp", "tel"]),
    lifetime=st.integers(0, 86_400_000),
)
def test_anything_valid_round_trips(
    payload: bytes, message_id: str, action: str, kind: str, lifetime: int
) -> None:
    w = make_world(path="x25519")
    envelope = w.seal(
        kind=kind,
        message_id=message_id,
        action=action,
        payload=payload,
        expires_at=w.clock.now + lifetime / 1000,
    )
    opened = w.opener().open(envelope, topic=TOPIC)
    assert (opened.payload, opened.message_id, opened.action, str(opened.kind)) == (
        payload,
        message_id,
        action,
        kind,
    )


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=16), min_size=1, max_size=70), st.data())
def test_merkle_proofs_hold_for_any_batch(items: list[bytes], data: st.DataObject) -> None:
    leaves = [leaf_hash(item) for item in items]
    root, paths = inclusion_proofs(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    assert root_from_inclusion_proof(index, len(leaves), leaves[index], paths[index]) == root
