"""Directory heads: the root's numbered commitment to the whole record set, record sets and
scopes, and how records and heads travel on the Kafka key topic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cbor2

from fleetbus.bus.directory.records import (
    HEAD_FORMAT,
    HEAD_KAFKA_KEY,
    HEAD_SIGNING_PREFIX,
    SET_DIGEST_PREFIX,
    KeyRecord,
    SignedKeyRecord,
    _loads,
    _malformed,
    canonical_cbor,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import (
    Verifier,
)
from fleetbus.bus.topics import kafka_partition

if TYPE_CHECKING:
    from fleetbus.bus.directory.trust import RootPublicKey


# --- directory head: the root's commitment to the whole record set ---------------------------


def record_set(record: KeyRecord, vehicle_buckets: int) -> int:
    """The set a record belongs to: 0 for every non-vehicle key, ``1 + bucket`` for vehicles.

    Set 0 is what every process needs (sealers, dispatchers, approvers, edge units); a vehicle's
    bucket is Kafka's default partition of its id over ``vehicle_buckets`` partitions, so all
    versions of one vehicle land in one set, and with as many buckets as partitions, bucket ``i``
    is exactly the vehicles of partition ``i`` of every topic keyed by vehicle id.
    """
    return principal_set(record.principal_id, record.kind, vehicle_buckets)


def principal_set(principal_id: str, kind: str, vehicle_buckets: int) -> int:
    """``record_set`` from a record's principal id and kind alone."""
    if kind != "vehicle":
        return 0
    return 1 + kafka_partition(principal_id.encode(), vehicle_buckets)


def peek_record(value: bytes) -> tuple[str, str] | None:
    """``(principal id, kind)`` named by a signed record's bytes, unchecked (None: not a
    readable record). Only for skipping records outside a scope: a skipped record has no
    effect, so a lie here can only make its own record ignored."""
    try:  # lenient on purpose (not bus.cbor): whatever it cannot read is parsed strictly later
        inner = cbor2.loads(cbor2.loads(value)["record"])
        principal, kind = inner["principal"], inner["kind"]
    except Exception:
        return None
    if not isinstance(principal, str) or not isinstance(kind, str):
        return None
    return principal, kind


@dataclass(frozen=True)
class DirectoryScope:
    """Which record sets a process holds: set 0 always, vehicle buckets ``buckets`` (None: all).

    ``own`` names principals whose records are kept although their set is not held (a vehicle
    agent's own vehicles, for group membership): they are checked by the root signature and
    revocation stickiness, not against the head, because checking a set needs all of it.
    """

    buckets: frozenset[int] | None = None
    own: frozenset[str] = frozenset()

    def holds(self, index: int) -> bool:
        return index == 0 or self.buckets is None or index - 1 in self.buckets


#: Everything (the root holder, tools, a single-process deployment).
WHOLE_DIRECTORY = DirectoryScope()


def vehicle_agent_scope(vehicle_ids: Iterable[str]) -> DirectoryScope:
    """Set 0 (root, sealers, dispatchers, approvers, edge units) plus the agent's own vehicles:
    never other vehicles' records, whatever the fleet's size."""
    return DirectoryScope(buckets=frozenset(), own=frozenset(vehicle_ids))


def record_digest(record: KeyRecord) -> bytes:
    """SHA-256 of the canonical record: what a head commits to (not the randomized signature)."""
    return hashlib.sha256(record.to_cbor()).digest()


def set_digest(entries: Iterable[tuple[str, bytes]]) -> bytes:
    """Digest of one record set: SHA-256 over the sorted ``[key_id, record digest]`` pairs."""
    # Tuples sort and encode (as CBOR arrays) as the pairs do, without a list per pair.
    pairs = sorted((key_id, digest) for key_id, digest in entries)
    return hashlib.sha256(SET_DIGEST_PREFIX + canonical_cbor(pairs)).digest()


@dataclass(frozen=True)
class DirectoryHead:
    """Sequence ``seq`` of the directory: ``(count, digest)`` of every record set.

    ``sets[0]`` is the non-vehicle set, ``sets[1 + i]`` vehicle bucket ``i``. The root signs a new
    head with ``seq + 1`` for every change; loaders never accept a lower ``seq`` than they have.
    """

    seq: int
    issued_at: float
    vehicle_buckets: int
    sets: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 1:
            raise _malformed("head: seq must be an integer >= 1")
        buckets = self.vehicle_buckets
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise _malformed("head: vehicle_buckets must be an integer >= 1")
        if len(self.sets) != 1 + buckets:
            raise _malformed("head: expected one set digest per bucket plus the common set")
        for count, digest in self.sets:
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise _malformed("head: set counts must be integers >= 0")
            if not isinstance(digest, bytes) or len(digest) != 32:
                raise _malformed("head: set digests must be 32 bytes")

    @property
    def record_count(self) -> int:
        return sum(count for count, _ in self.sets)

    def to_map(self) -> dict[str, Any]:
        return {
            "fmt": HEAD_FORMAT,
            "seq": self.seq,
            "at": float(self.issued_at),
            "buckets": self.vehicle_buckets,
            "sets": [[count, digest] for count, digest in self.sets],
        }

    def to_cbor(self) -> bytes:
        return canonical_cbor(self.to_map())

    @classmethod
    def from_cbor(cls, data: bytes) -> DirectoryHead:
        doc = _loads(data, "head")
        if not isinstance(doc, dict) or set(doc) != {"fmt", "seq", "at", "buckets", "sets"}:
            raise _malformed("head: unexpected or missing fields")
        if doc["fmt"] != HEAD_FORMAT:
            raise FleetbusError("head: unsupported format", reason=ReasonCode.UNSUPPORTED_VERSION)
        if not isinstance(doc["at"], float):
            raise _malformed("head: at must be a float")
        sets = doc["sets"]
        if not isinstance(sets, list) or not all(
            isinstance(item, list) and len(item) == 2 for item in sets
        ):
            raise _malformed("head: sets must be a list of [count, digest]")
        head = cls(doc["seq"], doc["at"], doc["buckets"], tuple((c, d) for c, d in sets))
        if head.to_cbor() != bytes(data):
            raise _malformed("head: not in canonical CBOR form")
        return head


