"""The key directory: root-signed key records for every principal, and the fleet root of trust.

A hybrid fleet root key (composite ML-DSA-65 + Ed25519) signs one ``KeyRecord`` per principal key;
vehicles pin the root public key. Rotation and revocation are records too. Records travel on a
Kafka compacted topic keyed by ``principal_id/key_id``; revocation is never a tombstone. A
root-signed, monotonically numbered ``DirectoryHead`` commits to the whole record set, so older
signed material (a record from before its revocation, an older file) cannot be replayed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cbor2

from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.bus.keys import (
    KeyAlgorithm,
    PrivateKeySet,
    RecipientKeys,
    Signer,
    Verifier,
)
from fleetbus.bus.registry import (
    is_kem_algorithm,
    kem_provider_for_algorithm,
    kem_providers,
    key_provider_traits,
    load_key_provider,
    load_signature_suite,
)

#: The principal kinds a record may name.
KINDS = frozenset({"dispatcher", "sealer", "vehicle", "edge", "approver", "root"})
SIGNATURE_ALGORITHMS = (KeyAlgorithm.ED25519.value, KeyAlgorithm.MLDSA65.value)
#: Signature algorithms that resist a quantum adversary (for the automatic "pqc" capability);
#: which KEM keys do is each key provider's declared trait (``fleetbus.bus.registry``).
POST_QUANTUM_SIGNATURE_ALGORITHMS = frozenset({KeyAlgorithm.MLDSA65.value})
ROOT_SUITE = "composite-mldsa65-ed25519"
RECORD_FORMAT = 1
#: Domain separation: the root signs ``RECORD_SIGNING_PREFIX || canonical CBOR(record)``.
RECORD_SIGNING_PREFIX = b"fleetbus/key-directory/record/v1\x00"
#: Domain separation: the root signs ``HEAD_SIGNING_PREFIX || canonical CBOR(head)``.
HEAD_SIGNING_PREFIX = b"fleetbus/key-directory/head/v1\x00"
#: Domain separation of a record set's digest inside a head.
SET_DIGEST_PREFIX = b"fleetbus/key-directory/set/v1\x00"
HEAD_FORMAT = 1
#: The Kafka key of the head on the key topic; record keys always contain a ``/``.
HEAD_KAFKA_KEY = b"head"
#: Vehicle records are split into this many sets (a head may choose another count): a process
#: that holds only some vehicles' records can still check them whole against the head.
DEFAULT_VEHICLE_BUCKETS = 16
DIRECTORY_FILE_FORMAT = "fleetbus-directory/v2"
#: The files of a ``fleetbus keys`` folder (``root.key`` 0600 and ``<principal>.key`` 0600 hold
#: private keys; ``root.pub`` is the pinned root; ``directory.cbor`` the signed head and records).
ROOT_KEY = "root.key"
ROOT_PUB = "root.pub"
DIRECTORY = "directory.cbor"
ROOT_PUBLIC_FORMAT = "fleetbus-root-public/v1"
PRIVATE_KEY_FORMAT = "fleetbus-private-key/v1"
_KNOWN_ALGORITHMS = frozenset(a.value for a in KeyAlgorithm)
RECORD_FIELDS = frozenset(
    {"fmt", "principal", "kind", "version", "kid", "keys", "suite", "caps", "sae", "nbf", "naf"}
    | {"revoked", "revoked_at", "groups", "overlap"}
)


def _malformed(message: str) -> FleetbusError:
    return FleetbusError(message, reason=ReasonCode.MALFORMED)


def canonical_cbor(value: Any) -> bytes:
    """Deterministic CBOR (RFC 8949 canonical ordering, smallest float/int encodings)."""
    return cbor2.dumps(value, canonical=True)


def _loads(data: bytes, what: str) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _malformed(f"{what}: expected bytes")
    try:
        return cbor2.loads(bytes(data), allow_duplicate_keys=False, allow_indefinite=False)
    except Exception as exc:
        raise _malformed(f"{what}: not valid CBOR ({type(exc).__name__})") from None


def derive_key_id(public_keys: Mapping[str, bytes]) -> str:
    """A stable id for a set of public keys: ``k`` + 32 hex digits of SHA-256 over their CBOR."""
    digest = hashlib.sha256(canonical_cbor({k: bytes(v) for k, v in public_keys.items()}))
    return "k" + digest.hexdigest()[:32]


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRecord:
    """One key of one principal, as the fleet root vouches for it.

    ``overlap_s`` is how long, after this record's ``not_before``, the principal's previous
    versions stay valid for *verification* (the rotation overlap window).
    """

    principal_id: str
    kind: str
    version: int
    key_id: str
    public_keys: dict[str, bytes] = field(repr=False)
    signature_suite: str
    capabilities: frozenset[str] = frozenset()
    qkd_sae_id: str | None = None
    not_before: float = 0.0
    not_after: float = math.inf
    revoked: bool = False
    revoked_at: float | None = None
    groups: frozenset[str] = frozenset()
    overlap_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.principal_id or not isinstance(self.principal_id, str):
            raise _malformed("record: principal_id must be a non-empty string")
        if "/" in self.principal_id:
            raise _malformed("record: principal_id must not contain '/'")
        if self.kind not in KINDS:
            raise _malformed(f"record: unknown kind {self.kind!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise _malformed("record: version must be an integer >= 1")
        if not (self.not_before < self.not_after):
            raise _malformed("record: not_before must be before not_after")
        if self.overlap_s < 0:
            raise _malformed("record: overlap_s must not be negative")
        if self.revoked != (self.revoked_at is not None):
            raise _malformed("record: revoked and revoked_at must come together")

    def algorithms(self) -> list[str]:
        return sorted(self.public_keys)

    def to_map(self) -> dict[str, Any]:
        """The record as a CBOR map with stable keys (what the root signs, canonically)."""
        return {
            "fmt": RECORD_FORMAT,
            "principal": self.principal_id,
            "kind": self.kind,
            "version": self.version,
            "kid": self.key_id,
            "keys": {alg: bytes(raw) for alg, raw in self.public_keys.items()},
            "suite": self.signature_suite,
            "caps": sorted(self.capabilities),
            "sae": self.qkd_sae_id,
            "nbf": float(self.not_before),
            "naf": float(self.not_after),
            "revoked": self.revoked,
            "revoked_at": None if self.revoked_at is None else float(self.revoked_at),
            "groups": sorted(self.groups),
            "overlap": float(self.overlap_s),
        }

    def to_cbor(self) -> bytes:
        return canonical_cbor(self.to_map())

    @classmethod
    def from_map(cls, data: Any) -> KeyRecord:
        if not isinstance(data, dict):
            raise _malformed("record: expected a map")
        if set(data) != RECORD_FIELDS:
            raise _malformed("record: unexpected or missing fields")
        if data["fmt"] != RECORD_FORMAT:
            raise FleetbusError(
                f"record: unsupported format {data['fmt']!r}", reason=ReasonCode.UNSUPPORTED_VERSION
            )
        keys = data["keys"]
        if not isinstance(keys, dict) or not all(
            isinstance(k, str) and isinstance(v, bytes) for k, v in keys.items()
        ):
            raise _malformed("record: keys must map algorithm names to bytes")
        if not set(keys) <= _KNOWN_ALGORITHMS:
            raise _malformed("record: unknown key algorithm")
        for name in ("principal", "kind", "kid", "suite"):
            if not isinstance(data[name], str):
                raise _malformed(f"record: {name} must be text")
        for name in ("caps", "groups"):
            if not isinstance(data[name], list) or not all(isinstance(x, str) for x in data[name]):
                raise _malformed(f"record: {name} must be a list of text")
        if data["sae"] is not None and not isinstance(data["sae"], str):
            raise _malformed("record: sae must be text or null")
        if not isinstance(data["revoked"], bool):
            raise _malformed("record: revoked must be a boolean")
        for name in ("nbf", "naf", "overlap"):
            if not isinstance(data[name], float):
                raise _malformed(f"record: {name} must be a float")
        if data["revoked_at"] is not None and not isinstance(data["revoked_at"], float):
            raise _malformed("record: revoked_at must be a float or null")
        if isinstance(data["version"], bool) or not isinstance(data["version"], int):
            raise _malformed("record: version must be an integer")
        return cls(
            principal_id=data["principal"],
            kind=data["kind"],
            version=data["version"],
            key_id=data["kid"],
            public_keys=dict(keys),
            signature_suite=data["suite"],
            capabilities=frozenset(data["caps"]),
            qkd_sae_id=data["sae"],
            not_before=data["nbf"],
            not_after=data["naf"],
            revoked=data["revoked"],
            revoked_at=data["revoked_at"],
            groups=frozenset(data["groups"]),
            overlap_s=data["overlap"],
        )

    @classmethod
    def from_cbor(cls, data: bytes) -> KeyRecord:
        record = cls.from_map(_loads(data, "record"))
        if record.to_cbor() != bytes(data):
            raise _malformed("record: not in canonical CBOR form")
        return record

    def revocation(self, *, at: float) -> KeyRecord:
        """The revocation record for this key (same key id and version, ``revoked=True``)."""
        return replace(self, revoked=True, revoked_at=float(at))


@dataclass(frozen=True)
class SignedKeyRecord:
    """A record plus the fleet root's signature over ``RECORD_SIGNING_PREFIX || record_cbor``."""

    record: KeyRecord
    signature: bytes = field(repr=False)
    root_key_id: str
    #: The record's canonical CBOR as parsed or signed (None: encode it when needed). Hashing
    #: and verifying these bytes instead of re-encoding the record saves most of a load's time.
    #: Not an init field, so ``dataclasses.replace`` (a changed record) never carries it over.
    encoded: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def encoded_as(
        cls, record: KeyRecord, signature: bytes, root_key_id: str, encoded: bytes
    ) -> SignedKeyRecord:
        """A signed record whose ``encoded`` is ``record``'s canonical CBOR (the caller knows)."""
        signed = cls(record, signature, root_key_id)
        object.__setattr__(signed, "encoded", encoded)
        return signed

    @property
    def record_cbor(self) -> bytes:
        return self.record.to_cbor() if self.encoded is None else self.encoded

    def to_cbor(self) -> bytes:
        return canonical_cbor(
            {
                "fmt": RECORD_FORMAT,
                "record": self.record_cbor,
                "sig": self.signature,
                "root_kid": self.root_key_id,
            }
        )

    @classmethod
    def from_cbor(cls, data: bytes) -> SignedKeyRecord:
        outer = _loads(data, "signed record")
        if not isinstance(outer, dict) or set(outer) != {"fmt", "record", "sig", "root_kid"}:
            raise _malformed("signed record: unexpected or missing fields")
        if outer["fmt"] != RECORD_FORMAT:
            raise FleetbusError(
                "signed record: unsupported format", reason=ReasonCode.UNSUPPORTED_VERSION
            )
        if not isinstance(outer["record"], bytes) or not isinstance(outer["sig"], bytes):
            raise _malformed("signed record: record and sig must be bytes")
        if not isinstance(outer["root_kid"], str):
            raise _malformed("signed record: root_kid must be text")
        record = KeyRecord.from_cbor(outer["record"])  # checks that the bytes are canonical
        signed = cls.encoded_as(record, outer["sig"], outer["root_kid"], outer["record"])
        if signed.to_cbor() != bytes(data):
            raise _malformed("signed record: not in canonical CBOR form")
        return signed


