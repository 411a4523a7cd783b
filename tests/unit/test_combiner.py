"""CatKDF combiner: known answers, an independent re-implementation from the docs, binding."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import pytest

from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import Encapsulation, KeyProviderError
from fleetbus.providers.combiner import combine, transcript_bytes

VECTORS = Path(__file__).parent.parent / "vectors" / "kem" / "catkdf.json"


def _load() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(VECTORS.read_text())["vectors"]
    return vectors


def _encs(vector: dict[str, Any]) -> list[Encapsulation]:
    return [
        Encapsulation(
            provider=e["provider"],
            key_id=e["key_id"],
            key_ref=bytes.fromhex(e["key_ref"]),
            shared_secret=bytes.fromhex(e["shared_secret"]),
        )
        for e in vector["encapsulations"]
    ]


def _reference_catkdf(encs: list[Encapsulation], transcript: bytes, length: int) -> bytes:
    """docs/key-paths.md, written again with hmac/hashlib only (RFC 5869 by hand)."""

    def lp(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    label = b"fleetbus-catkdf-v1"
    ikm = b"".join(e.shared_secret for e in encs)
    info = lp(label) + length.to_bytes(2, "big") + len(encs).to_bytes(2, "big")
    for e in encs:
        info += lp(e.provider.encode()) + lp(e.key_id.encode()) + lp(e.key_ref)
        info += len(e.shared_secret).to_bytes(2, "big")
    info += lp(transcript)
    prk = hmac.new(label, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


@pytest.mark.parametrize("vector", _load(), ids=lambda v: v["name"])
def test_known_answer(vector: dict[str, Any]) -> None:
    encs = _encs(vector)
    transcript = bytes.fromhex(vector["transcript"])
    expected = bytes.fromhex(vector["key"])
    assert combine(encs, transcript, length=vector["length"]) == expected
    assert _reference_catkdf(encs, transcript, vector["length"]) == expected
    if "transcript_bytes" in vector:
        context = bytes.fromhex(vector["transcript_context"])
        assert transcript_bytes(encs, context).hex() == vector["transcript_bytes"]


def _base() -> tuple[list[Encapsulation], bytes]:
    vector = _load()[0]
    return _encs(vector), bytes.fromhex(vector["transcript"])


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("field", ["shared_secret", "key_id", "key_ref", "provider"])
def test_changing_any_field_changes_key(index: int, field: str) -> None:
    encs, transcript = _base()
    original = combine(encs, transcript)
    value = getattr(encs[index], field)
    if isinstance(value, bytes):
        changed: object = bytes([value[0] ^ 0x01]) + value[1:]
    else:
        changed = value + "x"
    changes: dict[str, Any] = {field: changed}
    encs[index] = dataclasses.replace(encs[index], **changes)
    assert combine(encs, transcript) != original


def test_provider_order_and_transcript_are_bound() -> None:
    encs, transcript = _base()
    original = combine(encs, transcript)
    assert combine(list(reversed(encs)), transcript) != original
    assert combine(encs, transcript + b"\x00") != original
    assert combine(encs, b"") != original
    assert combine(encs, transcript, length=64)[:32] != original  # length is bound too


def test_length_prefixing_prevents_shifting_bytes_between_fields() -> None:
    a = Encapsulation("p", "ab", b"c", b"s" * 32)
    b = Encapsulation("p", "a", b"bc", b"s" * 32)
    assert combine([a], b"t") != combine([b], b"t")
    assert transcript_bytes([a], b"t") != transcript_bytes([b], b"t")


def test_one_broken_secret_is_not_enough() -> None:
    # An attacker who broke every source but one (knows all other secrets and all public data)
    # and guesses the last one still lands on a different key.
    encs, transcript = _base()
    original = combine(encs, transcript)
    for index in range(len(encs)):
        guess = list(encs)
        guess[index] = dataclasses.replace(encs[index], shared_secret=os.urandom(32))
        assert combine(guess, transcript) != original


def test_secret_boundaries_are_bound() -> None:
    # Same concatenated IKM, different split between the two secrets.
    one = [Encapsulation("a", "k", b"r", b"x" * 31), Encapsulation("b", "k", b"r", b"x" * 33)]
    two = [Encapsulation("a", "k", b"r", b"x" * 32), Encapsulation("b", "k", b"r", b"x" * 32)]
    assert combine(one, b"") != combine(two, b"")


def test_rejects_empty_and_bad_lengths() -> None:
    encs, transcript = _base()
    with pytest.raises(KeyProviderError) as info:
        combine([], transcript)
    assert info.value.reason is ReasonCode.CONFIG
    with pytest.raises(KeyProviderError):
        combine(encs, transcript, length=0)
    with pytest.raises(KeyProviderError):
        combine(encs, transcript, length=255 * 32 + 1)
    with pytest.raises(KeyProviderError) as info:
        combine([Encapsulation("a", "k", b"r", b"")], transcript)
    assert info.value.reason is ReasonCode.MALFORMED


def test_transcript_bytes_is_deterministic_and_secret_free() -> None:
    encs, _ = _base()
    first = transcript_bytes(encs, b"ctx")
    assert first == transcript_bytes(encs, b"ctx")
    for enc in encs:
        assert enc.shared_secret not in first
