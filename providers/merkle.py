"""Merkle trees for batch signing: RFC 9162 (Certificate Transparency v2) section 2.1 hashing.

``leaf = SHA-256(0x00 || data)``, ``node = SHA-256(0x01 || left || right)``; the tree over n leaves
splits at the largest power of two below n. One signature over the root authenticates every
leaf that comes with an inclusion proof.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from fleetbus.bus.errors import FleetbusError, ReasonCode

__all__ = [
    "HASH_LENGTH",
    "MerkleError",
    "inclusion_proofs",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "root_from_inclusion_proof",
]

HASH_LENGTH = 32


class MerkleError(FleetbusError):
    """An inclusion proof is structurally impossible for its tree size."""

    reason = ReasonCode.BAD_SIGNATURE


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _root_and_paths(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    n = len(leaves)
    if n == 1:
        return leaves[0], [[]]
    k = _split(n)
    left_root, left_paths = _root_and_paths(leaves[:k])
    right_root, right_paths = _root_and_paths(leaves[k:])
    # RFC 9162 PATH(m, D[n]): a leaf's path in its subtree, then the other subtree's root.
    for path in left_paths:
        path.append(right_root)
    for path in right_paths:
        path.append(left_root)
    return node_hash(left_root, right_root), left_paths + right_paths


def merkle_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves. A batch is never empty."""
    if not leaf_hashes:
        raise ValueError("a Merkle tree needs at least one leaf")
    return inclusion_proofs(leaf_hashes)[0]


def inclusion_proofs(leaf_hashes: Sequence[bytes]) -> tuple[bytes, list[tuple[bytes, ...]]]:
    """``(root, [path of leaf 0, path of leaf 1, ...])`` in O(n log n)."""
    if not leaf_hashes:
        raise ValueError("a Merkle tree needs at least one leaf")
    root, paths = _root_and_paths(list(leaf_hashes))
    return root, [tuple(path) for path in paths]


def root_from_inclusion_proof(
    leaf_index: int, tree_size: int, leaf: bytes, path: Sequence[bytes]
) -> bytes:
    """The root implied by ``leaf`` at ``leaf_index`` with ``path`` (RFC 9162 section 2.1.3.2).

    The caller compares the result with a signed root; a proof whose length does not fit the
    tree size raises ``MerkleError``.
    """
    if tree_size < 1 or not 0 <= leaf_index < tree_size:
        raise MerkleError("leaf index outside the tree")
    fn, sn, r = leaf_index, tree_size - 1, leaf
    for p in path:
        if len(p) != HASH_LENGTH:
            raise MerkleError("inclusion path node has the wrong length")
        if sn == 0:
            raise MerkleError("inclusion path is too long for the tree size")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise MerkleError("inclusion path is too short for the tree size")
    return r