def signing_input(record: KeyRecord) -> bytes:
    return RECORD_SIGNING_PREFIX + record.to_cbor()


# --- directory head: the root's commitment to the whole record set ---------------------------


def record_set(record: KeyRecord, vehicle_buckets: int) -> int:
    """The set a record belongs to: 0 for every non-vehicle key, ``1 + bucket`` for vehicles.

    Set 0 is what every process needs (sealers, dispatchers, approvers, edge units); a vehicle's
    bucket is a hash of its principal id, so all versions of one vehicle land in one set.
    """
    return principal_set(record.principal_id, record.kind, vehicle_buckets)


def principal_set(principal_id: str, kind: str, vehicle_buckets: int) -> int:
    """``record_set`` from a record's principal id and kind alone."""
    if kind != "vehicle":
        return 0
    digest = hashlib.sha256(principal_id.encode()).digest()
    return 1 + int.from_bytes(digest[:8], "big") % vehicle_buckets


def peek_record(value: bytes) -> tuple[str, str] | None:
    """``(principal id, kind)`` named by a signed record's bytes, unchecked (None: not a
    readable record). Only for skipping records outside a scope: a skipped record has no
    effect, so a lie here can only make its own record ignored."""
    try:
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
    pairs = sorted([key_id, digest] for key_id, digest in entries)
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


