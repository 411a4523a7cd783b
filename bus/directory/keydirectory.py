"""``KeyDirectory``: verified key records with rotation overlap, revocation, expiry and head
anchoring; what sealers, openers and verifiers ask for keys.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from fleetbus.bus.directory.heads import (
    WHOLE_DIRECTORY,
    DirectoryHead,
    DirectoryScope,
    SignedDirectoryHead,
    from_kafka,
    kafka_key,
    peek_record,
    principal_set,
    record_set,
    set_digest,
    verify_signed_head,
)
from fleetbus.bus.directory.headstore import HeadStore
from fleetbus.bus.directory.records import (
    DEFAULT_VEHICLE_BUCKETS,
    HEAD_KAFKA_KEY,
    KeyRecord,
    SignedKeyRecord,
    _malformed,
    signed_record_fields,
)
from fleetbus.bus.directory.trust import RootPublicKey, verify_signed_record
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.bus.keys import (
    RecipientKeys,
    Verifier,
)
from fleetbus.bus.registry import is_kem_algorithm, load_signature_suite

# --- the directory -------------------------------------------------------------------------

#: Records held by position (``ingest_committed``) kept parsed at once, most recently used first.
PARSED_RECORDS_CACHED = 4096


class RecordFile:
    """A directory file held open, so that records held by their position in it are read back
    on use. The descriptor keeps the content it was opened on: a file replaced atomically (as
    every writer here does) does not change under a directory that holds records from it."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self._closer = weakref.finalize(self, os.close, self.fd)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise _changed()
        return data


class StoredRecord(NamedTuple):
    """A signed record's bytes as read from ``file`` at ``offset``."""

    data: bytes
    file: RecordFile
    offset: int


def _changed() -> FleetbusError:
    return FleetbusError(
        "a key record held from the directory file no longer matches it (the file was changed "
        "in place under a running process); refusing its keys",
        reason=ReasonCode.DIRECTORY_ROLLBACK,
    )