def build_head(
    records: Iterable[KeyRecord], *, seq: int, at: float, vehicle_buckets: int
) -> DirectoryHead:
    """The head committing to exactly ``records`` (one merged record per key id)."""
    entries: list[list[tuple[str, bytes]]] = [[] for _ in range(1 + vehicle_buckets)]
    seen: set[str] = set()
    for record in records:
        if record.key_id in seen:
            raise _malformed(f"head: key id {record.key_id} appears twice; merge records first")
        seen.add(record.key_id)
        entries[record_set(record, vehicle_buckets)].append((record.key_id, record_digest(record)))
    sets = tuple((len(items), set_digest(items)) for items in entries)
    return DirectoryHead(seq, float(at), vehicle_buckets, sets)


@dataclass(frozen=True)
class SignedDirectoryHead:
    """A head plus the fleet root's signature over ``HEAD_SIGNING_PREFIX || head_cbor``."""

    head: DirectoryHead
    signature: bytes = field(repr=False)
    root_key_id: str

    def to_cbor(self) -> bytes:
        return canonical_cbor(
            {
                "fmt": HEAD_FORMAT,
                "head": self.head.to_cbor(),
                "sig": self.signature,
                "root_kid": self.root_key_id,
            }
        )

    @classmethod
    def from_map(cls, outer: Any) -> SignedDirectoryHead:
        if not isinstance(outer, dict) or set(outer) != {"fmt", "head", "sig", "root_kid"}:
            raise _malformed("signed head: unexpected or missing fields")
        if outer["fmt"] != HEAD_FORMAT:
            raise FleetbusError(
                "signed head: unsupported format", reason=ReasonCode.UNSUPPORTED_VERSION
            )
        if not isinstance(outer["head"], bytes) or not isinstance(outer["sig"], bytes):
            raise _malformed("signed head: head and sig must be bytes")
        if not isinstance(outer["root_kid"], str):
            raise _malformed("signed head: root_kid must be text")
        return cls(DirectoryHead.from_cbor(outer["head"]), outer["sig"], outer["root_kid"])

    @classmethod
    def from_cbor(cls, data: bytes) -> SignedDirectoryHead:
        signed = cls.from_map(_loads(data, "signed head"))
        if signed.to_cbor() != bytes(data):
            raise _malformed("signed head: not in canonical CBOR form")
        return signed


def head_signing_input(head: DirectoryHead) -> bytes:
    return HEAD_SIGNING_PREFIX + head.to_cbor()


def verify_signed_head(
    signed: SignedDirectoryHead, root: RootPublicKey, verifier: Verifier | None = None
) -> DirectoryHead:
    """Check the root signature over a head (``verifier``: the root's, if already parsed);
    raise BAD_SIGNATURE."""
    if signed.root_key_id != root.key_id or not (verifier or root.verifier()).verify(
        head_signing_input(signed.head), signed.signature
    ):
        raise FleetbusError(
            "directory head is not signed by the fleet root", reason=ReasonCode.BAD_SIGNATURE
        )
    return signed.head


# --- Kafka compacted topic -----------------------------------------------------------------


def kafka_key(record: KeyRecord) -> bytes:
    """``principal_id/key_id``: compaction keeps the latest state of every key, not just one."""
    return f"{record.principal_id}/{record.key_id}".encode()


def to_kafka(signed: SignedKeyRecord) -> tuple[bytes, bytes]:
    """``(key, value)`` for the key-directory topic; value is the canonical signed record."""
    return kafka_key(signed.record), signed.to_cbor()


def head_to_kafka(signed: SignedDirectoryHead) -> tuple[bytes, bytes]:
    """``(key, value)`` of a head: one Kafka key, so compaction keeps the newest head."""
    return HEAD_KAFKA_KEY, signed.to_cbor()


def from_kafka(value: bytes | None) -> SignedKeyRecord | SignedDirectoryHead:
    """Parse a topic value: a signed record or a signed head (told apart by their fields).

    A tombstone (None / empty) is malformed: revocation is a record, never a deletion.
    """
    if not value:
        raise _malformed("key directory: tombstones are not used; revocation is a signed record")
    outer = _loads(value, "key topic value")
    if isinstance(outer, dict) and "head" in outer:
        signed_head = SignedDirectoryHead.from_map(outer)
        if signed_head.to_cbor() != bytes(value):
            raise _malformed("signed head: not in canonical CBOR form")
        return signed_head
    return SignedKeyRecord.from_cbor(value)
