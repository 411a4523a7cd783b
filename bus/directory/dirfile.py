"""The directory file (``directory.cbor``): the signed head and the records it covers; reading,
writing, signing the next head and loading a verified ``KeyDirectory`` from it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fleetbus.bus.directory.heads import (
    WHOLE_DIRECTORY,
    DirectoryHead,
    DirectoryScope,
    SignedDirectoryHead,
    peek_record,
    principal_set,
    verify_signed_head,
)
from fleetbus.bus.directory.headstore import HeadStore
from fleetbus.bus.directory.keydirectory import KeyDirectory
from fleetbus.bus.directory.records import (
    DEFAULT_VEHICLE_BUCKETS,
    DIRECTORY_FILE_FORMAT,
    SignedKeyRecord,
    _loads,
    _malformed,
    canonical_cbor,
)
from fleetbus.bus.directory.trust import FleetRoot, RootPublicKey
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.bus.files import write_atomic

# --- directory file: the head and the signed records it covers ------------------------------


@dataclass(frozen=True)
class DirectoryFile:
    """The content of ``directory.cbor``; ``head`` is None in a file written before heads."""

    head: SignedDirectoryHead | None
    records: list[SignedKeyRecord]


def read_directory_file(path: Path, *, scope: DirectoryScope = WHOLE_DIRECTORY) -> DirectoryFile:
    """Parse a directory file: ``{"fmt", "head", "records"}`` (or the headless array of v1).

    Records outside ``scope`` (their set under the file's own head's bucket count, or in a
    headless file any vehicle not in ``scope.own`` when no bucket is held) are skipped before
    they are parsed and checked: a process holding part of the directory does not pay for the
    rest. A lie in a skipped record's bytes can only make that record ignored.
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
    if scope.buckets is not None and (head is not None or not scope.buckets):
        buckets = DEFAULT_VEHICLE_BUCKETS if head is None else head.head.vehicle_buckets

        def keep(principal_id: str, kind: str) -> bool:
            index = principal_set(principal_id, kind, buckets)
            return principal_id in scope.own or scope.holds(index)

        items = [item for item in items if (named := peek_record(item)) is None or keep(*named)]
    return DirectoryFile(head, [SignedKeyRecord.from_cbor(item) for item in items])


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
    write_atomic(path, data, 0o644)


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
    content = read_directory_file(path, scope=scope)
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
