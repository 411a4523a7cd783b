"""Batch-signing Merkle tree: RFC 6962/9162 reference vectors, proofs for every shape, rejects."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest

from fleetbus.providers.merkle import (
    MerkleError,
    inclusion_proofs,
    leaf_hash,
    merkle_root,
    node_hash,
    root_from_inclusion_proof,
)

VECTORS = json.loads(
    (Path(__file__).parents[1] / "vectors" / "envelope" / "merkle_rfc6962.json").read_text()
)
LEAVES = [leaf_hash(bytes.fromhex(h)) for h in VECTORS["leaves"]]


def test_empty_tree_head_is_sha256_of_nothing_and_we_refuse_empty_batches() -> None:
    assert hashlib.sha256(b"").hexdigest() == VECTORS["roots"][0]
    with pytest.raises(ValueError):
        merkle_root([])


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_match_reference_tree_heads(size: int) -> None:
    assert merkle_root(LEAVES[:size]).hex() == VECTORS["roots"][size]


@pytest.mark.parametrize(
    "case", VECTORS["inclusion"], ids=lambda c: f"{c['leaf_index']}of{c['tree_size']}"
)
def test_inclusion_proofs_match_reference(case: dict[str, object]) -> None:
    index, size = int(case["leaf_index"]), int(case["tree_size"])  # type: ignore[call-overload]
    expected = [bytes.fromhex(h) for h in case["path"]]  # type: ignore[attr-defined]
    root, paths = inclusion_proofs(LEAVES[:size])
    assert list(paths[index]) == expected
    assert root_from_inclusion_proof(index, size, LEAVES[index], expected) == root
    assert root.hex() == VECTORS["roots"][size]


def test_node_hash_is_prefixed() -> None:
    assert (
        node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    )
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 8, 9, 16, 17, 33, 64])
def test_every_leaf_of_every_shape_proves_to_the_root(size: int) -> None:
    leaves = [leaf_hash(i.to_bytes(2, "big")) for i in range(size)]
    root, paths = inclusion_proofs(leaves)
    assert root == merkle_root(leaves)
    for index, path in enumerate(paths):
        assert root_from_inclusion_proof(index, size, leaves[index], path) == root
        # The same proof at another index or for another leaf gives another root.
        other = leaf_hash(b"not in the tree")
        assert root_from_inclusion_proof(index, size, other, path) != root
        if size > 1:
            wrong_index = (index + 1) % size
            # A path of the wrong length for that index is also a rejection.
            with contextlib.suppress(MerkleError):
                assert root_from_inclusion_proof(wrong_index, size, leaves[index], path) != root


def test_batch_of_one_root_is_the_leaf() -> None:
    leaf = leaf_hash(b"only")
    root, paths = inclusion_proofs([leaf])
    assert root == leaf
    assert paths == [()]
    assert root_from_inclusion_proof(0, 1, leaf, ()) == leaf


@pytest.mark.parametrize(
    ("index", "size", "path_len"),
    [
        (0, 0, 0),  # empty tree
        (4, 4, 2),  # index outside the tree
        (0, 4, 1),  # too short
        (0, 4, 3),  # too long
        (0, 1, 1),  # a batch of one has an empty path
    ],
)
def test_structurally_impossible_proofs_raise(index: int, size: int, path_len: int) -> None:
    with pytest.raises(MerkleError):
        root_from_inclusion_proof(index, size, LEAVES[0], [LEAVES[1]] * path_len)


def test_path_nodes_must_be_hash_sized() -> None:
    leaves = LEAVES[:2]
    with pytest.raises(MerkleError):
        root_from_inclusion_proof(0, 2, leaves[0], [leaves[1][:31]])


def test_a_proof_from_another_tree_does_not_reach_this_root() -> None:
    first = [leaf_hash(bytes([i])) for i in range(8)]
    second = [leaf_hash(bytes([i, 1])) for i in range(8)]
    root1, _ = inclusion_proofs(first)
    _, paths2 = inclusion_proofs(second)
    assert root_from_inclusion_proof(3, 8, second[3], paths2[3]) != root1
