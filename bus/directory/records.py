"""Key records: the signed statement of one principal key, its wire codec and record sets.

Constants of the directory formats live here too (every other directory module reads them).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fleetbus.bus import cbor
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import (
    KeyAlgorithm,
)

#: The principal kinds a record may name.
KINDS = frozenset({"dispatcher", "sealer", "vehicle", "edge", "approver", "root"})
#: The kinds the bus seals commands to (the security profiles apply to their KEM keys).
COMMAND_RECIPIENT_KINDS = frozenset({"vehicle", "edge"})
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
#: The most vehicle buckets ``fleetbus keys`` signs a head with. A head parses with any count
#: >= 1; this bound keeps a signed head (about 40 bytes a bucket: ~165 kB at 4096) well inside
#: the directory file's item limit (1 MiB) and Kafka's default message size (1 MB), and is more
#: partitions than one topic is usually given.
MAX_VEHICLE_BUCKETS = 4096
DIRECTORY_FILE_FORMAT = "fleetbus-directory/v2"
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
    return cbor.dumps(value)


def _loads(data: bytes, what: str) -> Any:
    """Well-formed CBOR; whether it is the canonical encoding is checked by each reader, which
    re-encodes what it parsed (records, heads) or needs no canonical form (files)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _malformed(f"{what}: expected bytes")
    try:
        return cbor.decode(bytes(data))
    except cbor.NotWellFormedCBOR as exc:
        cause = type(exc.__cause__).__name__
        raise _malformed(f"{what}: not valid CBOR ({cause})") from None


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
        outer = _signed_record_outer(data)
        record = KeyRecord.from_cbor(outer["record"])  # checks that the bytes are canonical
        signed = cls.encoded_as(record, outer["sig"], outer["root_kid"], outer["record"])
        if signed.to_cbor() != bytes(data):
            raise _malformed("signed record: not in canonical CBOR form")
        return signed


def _signed_record_outer(data: bytes) -> dict[str, Any]:
    """The outer map of a signed record: its four fields, their types, the format."""
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
    return outer


def signed_record_fields(data: bytes) -> tuple[str, str, str, bytes]:
    """``(principal id, kind, key id, record CBOR)`` of a signed record's bytes, for holding the
    record unparsed until first use (``KeyDirectory.ingest_committed``).

    The outer map is checked as ``from_cbor`` checks it (canonical, its four fields and their
    types); the record inside only as well-formed CBOR naming a principal, kind and key id. The
    rest of it is checked when it is first parsed (``SignedKeyRecord.from_cbor``).
    """
    outer = _signed_record_outer(data)
    record_cbor = outer["record"]
    if canonical_cbor(outer) != bytes(data):
        raise _malformed("signed record: not in canonical CBOR form")
    inner = _loads(record_cbor, "record")
    if not isinstance(inner, dict) or set(inner) != RECORD_FIELDS:
        raise _malformed("record: unexpected or missing fields")
    principal, kind, key_id = inner["principal"], inner["kind"], inner["kid"]
    if not (isinstance(principal, str) and isinstance(kind, str) and isinstance(key_id, str)):
        raise _malformed("record: principal, kind and kid must be text")
    return principal, kind, key_id, record_cbor


def signing_input(record: KeyRecord) -> bytes:
    return RECORD_SIGNING_PREFIX + record.to_cbor()
