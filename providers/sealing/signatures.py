"""Checking a signature block of either wire format: one signature, or a Merkle inclusion proof
plus a batch-root signature served from the verified-roots cache when it was seen before."""

from __future__ import annotations

from collections.abc import Callable, Hashable

from fleetbus.bus.envelope import (
    EnvelopeError,
    SignatureBlock,
    SingleSignature,
    batch_root_to_be_signed,
)
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import Verifier
from fleetbus.providers.merkle import MerkleError, leaf_hash, root_from_inclusion_proof
from fleetbus.providers.sealing.replay import VerifiedRoots


def _nothing() -> None:
    return None


def verifies(verifier: Verifier, message: bytes, signature: bytes) -> bool:
    """True only for a valid signature; a verifier that raises on garbage has still said "no"."""
    try:
        return verifier.verify(message, signature) is True
    except Exception:
        return False


def signature_block_verifies(
    tbs: bytes,
    block: SignatureBlock,
    verifier: Verifier,
    *,
    roots: VerifiedRoots,
    root_key: tuple[Hashable, ...],
    now: float,
    root_ttl_s: float,
    on_verify: Callable[[], None] = _nothing,
    on_root_hit: Callable[[], None] = _nothing,
) -> bool:
    """Whether ``block`` signs ``tbs``. A batch root is cached under ``root_key + (root, size)``
    for ``root_ttl_s`` once its signature verified. A proof that does not fit its tree raises
    ``EnvelopeError`` (``bad_signature``)."""
    if isinstance(block, SingleSignature):
        on_verify()
        return verifies(verifier, tbs, block.signature)
    try:
        root = root_from_inclusion_proof(
            block.leaf_index, block.tree_size, leaf_hash(tbs), block.path
        )
    except MerkleError as exc:
        raise EnvelopeError(
            f"inclusion proof does not fit the tree: {exc}", reason=ReasonCode.BAD_SIGNATURE
        ) from exc
    cache_key = (*root_key, root, block.tree_size)
    if roots.get(cache_key, now) is not None:
        on_root_hit()
        return True
    on_verify()
    ok = verifies(verifier, batch_root_to_be_signed(root, block.tree_size), block.root_signature)
    if ok:
        roots.put(cache_key, True, now + root_ttl_s)
    return ok