# --- root of trust -------------------------------------------------------------------------


@dataclass(frozen=True)
class RootPublicKey:
    """The fleet root's public key(s), pinned by vehicles and every verifier of records."""

    key_id: str
    suite: str
    public_keys: dict[str, bytes]

    def verifier(self) -> Verifier:
        return load_signature_suite(self.suite).verifier(self.public_keys)

    def to_bytes(self) -> bytes:
        return canonical_cbor(
            {
                "fmt": ROOT_PUBLIC_FORMAT,
                "kid": self.key_id,
                "suite": self.suite,
                "keys": dict(self.public_keys),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RootPublicKey:
        outer = _loads(data, "root public key")
        if not isinstance(outer, dict) or set(outer) != {"fmt", "kid", "suite", "keys"}:
            raise _malformed("root public key: unexpected or missing fields")
        if outer["fmt"] != ROOT_PUBLIC_FORMAT:
            raise _malformed("root public key: unknown format")
        keys = outer["keys"]
        if not isinstance(keys, dict) or not all(
            isinstance(k, str) and isinstance(v, bytes) for k, v in keys.items()
        ):
            raise _malformed("root public key: keys must map algorithm names to bytes")
        if not isinstance(outer["kid"], str) or not isinstance(outer["suite"], str):
            raise _malformed("root public key: kid and suite must be text")
        if derive_key_id(keys) != outer["kid"]:
            raise _malformed("root public key: key id does not match the keys")
        return cls(outer["kid"], outer["suite"], dict(keys))


class FleetRoot:
    """The fleet root key (hybrid by default): signs key-directory records."""

    def __init__(self, private_keys: Mapping[str, bytes], public: RootPublicKey) -> None:
        self._signer: Signer = load_signature_suite(public.suite).signer(
            private_keys, public.key_id
        )
        self._private_keys = dict(private_keys)
        self.public = public

    @classmethod
    def generate(cls, suite: str = ROOT_SUITE) -> FleetRoot:
        private, public = load_signature_suite(suite).generate()
        return cls(private, RootPublicKey(derive_key_id(public), suite, public))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, record: KeyRecord) -> SignedKeyRecord:
        encoded = record.to_cbor()
        signature = self._signer.sign(RECORD_SIGNING_PREFIX + encoded)
        return SignedKeyRecord.encoded_as(record, signature, self.key_id, encoded)

    def sign_head(self, head: DirectoryHead) -> SignedDirectoryHead:
        return SignedDirectoryHead(head, self._signer.sign(head_signing_input(head)), self.key_id)

    def key_file(self) -> PrincipalKeyFile:
        return PrincipalKeyFile(
            principal_id="root",
            kind="root",
            key_id=self.key_id,
            signature_suite=self.public.suite,
            private_keys=dict(self._private_keys),
            public_keys=dict(self.public.public_keys),
        )

    @classmethod
    def from_key_file(cls, key_file: PrincipalKeyFile) -> FleetRoot:
        public = RootPublicKey(key_file.key_id, key_file.signature_suite, key_file.public_keys)
        if derive_key_id(public.public_keys) != public.key_id:
            raise _malformed("root key file: key id does not match the public keys")
        return cls(key_file.private_keys, public)

    def __repr__(self) -> str:
        return f"FleetRoot(key_id={self.key_id!r}, suite={self.public.suite!r})"


def verify_signed_record(
    signed: SignedKeyRecord, root: RootPublicKey, verifier: Verifier | None = None
) -> KeyRecord:
    """Check the root signature (``verifier``: the root's, if already parsed) and the key id;
    raise BAD_SIGNATURE / MALFORMED."""
    if signed.root_key_id != root.key_id or not (verifier or root.verifier()).verify(
        RECORD_SIGNING_PREFIX + signed.record_cbor, signed.signature
    ):
        raise FleetbusError(
            f"key record for {signed.record.principal_id!r} is not signed by the fleet root",
            reason=ReasonCode.BAD_SIGNATURE,
        )
    if derive_key_id(signed.record.public_keys) != signed.record.key_id:
        raise _malformed("key record: key id does not match its public keys")
    return signed.record


# --- the directory -------------------------------------------------------------------------


class KeyDirectory:
    """Verified key records, with rotation overlap, immediate revocation and expiry.

    A directory is *anchored* once it has a head (from a file, the key topic, or ``head_store``,
    which also keeps the highest accepted head across restarts), once it reads the key topic, or
    with ``require_head``. An anchored directory answers only from record sets whose records
    match the current head exactly; a set that does not match (records missing, or replayed
    older records) raises ``DIRECTORY_ROLLBACK`` until it does. A revocation is in force as soon
    as it is verified, head or not. Unanchored (a root holder building records in memory), every
    verified record is used.

    ``scope`` limits what is held: a record of a set outside it is neither verified nor kept
    (``ingest`` returns None) and its keys are unknown here, and only held sets must match the
    head. Readers and the one writer (a key-topic follower) may be on different threads.
    """

    def __init__(
        self,
        root: RootPublicKey,
        *,
        head_store: HeadStore | None = None,
        require_head: bool = False,
        scope: DirectoryScope = WHOLE_DIRECTORY,
    ) -> None:
        self.root = root
        self.scope = scope
        self._lock = threading.RLock()
        self._root_verifier = root.verifier()
        self._by_key_id: dict[str, SignedKeyRecord] = {}
        self._by_principal: dict[str, set[str]] = {}
        # Parsing public keys costs more than a signature check; a key id names one set of
        # public keys (it is their hash, checked on ingest), so its verifier never changes.
        self._verifiers: dict[str, Verifier] = {}
        self._digests: dict[str, bytes] = {}
        self._signed_head: SignedDirectoryHead | None = None
        self._anchored = require_head or head_store is not None
        self._store = head_store
        self._buckets = DEFAULT_VEHICLE_BUCKETS
        self._members: dict[int, set[str]] = {}
        self._index: dict[str, int] = {}  # key id -> its set (a hash per vehicle: cache it)
        # Sets whose records matched the current head, as they were then; a set whose records
        # changed since is re-checked lazily (at the next lookup), so a burst of records costs
        # one digest per set, not one per record.
        self._accepted: dict[int, dict[str, SignedKeyRecord]] = {}
        self._dirty: set[int] = set()
        if head_store is not None:
            stored = head_store.load(root)
            if stored is not None:
                self._set_head(stored)

    @property
    def head(self) -> DirectoryHead | None:
        """The highest head accepted (None: no head yet)."""
        return None if self._signed_head is None else self._signed_head.head

    @property
    def signed_head(self) -> SignedDirectoryHead | None:
        return self._signed_head

    def holds(self, record: KeyRecord) -> bool:
        """Whether ``record`` is in this directory's scope (its set, or one of ``scope.own``)."""
        return self.wants(record.principal_id, record.kind)

    def wants(self, principal_id: str, kind: str) -> bool:
        """Whether a record of ``principal_id`` of ``kind`` would be in this directory's scope."""
        if self.scope.buckets is None or principal_id in self.scope.own or kind != "vehicle":
            return True
        return bool(self.scope.buckets) and self.scope.holds(
            principal_set(principal_id, kind, self._buckets)
        )

    def ingest(self, signed: SignedKeyRecord) -> KeyRecord | None:
        """Verify and merge a record; revocation is sticky, a higher version of a key wins.

        In an anchored directory a record the current head does not cover is held, without
        effect, until a head covers it (records are published before their head). A record
        outside ``scope`` is ignored (None), unverified.
        """
        with self._lock:
            if not self.holds(signed.record):
                return None
            existing = self._by_key_id.get(signed.record.key_id)
            if existing is not None and existing == signed:
                # Already verified, byte for byte (re-reading the topic from its start).
                return existing.record
            return self._merge(verify_signed_record(signed, self.root, self._root_verifier), signed)

    def ingest_committed(
        self, records: Iterable[SignedKeyRecord], signed_head: SignedDirectoryHead
    ) -> None:
        """Bulk-load ``records`` under the head that covers them (a directory file).

        The head is verified first. A held set whose records match it exactly is authenticated
        by the head — the root signed the digest of each of its records — so its records are
        not verified one by one (that is most of a large fleet's start-up time). The records of
        a set that does not match, and ``scope.own`` records outside the held sets, are
        verified one by one as ``ingest`` does; a set that does not match stays refused.
        """
        with self._lock:
            head = verify_signed_head(signed_head, self.root, self._root_verifier)
            buckets = head.vehicle_buckets
            by_set: dict[int, dict[str, tuple[SignedKeyRecord, bytes]]] = {}
            for signed in records:
                record = signed.record
                index = record_set(record, buckets)
                if self.scope.holds(index) or record.principal_id in self.scope.own:
                    digest = hashlib.sha256(signed.record_cbor).digest()
                    by_set.setdefault(index, {})[record.key_id] = (signed, digest)
            for index, items in sorted(by_set.items()):
                count, expected = head.sets[index]
                committed = (
                    buckets == self._buckets
                    and self.scope.holds(index)
                    and not self._members.get(index)
                    and len(items) == count
                    and hmac.compare_digest(
                        set_digest((k, d) for k, (_, d) in items.items()), expected
                    )
                )
                for signed, digest in items.values():
                    if committed:
                        self._merge(signed.record, signed, digest=digest, index=index)
                    else:
                        self.ingest(signed)

    def _merge(
        self,
        record: KeyRecord,
        signed: SignedKeyRecord,
        *,
        digest: bytes | None = None,
        index: int | None = None,
    ) -> KeyRecord:
        existing = self._by_key_id.get(record.key_id)
        if existing is not None:
            old = existing.record
            if old.principal_id != record.principal_id:
                raise _malformed(f"key id {record.key_id} already belongs to another principal")
            if old.revoked:
                return old
            if not (record.revoked or record.version > old.version):
                return old
            self._members[self._index[old.key_id]].discard(old.key_id)
            self._dirty.add(self._index[old.key_id])
        self._by_key_id[record.key_id] = signed
        self._by_principal.setdefault(record.principal_id, set()).add(record.key_id)
        self._digests[record.key_id] = digest or hashlib.sha256(signed.record_cbor).digest()
        if index is None:
            index = record_set(record, self._buckets)
        self._index[record.key_id] = index
        self._members.setdefault(index, set()).add(record.key_id)
        self._dirty.add(index)
        return record

    def ingest_head(self, signed: SignedDirectoryHead) -> DirectoryHead:
        """Verify and accept a head; one older than the highest accepted is DIRECTORY_ROLLBACK.

        The same ``seq`` is accepted again only with the same content: two different heads with
        one sequence number mean the root's history forked (an issuing folder restored from an
        old copy), and neither can be trusted over the other.
        """
        with self._lock:
            return self._ingest_head(signed)

    def _ingest_head(self, signed: SignedDirectoryHead) -> DirectoryHead:
        head = verify_signed_head(signed, self.root, self._root_verifier)
        current = self.head
        if current is not None:
            if head.seq < current.seq:
                raise FleetbusError(
                    f"directory head {head.seq} is older than head {current.seq} already "
                    "accepted: refusing rolled-back key material",
                    reason=ReasonCode.DIRECTORY_ROLLBACK,
                )
            if head.seq == current.seq:
                if head.to_cbor() != current.to_cbor():
                    raise FleetbusError(
                        f"two different directory heads carry seq {head.seq}: the issuing "
                        "root's history forked",
                        reason=ReasonCode.DIRECTORY_ROLLBACK,
                    )
                return current
        self._set_head(signed)
        if self._store is not None:
            self._store.save(signed)
        return head

    def _set_head(self, signed: SignedDirectoryHead) -> None:
        previous = self.head
        head = signed.head
        self._signed_head = signed
        self._anchored = True
        if head.vehicle_buckets != self._buckets:
            self._buckets = head.vehicle_buckets
            self._members = {}
            for key_id, stored in self._by_key_id.items():
                index = self._index[key_id] = record_set(stored.record, self._buckets)
                self._members.setdefault(index, set()).add(key_id)
            self._accepted = {}
            self._dirty = set(range(1 + head.vehicle_buckets))
        else:
            for index in range(1 + head.vehicle_buckets):
                if previous is None or previous.sets[index] != head.sets[index]:
                    self._accepted.pop(index, None)
                    self._dirty.add(index)
        # Settle now what already matches, so records that arrive after this head are held
        # (not used) rather than making their set unusable until the next head.
        for index in sorted(self._dirty):
            if self.scope.holds(index):
                self._settle(index)

    def _settle(self, index: int) -> dict[str, SignedKeyRecord] | None:
        """The records of set ``index`` that match the current head, or None if they do not."""
        head = self.head
        if head is None:
            return None
        if index in self._dirty:
            self._dirty.discard(index)
            members = self._members.get(index, set())
            count, digest = head.sets[index]
            if len(members) == count and hmac.compare_digest(
                set_digest((k, self._digests[k]) for k in members), digest
            ):
                self._accepted[index] = {k: self._by_key_id[k] for k in members}
        return self._accepted.get(index)

    def unsettled_sets(self) -> list[int]:
        """Sets whose records do not match the current head (all of them when there is none)."""
        with self._lock:
            head = self.head
            buckets = self._buckets if head is None else head.vehicle_buckets
            held = [i for i in range(1 + buckets) if self.scope.holds(i)]
            if head is None:
                return held
            return [i for i in held if self._settle(i) is None]

    def compute_head(self, *, seq: int, at: float, vehicle_buckets: int) -> DirectoryHead:
        """The head over every verified record held (for the root holder signing the next one);
        uses the record digests computed on ingest."""
        if self.scope != WHOLE_DIRECTORY:
            raise ConfigError("only a directory holding every record can compute a head")
        entries: list[list[tuple[str, bytes]]] = [[] for _ in range(1 + vehicle_buckets)]
        for key_id, signed in self._by_key_id.items():
            index = (
                self._index[key_id]
                if vehicle_buckets == self._buckets
                else record_set(signed.record, vehicle_buckets)
            )
            entries[index].append((key_id, self._digests[key_id]))
        sets = tuple((len(items), set_digest(items)) for items in entries)
        return DirectoryHead(seq, float(at), vehicle_buckets, sets)

    def _usable(self, key_id: str) -> SignedKeyRecord | None:
        with self._lock:
            return self._usable_locked(key_id)

    def _usable_locked(self, key_id: str) -> SignedKeyRecord | None:
        signed = self._by_key_id.get(key_id)
        if signed is None or not self._anchored or signed.record.revoked:
            return signed
        index = self._index[key_id]
        if not self.scope.holds(index):
            return signed  # one of scope.own: verified by signature, not against the head
        accepted = self._settle(index)
        if accepted is None:
            seq = "none" if self.head is None else str(self.head.seq)
            raise FleetbusError(
                f"key records of set {index} do not match directory head {seq} (records missing "
                "or replayed from before a newer head); refusing their keys",
                reason=ReasonCode.DIRECTORY_ROLLBACK,
            )
        return accepted.get(key_id)

    def ingest_kafka(
        self, value: bytes | None, key: bytes | None = None
    ) -> KeyRecord | DirectoryHead | None:
        """Ingest one value of the key topic (a record or a head); ``key``, if given, must match.

        The topic is untrusted storage (compaction, re-publication): reading it anchors the
        directory, so nothing read from it is used until a head covers it.
        """
        self._anchored = True
        if key is not None and value:
            # Re-reading the topic from its start (every restart): a value identical to the
            # record held under its key id was parsed and verified before.
            held = self._by_key_id.get(bytes(key).rpartition(b"/")[2].decode(errors="replace"))
            if (
                held is not None
                and kafka_key(held.record) == bytes(key)
                and held.to_cbor() == bytes(value)
            ):
                return held.record
        if value and self.scope.buckets is not None and bytes(key or b"") != HEAD_KAFKA_KEY:
            # Outside the scope: skipped before parsing (a vehicle agent reading a fleet's topic).
            named = peek_record(bytes(value))
            if named is not None and not self.wants(*named):
                return None
        item = from_kafka(value)
        expected = (
            HEAD_KAFKA_KEY if isinstance(item, SignedDirectoryHead) else kafka_key(item.record)
        )
        if key is not None and bytes(key) != expected:
            raise _malformed("key topic: the Kafka key does not name the record it carries")
        if isinstance(item, SignedDirectoryHead):
            return self.ingest_head(item)
        return self.ingest(item)

    def ingest_all(self, records: Iterable[SignedKeyRecord]) -> None:
        for signed in records:
            self.ingest(signed)

    def signed_records(self) -> list[SignedKeyRecord]:
        """Every verified record held (merged per key id), covered by the head or not yet."""
        with self._lock:
            held = list(self._by_key_id.values())
        return sorted(
            held,
            key=lambda s: (s.record.principal_id, s.record.version, s.record.key_id),
        )

    def record(self, key_id: str) -> KeyRecord | None:
        signed = self._usable(key_id)
        return None if signed is None else signed.record

    def records(self, principal_id: str | None = None) -> list[KeyRecord]:
        with self._lock:
            if principal_id is None:
                key_ids: Iterable[str] = list(self._by_key_id)
            else:
                # Only this principal's records (called per message: not a sort of the fleet).
                key_ids = list(self._by_principal.get(principal_id, ()))
        # The lock is taken per record: a thread listing the whole fleet (the policy refresh)
        # must not hold up the stages' lookups for the length of the list.
        signed = [s for s in map(self._usable, key_ids) if s is not None]
        signed.sort(key=lambda s: (s.record.principal_id, s.record.version, s.record.key_id))
        return [s.record for s in signed]

    def principals(self) -> list[str]:
        return sorted({r.principal_id for r in self.records()})

    def latest(self, principal_id: str) -> KeyRecord:
        records = self.records(principal_id)
        if not records:
            raise FleetbusError(
                f"no key record for principal {principal_id!r}", reason=ReasonCode.UNKNOWN_SIGNER
            )
        return max(records, key=lambda r: r.version)

    def superseded_at(self, record: KeyRecord) -> float:
        """When a newer version ends this one's validity (``math.inf`` if none does yet)."""
        ends = [
            newer.not_before + newer.overlap_s
            for newer in self.records(record.principal_id)
            if newer.version > record.version
        ]
        return min(ends, default=math.inf)

    def _check_valid(self, record: KeyRecord, at: float) -> None:
        if record.revoked:
            raise FleetbusError(
                f"key {record.key_id} of {record.principal_id!r} is revoked",
                reason=ReasonCode.SIGNER_REVOKED,
            )
        if at < record.not_before:
            raise FleetbusError(
                f"key {record.key_id} of {record.principal_id!r} is not valid yet",
                reason=ReasonCode.NOT_YET_VALID,
            )
        if at >= record.not_after:
            raise FleetbusError(
                f"key {record.key_id} of {record.principal_id!r} has expired",
                reason=ReasonCode.SIGNER_EXPIRED,
            )
        if at >= self.superseded_at(record):
            raise FleetbusError(
                f"key {record.key_id} of {record.principal_id!r} was rotated out",
                reason=ReasonCode.SIGNER_EXPIRED,
            )

    def verifier_for(self, principal_id: str, key_id: str, *, at: float) -> Verifier:
        """A verifier for ``principal_id``'s key ``key_id`` if it is valid at time ``at``.

        Raises ``FleetbusError`` with UNKNOWN_SIGNER, SIGNER_REVOKED, NOT_YET_VALID or
        SIGNER_EXPIRED (expired, or rotated out after the overlap window).
        """
        record = self.record(key_id)
        if record is None or record.principal_id != principal_id:
            raise FleetbusError(
                f"no key {key_id!r} for principal {principal_id!r}",
                reason=ReasonCode.UNKNOWN_SIGNER,
            )
        self._check_valid(record, at)
        verifier = self._verifiers.get(key_id)
        if verifier is None:
            suite = load_signature_suite(record.signature_suite)
            verifier = self._verifiers[key_id] = suite.verifier(record.public_keys)
        return verifier

    def current(self, principal_id: str, *, at: float) -> KeyRecord:
        """The highest-version record of ``principal_id`` that is valid at ``at``."""
        records = sorted(self.records(principal_id), key=lambda r: r.version, reverse=True)
        if not records:
            raise FleetbusError(
                f"no key record for principal {principal_id!r}", reason=ReasonCode.UNKNOWN_KEY_ID
            )
        first_error: FleetbusError | None = None
        for record in records:
            if record.revoked or not (record.not_before <= at < record.not_after):
                try:
                    self._check_valid(record, at)
                except FleetbusError as exc:
                    first_error = first_error or exc
                continue
            return record
        assert first_error is not None
        raise first_error

    def recipient_keys(self, principal_id: str, *, at: float) -> RecipientKeys:
        """What a sealer needs to encrypt to ``principal_id`` at time ``at``."""
        record = self.current(principal_id, at=at)
        kem = {alg: raw for alg, raw in record.public_keys.items() if is_kem_algorithm(alg)}
        return RecipientKeys(
            principal_id=record.principal_id,
            public_keys=kem,
            key_ids={alg: record.key_id for alg in kem},
            qkd_sae_id=record.qkd_sae_id,
            capabilities=record.capabilities,
        )


# --- issuing keys --------------------------------------------------------------------------


@dataclass(frozen=True)
class PrincipalKeyFile:
    """A principal's private keys as stored on disk (0600); ``repr`` shows no key material."""

    principal_id: str
    kind: str
    key_id: str
    signature_suite: str
    private_keys: dict[str, bytes] = field(repr=False)
    public_keys: dict[str, bytes] = field(repr=False)
    qkd_sae_id: str | None = None
    version: int = 1

    def key_set(self) -> PrivateKeySet:
        return PrivateKeySet(
            principal_id=self.principal_id,
            private_keys=dict(self.private_keys),
            key_ids={alg: self.key_id for alg in self.private_keys},
            qkd_sae_id=self.qkd_sae_id,
        )

    def signer(self) -> Signer:
        return load_signature_suite(self.signature_suite).signer(self.private_keys, self.key_id)

    def to_json(self) -> bytes:
        doc = {
            "format": PRIVATE_KEY_FORMAT,
            "principal_id": self.principal_id,
            "kind": self.kind,
            "key_id": self.key_id,
            "version": self.version,
            "signature_suite": self.signature_suite,
            "qkd_sae_id": self.qkd_sae_id,
            "key_ids": {alg: self.key_id for alg in sorted(self.private_keys)},
            "private_keys": {
                alg: base64.b64encode(raw).decode()
                for alg, raw in sorted(self.private_keys.items())
            },
            "public_keys": {
                alg: base64.b64encode(raw).decode() for alg, raw in sorted(self.public_keys.items())
            },
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> PrincipalKeyFile:
        try:
            doc = json.loads(data)
            if doc["format"] != PRIVATE_KEY_FORMAT:
                raise ValueError("format")
            private = {
                k: base64.b64decode(v, validate=True) for k, v in doc["private_keys"].items()
            }
            public = {k: base64.b64decode(v, validate=True) for k, v in doc["public_keys"].items()}
            key_file = cls(
                principal_id=str(doc["principal_id"]),
                kind=str(doc["kind"]),
                key_id=str(doc["key_id"]),
                signature_suite=str(doc["signature_suite"]),
                private_keys=private,
                public_keys=public,
                qkd_sae_id=doc["qkd_sae_id"],
                version=int(doc["version"]),
            )
        except Exception:
            # The cause may quote file content, i.e. key material: keep it out of the message.
            raise _malformed("private key file is not a fleetbus private key file") from None
        if derive_key_id(public) != key_file.key_id:
            raise _malformed("private key file: key id does not match the public keys")
        return key_file

    @classmethod
    def from_record(cls, record: KeyRecord, private_keys: Mapping[str, bytes]) -> PrincipalKeyFile:
        return cls(
            principal_id=record.principal_id,
            kind=record.kind,
            key_id=record.key_id,
            signature_suite=record.signature_suite,
            private_keys=dict(private_keys),
            public_keys=dict(record.public_keys),
            qkd_sae_id=record.qkd_sae_id,
            version=record.version,
        )


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a fresh 0600 file, then move it over ``path`` (atomic, never chmod)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_key_file(path: Path, key_file: PrincipalKeyFile) -> None:
    write_private_file(path, key_file.to_json())


def load_key_file(path: Path) -> PrincipalKeyFile:
    """Load a private key file; refuse one that group or others can read or write."""
    try:
        mode = os.stat(path).st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"private key file {path} does not exist") from None
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(
            f"private key file {path} is accessible by group/others "
            f"(mode {stat.S_IMODE(mode):04o}); it must be 0600"
        )
    return PrincipalKeyFile.from_json(data)


@dataclass(frozen=True)
class IssuedKey:
    """A freshly issued key: the signed record to publish and the private file to hand over."""

    signed: SignedKeyRecord
    key_file: PrincipalKeyFile


def generate_principal_keys(
    signature_suite: str, kems: Iterable[str]
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Fresh private/public keys: signature keys from the suite, KEM keys from the providers."""
    private, public = load_signature_suite(signature_suite).generate()
    for name in kems:
        if name not in kem_providers():
            raise ConfigError(f"unknown KEM {name!r}; choose from {', '.join(kem_providers())}")
        provider = load_key_provider(name)
        alg = provider.algorithm or name
        private[alg], public[alg] = provider.generate_keypair()
    return private, public


def _any_post_quantum(public: Mapping[str, bytes]) -> bool:
    for alg in public:
        if alg in POST_QUANTUM_SIGNATURE_ALGORITHMS:
            return True
        provider = kem_provider_for_algorithm(alg)
        if provider is not None and key_provider_traits(provider).post_quantum_kem:
            return True
    return False


def issue_key(
    root: FleetRoot,
    *,
    principal_id: str,
    kind: str,
    version: int = 1,
    signature_suite: str = ROOT_SUITE,
    kems: Iterable[str] = (),
    capabilities: Iterable[str] = (),
    qkd_sae_id: str | None = None,
    not_before: float,
    not_after: float,
    groups: Iterable[str] = (),
    overlap_s: float = 0.0,
) -> IssuedKey:
    """Generate a principal's keys and have the root sign its record.

    Capabilities get ``pqc`` when any key is post-quantum and ``qkd`` when a SAE id is given.
    """
    private, public = generate_principal_keys(signature_suite, kems)
    caps = set(capabilities)
    if _any_post_quantum(public):
        caps.add("pqc")
    if qkd_sae_id:
        caps.add("qkd")
    record = KeyRecord(
        principal_id=principal_id,
        kind=kind,
        version=version,
        key_id=derive_key_id(public),
        public_keys=public,
        signature_suite=signature_suite,
        capabilities=frozenset(caps),
        qkd_sae_id=qkd_sae_id,
        not_before=float(not_before),
        not_after=float(not_after),
        groups=frozenset(groups),
        overlap_s=float(overlap_s),
    )
    return IssuedKey(root.sign(record), PrincipalKeyFile.from_record(record, private))


# --- the highest accepted head, kept across restarts ----------------------------------------


class HeadStore:
    """The highest directory head a loader has accepted, in one file, kept across restarts.

    The file holds the signed head, so it is re-verified against the pinned root at each start.
    It protects against older material handed to the loader (a stale ``directory.cbor``, a
    replayed topic), not against someone who can rewrite the loader's own state folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self, root: RootPublicKey) -> SignedDirectoryHead | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            signed = SignedDirectoryHead.from_cbor(data)
            verify_signed_head(signed, root)
        except FleetbusError as exc:
            raise ConfigError(
                f"{self.path} does not hold a directory head signed by the pinned root "
                f"({exc.reason}); delete it only if the fleet root was deliberately replaced"
            ) from None
        return signed

    def save(self, signed: SignedDirectoryHead) -> None:
        """Keep ``signed`` unless the file already holds a higher head (another process of the
        same folder got further)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            if SignedDirectoryHead.from_cbor(self.path.read_bytes()).head.seq > signed.head.seq:
                return
        except (FileNotFoundError, FleetbusError):
            pass  # nothing (valid) to keep; load() verifies whatever is there at the next start
        _write_atomic(self.path, signed.to_cbor(), 0o644)


def head_store_for(folder: Path, root: RootPublicKey) -> HeadStore:
    """The head store of loaders of ``root``'s directory in ``folder`` (one file per root, so
    a state folder that outlives a fleet root never mixes two fleets' sequences)."""
    return HeadStore(Path(folder) / f"directory-head.{root.key_id}.cbor")


# --- directory file: the head and the signed records it covers ------------------------------


@dataclass(frozen=True)
class DirectoryFile:
    """The content of ``directory.cbor``; ``head`` is None in a file written before heads."""

    head: SignedDirectoryHead | None
    records: list[SignedKeyRecord]


def read_directory_file(
    path: Path, *, keep: Callable[[str, str], bool] | None = None
) -> DirectoryFile:
    """Parse a directory file: ``{"fmt", "head", "records"}`` (or the headless array of v1).

    ``keep(principal_id, kind)``: records it declines are skipped before they are parsed and
    checked (a process holding part of the directory does not pay for the rest).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"directory file {path} does not exist (run `keys init`)") from None
    doc = _loads(data, "directory file")
    if isinstance(doc, list):
        items, head = doc, None
    elif isinstance(doc, dict) and set(doc) == {"fmt", "head", "records"}:
        if doc["fmt"] != DIRECTORY_FILE_FORMAT:
            raise FleetbusError(
                "directory file: unsupported format", reason=ReasonCode.UNSUPPORTED_VERSION
            )
        if not isinstance(doc["head"], bytes):
            raise _malformed("directory file: head must be bytes")
        items, head = doc["records"], SignedDirectoryHead.from_cbor(doc["head"])
    else:
        raise _malformed("directory file: expected a head and an array of signed records")
    if not isinstance(items, list) or not all(isinstance(item, bytes) for item in items):
        raise _malformed("directory file: expected an array of signed records")
    if keep is not None:
        items = [item for item in items if (named := peek_record(item)) is None or keep(*named)]
    return DirectoryFile(head, [SignedKeyRecord.from_cbor(item) for item in items])


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_directory_file(
    path: Path, head: SignedDirectoryHead, records: Iterable[SignedKeyRecord]
) -> None:
    """Atomically replace the directory file with a head and its records (public, mode 0644)."""
    data = canonical_cbor(
        {
            "fmt": DIRECTORY_FILE_FORMAT,
            "head": head.to_cbor(),
            "records": [signed.to_cbor() for signed in records],
        }
    )
    _write_atomic(path, data, 0o644)


def sign_directory(
    root: FleetRoot,
    records: Iterable[SignedKeyRecord],
    *,
    previous: DirectoryHead | None = None,
    at: float | None = None,
) -> tuple[SignedDirectoryHead, list[SignedKeyRecord]]:
    """Merge ``records`` (revocation sticky) and sign the next head over them.

    Returns the head (``previous.seq + 1``, or 1) and the merged records it covers.
    """
    merged = KeyDirectory(root.public)
    merged.ingest_all(records)
    return next_head(root, merged, previous=previous, at=at), merged.signed_records()


def next_head(
    root: FleetRoot,
    directory: KeyDirectory,
    *,
    previous: DirectoryHead | None,
    at: float | None = None,
) -> SignedDirectoryHead:
    """The root's head after ``previous`` (1 if None) over every record ``directory`` holds."""
    head = directory.compute_head(
        seq=1 if previous is None else previous.seq + 1,
        at=time.time() if at is None else at,
        vehicle_buckets=DEFAULT_VEHICLE_BUCKETS if previous is None else previous.vehicle_buckets,
    )
    return root.sign_head(head)


def publish_directory_file(
    path: Path, root: FleetRoot, records: Iterable[SignedKeyRecord], *, at: float | None = None
) -> SignedDirectoryHead:
    """Write ``records`` under the next head after the file's current one (1 for a new file).

    For tools that hold the root (the CLI, devtools, test fleets); the existing file's head is
    verified before its sequence number is continued.
    """
    previous = None
    if path.exists():
        current = read_directory_file(path).head
        if current is not None:
            previous = verify_signed_head(current, root.public)
    head, merged = sign_directory(root, records, previous=previous, at=at)
    write_directory_file(path, head, merged)
    return head


def load_directory(
    path: Path,
    root: RootPublicKey,
    *,
    head_store: HeadStore | None = None,
    scope: DirectoryScope = WHOLE_DIRECTORY,
    verify_each: bool = False,
) -> KeyDirectory:
    """Read and verify a directory file: its head, and the records of ``scope`` (every record by
    default), which must match the head exactly.

    A record set that matches the root-signed head is authenticated by it
    (``KeyDirectory.ingest_committed``); ``verify_each`` checks every record's own signature
    too (the root holder, which writes them on to the next file and the topic).

    Refused with DIRECTORY_ROLLBACK: a head older than ``head_store``'s, records that do not
    match the head (one missing, e.g. a revocation, or one replayed). A file without a head is
    a CONFIG error telling how to migrate (DIRECTORY_ROLLBACK if this loader has seen a head).
    """
    directory = KeyDirectory(root, head_store=head_store, require_head=True, scope=scope)
    # Only when no vehicle bucket is held is the choice independent of the file's bucket count.
    no_vehicles = scope.buckets == frozenset()
    content = read_directory_file(path, keep=directory.wants if no_vehicles else None)
    if content.head is None:
        if directory.head is not None:
            raise FleetbusError(
                f"directory file {path} has no signed head, but head {directory.head.seq} was "
                "accepted before: refusing rolled-back key material",
                reason=ReasonCode.DIRECTORY_ROLLBACK,
            )
        raise ConfigError(
            f"directory file {path} has no signed directory head (written before heads "
            "existed); on the root's own copy run `fleetbus keys migrate --dir <folder>`"
        )
    if verify_each:
        directory.ingest_all(content.records)
    else:
        directory.ingest_committed(content.records, content.head)
    directory.ingest_head(content.head)
    unsettled = directory.unsettled_sets()
    if unsettled:
        raise FleetbusError(
            f"directory file {path}: the records of set(s) {unsettled} do not match head "
            f"{content.head.head.seq} (a record missing or replaced by an older one)",
            reason=ReasonCode.DIRECTORY_ROLLBACK,
        )
    return directory
