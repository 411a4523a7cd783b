"""The secret combiner: one message key from every provider's secret (ETSI TS 103 744 CatKDF style).

The byte-exact formula is in ``docs/key-paths.md``; ``tests/vectors/kem/catkdf.json`` pins it.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import Encapsulation, KeyProviderError

__all__ = ["CATKDF_LABEL", "TRANSCRIPT_LABEL", "combine", "transcript_bytes"]

#: HKDF-Extract salt and first field of the HKDF-Expand info.
CATKDF_LABEL = b"fleetbus-catkdf-v1"
#: First field of ``transcript_bytes``.
TRANSCRIPT_LABEL = b"fleetbus-transcript-v1"
_MAX_LENGTH = 255 * 32  # HKDF-SHA256 output limit (RFC 5869)


def _lp(data: bytes) -> bytes:
    """Length-prefixed: 4-byte big-endian length, then the bytes."""
    return len(data).to_bytes(4, "big") + data


def _refs(encapsulations: Sequence[Encapsulation]) -> bytes:
    out = bytearray(len(encapsulations).to_bytes(2, "big"))
    for enc in encapsulations:
        out += _lp(enc.provider.encode("utf-8"))
        out += _lp(enc.key_id.encode("utf-8"))
        out += _lp(enc.key_ref)
        out += len(enc.shared_secret).to_bytes(2, "big")
    return bytes(out)


def combine(
    encapsulations: Sequence[Encapsulation], transcript: bytes, *, length: int = 32
) -> bytes:
    """Derive the message key from every secret, in key-path order, bound to the transcript.

    ``IKM = secret_1 || ... || secret_n``; ``PRK = HKDF-Extract(salt=CATKDF_LABEL, IKM)``;
    ``key = HKDF-Expand(PRK, info, length)`` with ``info`` binding the label, the length, every
    ``(provider, key_id, key_ref, len(secret))`` and the caller's transcript, each length-prefixed.
    An attacker must know every secret to compute the key.
    """
    if not encapsulations:
        raise KeyProviderError("combine needs at least one secret", reason=ReasonCode.CONFIG)
    if len(encapsulations) > 0xFFFF:
        raise KeyProviderError("too many secrets to combine", reason=ReasonCode.CONFIG)
    if not 1 <= length <= _MAX_LENGTH:
        raise KeyProviderError(f"key length {length} out of range", reason=ReasonCode.CONFIG)
    for enc in encapsulations:
        if not 1 <= len(enc.shared_secret) <= 0xFFFF:
            raise KeyProviderError(
                f"secret from {enc.provider!r} has an invalid length", reason=ReasonCode.MALFORMED
            )
    ikm = b"".join(enc.shared_secret for enc in encapsulations)
    info = _lp(CATKDF_LABEL) + length.to_bytes(2, "big") + _refs(encapsulations) + _lp(transcript)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=CATKDF_LABEL, info=info)
    return hkdf.derive(ikm)


def transcript_bytes(encapsulations: Sequence[Encapsulation], context: bytes) -> bytes:
    """A deterministic, unambiguous encoding of the public parts of a key path plus ``context``.

    ``lp(TRANSCRIPT_LABEL) || u16(n) || n * (lp(provider) || lp(key_id) || lp(key_ref)) ||
    lp(context)``. Contains no secret; suitable as AEAD associated data or for hashing.
    """
    out = bytearray(_lp(TRANSCRIPT_LABEL))
    out += len(encapsulations).to_bytes(2, "big")
    for enc in encapsulations:
        out += _lp(enc.provider.encode("utf-8"))
        out += _lp(enc.key_id.encode("utf-8"))
        out += _lp(enc.key_ref)
    out += _lp(context)
    return bytes(out)