#: What a directory holds for a key id: a parsed record, or its position in ``_file`` (``offset
#: << 24 | length``: 36 bytes instead of the record's 1.6 kB).
_Held = SignedKeyRecord | int


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
        # A record a head authenticated in bulk is held as its position in the directory file
        # (~7 kB parsed) and read back, checked against its digest and parsed on use, into a
        # bounded cache.
        self._by_key_id: dict[str, _Held] = {}
        self._file: RecordFile | None = None
        self._parsed: OrderedDict[str, tuple[int, SignedKeyRecord]] = OrderedDict()
        # A principal's key ids: one (most vehicles: a str, not a 200-byte set) or a set.
        self._by_principal: dict[str, str | set[str]] = {}
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
        self._accepted: dict[int, dict[str, _Held]] = {}
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
            if existing is not None and (
                self._read(existing) == signed.to_cbor()
                if isinstance(existing, int)
                else existing == signed
            ):
                # Already verified, byte for byte (re-reading the topic from its start).
                return signed.record
            record = verify_signed_record(signed, self.root, self._root_verifier)
            held = self._merge(record.key_id, record.principal_id, signed, record=record)
            return self._parse(record.key_id, held).record

    def ingest_committed(
        self,
        records: Iterable[SignedKeyRecord | StoredRecord],
        signed_head: SignedDirectoryHead,
    ) -> None:
        """Bulk-load ``records`` under the head that covers them (a directory file).

        The head is verified first. A held set whose records match it exactly is authenticated
        by the head — the root signed the digest of each of its records — so its records are
        not verified one by one (that is most of a large fleet's start-up time). The records of
        a set that does not match, and ``scope.own`` records outside the held sets, are
        verified one by one as ``ingest`` does; a set that does not match stays refused.

        A record read from a directory file (``StoredRecord``) is checked as far as
        ``signed_record_fields`` does and, if its set matches, held as its position in that
        file if it is in a held vehicle bucket: read back, checked against its digest and
        parsed in full when used. One file per directory; set 0, records of another file and
        records that are verified one by one are held parsed.
        """
        with self._lock:
            head = verify_signed_head(signed_head, self.root, self._root_verifier)
            buckets = head.vehicle_buckets
            if not self._by_key_id:
                # Nothing held is in a set yet: take the head's bucket count now, or the records
                # of a held bucket under another count than the default would be verified one
                # by one into the default's sets, dropped there, and the bucket refused.
                self._buckets, self._members = buckets, {}
            by_set: dict[int, dict[str, tuple[_Held, str, bytes]]] = {}
            for stored in records:
                if isinstance(stored, SignedKeyRecord):
                    principal, kind = stored.record.principal_id, stored.record.kind
                    key_id, record_cbor = stored.record.key_id, stored.record_cbor
                else:
                    principal, kind, key_id, record_cbor = signed_record_fields(stored.data)
                index = principal_set(principal, kind, buckets)
                if not (self.scope.holds(index) or principal in self.scope.own):
                    continue
                item: _Held
                if isinstance(stored, SignedKeyRecord):
                    item = stored
                elif (
                    index != 0
                    and self.scope.holds(index)
                    and stored.file is (self._file or stored.file)
                    and len(stored.data) < 1 << 24
                ):
                    # The vehicle buckets, the bulk of a fleet, by position; set 0 (a few dozen
                    # records every process uses) parsed, so a vehicle agent keeps no file open.
                    self._file = stored.file
                    item = stored.offset << 24 | len(stored.data)
                else:
                    item = SignedKeyRecord.from_cbor(stored.data)
                digest = hashlib.sha256(record_cbor).digest()
                by_set.setdefault(index, {})[key_id] = (item, principal, digest)
            for index, items in sorted(by_set.items()):
                count, expected = head.sets[index]
                committed = (
                    buckets == self._buckets
                    and self.scope.holds(index)
                    and not self._members.get(index)
                    and len(items) == count
                    and hmac.compare_digest(
                        set_digest((k, d) for k, (_, _, d) in items.items()), expected
                    )
                )
                for key_id, (item, principal, digest) in items.items():
                    if committed:
                        self._merge(key_id, principal, item, digest=digest, index=index)
                    elif isinstance(item, int):
                        self.ingest(SignedKeyRecord.from_cbor(self._read(item)))
                    else:
                        self.ingest(item)

    def _read(self, position: int) -> bytes:
        """The bytes of a record held by ``position`` in ``_file``."""
        assert self._file is not None
        return self._file.read(position >> 24, position & 0xFFFFFF)

    def _load(self, key_id: str, position: int) -> SignedKeyRecord:
        """The record held for ``key_id`` at ``position``, read back and parsed; it must be
        the record whose digest was accepted (under the lock: the digest is the current one)."""
        signed = SignedKeyRecord.from_cbor(self._read(position))
        if signed.record.key_id != key_id or not hmac.compare_digest(
            hashlib.sha256(signed.record_cbor).digest(), self._digests[key_id]
        ):
            raise _changed()
        return signed

    def _parse(self, key_id: str, held: _Held, *, cache: bool = True) -> SignedKeyRecord:
        """``held`` (the value held for ``key_id``) parsed; the caller holds the lock. Without
        ``cache`` (a listing of the fleet), the records in the cache are used but none is
        added, so a listing does not evict what lookups use."""
        if not isinstance(held, int):
            return held
        cached = self._parsed.get(key_id)
        if cached is not None and cached[0] == held:
            self._parsed.move_to_end(key_id)
            return cached[1]
        signed = self._load(key_id, held)
        if not cache:
            return signed
        self._parsed[key_id] = (held, signed)
        self._parsed.move_to_end(key_id)
        if len(self._parsed) > PARSED_RECORDS_CACHED:
            self._parsed.popitem(last=False)
        return signed

    def _merge(
        self,
        key_id: str,
        principal_id: str,
        held: _Held,
        *,
        record: KeyRecord | None = None,
        digest: bytes | None = None,
        index: int | None = None,
    ) -> _Held:
        """Hold ``held`` (``record``, if parsed) unless the record held for its key id stays;
        returns what is held for the key id now."""
        existing = self._by_key_id.get(key_id)
        if existing is not None:
            old = self._parse(key_id, existing).record
            if old.principal_id != principal_id:
                raise _malformed(f"key id {key_id} already belongs to another principal")
            if old.revoked:
                return existing
            new = record if record is not None else self._parse(key_id, held).record
            if not (new.revoked or new.version > old.version):
                return existing
            # The set's accepted state keeps the replaced record parsed: read back by position
            # it would be checked against the new record's digest.
            accepted = self._accepted.get(self._index[key_id], {})
            if key_id in accepted:
                accepted[key_id] = self._parse(key_id, accepted[key_id])
            self._members[self._index[key_id]].discard(key_id)
            self._dirty.add(self._index[key_id])
        self._by_key_id[key_id] = held
        known = self._by_principal.setdefault(principal_id, key_id)
        if isinstance(known, set):
            known.add(key_id)
        elif known != key_id:
            self._by_principal[principal_id] = {known, key_id}
        if digest is None:
            signed = self._parse(key_id, held)
            digest = hashlib.sha256(signed.record_cbor).digest()
            if index is None:
                index = record_set(signed.record, self._buckets)
        elif index is None:
            index = record_set(self._parse(key_id, held).record, self._buckets)
        self._digests[key_id] = digest
        self._index[key_id] = index
        self._members.setdefault(index, set()).add(key_id)
        self._dirty.add(index)
        return held

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
            outside: list[tuple[str, str]] = []
            # Re-divided from what is held, without parsing a record (a whole fleet held by
            # position would be read back and parsed one by one, under the lock): a key in a
            # vehicle bucket is a vehicle's (set 0 holds every other kind, under any count).
            principal_of = {
                key_id: principal
                for principal, known in self._by_principal.items()
                for key_id in (known if isinstance(known, set) else (known,))
            }
            for key_id, stored in self._by_key_id.items():
                principal = principal_of.get(key_id)
                if principal is None:  # not expected: every held key is indexed by principal
                    record = self._parse(key_id, stored).record
                    principal, kind = record.principal_id, record.kind
                else:
                    kind = "vehicle" if self._index[key_id] != 0 else ""
                index = self._index[key_id] = principal_set(principal, kind, self._buckets)
                self._members.setdefault(index, set()).add(key_id)
                if not self.scope.holds(index) and principal not in self.scope.own:
                    outside.append((key_id, principal))
            # Under the new count some held vehicles are in buckets this scope does not hold
            # (a worker holding its partitions' buckets): dropped, as a released bucket's are.
            # Kept, they would be used unchecked against the head (as ``scope.own`` records
            # are), while their new bucket's records, revocations too, are no longer kept.
            for key_id, principal_id in outside:
                self._forget(key_id, principal_id)
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

    def _forget(self, key_id: str, principal_id: str) -> None:
        """Drop the record held for ``key_id`` (of ``principal_id``): its key is unknown here
        from now on. The caller holds the lock."""
        del self._by_key_id[key_id]
        del self._digests[key_id]
        self._members.get(self._index.pop(key_id), set()).discard(key_id)
        self._verifiers.pop(key_id, None)
        self._parsed.pop(key_id, None)
        known = self._by_principal.get(principal_id)
        if known == key_id:
            del self._by_principal[principal_id]
        elif isinstance(known, set):
            known.discard(key_id)
            if len(known) == 1:
                self._by_principal[principal_id] = next(iter(known))

    def _settle(self, index: int) -> dict[str, _Held] | None:
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
        for key_id, held in self._by_key_id.items():
            index = (
                self._index[key_id]
                if vehicle_buckets == self._buckets
                else record_set(self._parse(key_id, held).record, vehicle_buckets)
            )
            entries[index].append((key_id, self._digests[key_id]))
        sets = tuple((len(items), set_digest(items)) for items in entries)
        return DirectoryHead(seq, float(at), vehicle_buckets, sets)

    def _usable(self, key_id: str, *, cache: bool = True) -> SignedKeyRecord | None:
        with self._lock:
            return self._usable_locked(key_id, cache=cache)

    def _usable_locked(self, key_id: str, *, cache: bool = True) -> SignedKeyRecord | None:
        held = self._by_key_id.get(key_id)
        if held is None:
            return None
        signed = self._parse(key_id, held, cache=cache)
        if not self._anchored or signed.record.revoked:
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
        accepted_held = accepted.get(key_id)
        if accepted_held is None or accepted_held is held or accepted_held == held:
            return None if accepted_held is None else signed
        return self._parse(key_id, accepted_held, cache=cache)  # changed since the head

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
            key_id = bytes(key).rpartition(b"/")[2].decode(errors="replace")
            with self._lock:
                held = self._by_key_id.get(key_id)
                if held is not None and (
                    self._read(held) if isinstance(held, int) else held.to_cbor()
                ) == bytes(value):
                    record = self._parse(key_id, held).record
                    if kafka_key(record) == bytes(key):
                        return record
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
            held = list(self._by_key_id)
        # Parsed one by one outside the cache: a listing of the fleet must not evict the
        # records lookups use.
        return sorted(
            (s for k in held if (s := self._current(k)) is not None),
            key=lambda s: (s.record.principal_id, s.record.version, s.record.key_id),
        )

    def _current(self, key_id: str) -> SignedKeyRecord | None:
        with self._lock:
            held = self._by_key_id.get(key_id)
            return None if held is None else self._parse(key_id, held, cache=False)

    def record(self, key_id: str) -> KeyRecord | None:
        signed = self._usable(key_id)
        return None if signed is None else signed.record

    def records(self, principal_id: str | None = None) -> list[KeyRecord]:
        with self._lock:
            if principal_id is None:
                key_ids: Iterable[str] = list(self._by_key_id)
            else:
                # Only this principal's records (called per message: not a sort of the fleet).
                known = self._by_principal.get(principal_id, ())
                key_ids = [known] if isinstance(known, str) else list(known)
        # The lock is taken per record: a thread listing the whole fleet (the policy refresh)
        # must not hold up the stages' lookups for the length of the list. Such a listing
        # parses what is held as bytes (~30 us a record) and keeps the records, not their
        # signed wrappers.
        cache = principal_id is not None
        records = [s.record for k in key_ids if (s := self._usable(k, cache=cache)) is not None]
        records.sort(key=lambda r: (r.principal_id, r.version, r.key_id))
        return records

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

    # -- a scope that follows a worker's partitions (added for issue 12) --------------------

    def hold_buckets(self, buckets: Iterable[int]) -> frozenset[int]:
        """Add vehicle ``buckets`` to the scope; returns those that were not held. Their sets
        hold nothing yet: until their records are ingested (a directory file's, then the key
        topic's) they do not match the head and their keys are refused, never stale. Records
        of them ingested from now on are kept."""
        with self._lock:
            held = self.scope.buckets
            if held is None:
                raise ConfigError("this directory holds every bucket already")
            new = frozenset(buckets) - held
            self.scope = DirectoryScope(buckets=held | new, own=self.scope.own)
            self._dirty.update(1 + b for b in new)
            return new

    def release_buckets(self, buckets: Iterable[int]) -> int:
        """Drop vehicle ``buckets`` from the scope, and their records (``scope.own`` principals'
        are kept); their keys are unknown here from now on. Returns how many records went."""
        with self._lock:
            held = self.scope.buckets
            if held is None:
                raise ConfigError("a directory holding every bucket cannot release one")
            gone = frozenset(buckets) & held
            self.scope = DirectoryScope(buckets=held - gone, own=self.scope.own)
            sets = {1 + b for b in gone}
            leaving: dict[str, int] = {}
            for index in sets:
                leaving.update(dict.fromkeys(self._members.pop(index, ()), index))
                self._accepted.pop(index, None)
                self._dirty.discard(index)
            if not leaving:
                return 0
            dropped = 0
            # Principals by their key ids (records held by position name no principal).
            for principal, known in list(self._by_principal.items()):
                ids = {known} if isinstance(known, str) else known
                going = ids & leaving.keys()
                if not going:
                    continue
                if principal in self.scope.own:  # kept: back into their sets
                    for key_id in going:
                        self._members.setdefault(leaving[key_id], set()).add(key_id)
                    continue
                for key_id in going:
                    del self._by_key_id[key_id]
                    del self._digests[key_id]
                    del self._index[key_id]
                    self._verifiers.pop(key_id, None)
                    self._parsed.pop(key_id, None)
                    dropped += 1
                rest = ids - going
                if not rest:
                    del self._by_principal[principal]
                else:
                    self._by_principal[principal] = next(iter(rest)) if len(rest) == 1 else rest
            return dropped

    def vehicles_held(self) -> int:
        """How many vehicles have a record here (held sets and ``scope.own``)."""
        with self._lock:
            principals = list(self._by_principal.values())
            index = self._index
        # Counted outside the lock: a whole fleet's records must not hold up the lookups. A
        # vehicle's records are in a vehicle set (1 + its bucket); everyone else's in set 0.
        return sum(
            1
            for known in principals
            if index.get(known if isinstance(known, str) else next(iter(known)), 0) > 0
        )
