"""The directory file (``directory.cbor``): the signed head and the records it covers; reading,
writing, signing the next head and loading a verified ``KeyDirectory`` from it.
"""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
from fleetbus.bus.directory.keydirectory import KeyDirectory, RecordFile, StoredRecord
from fleetbus.bus.directory.records import (
    DEFAULT_VEHICLE_BUCKETS,
    DIRECTORY_FILE_FORMAT,
    SignedKeyRecord,
    _malformed,
    canonical_cbor,
)
from fleetbus.bus.directory.trust import FleetRoot, RootPublicKey
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.bus.files import write_atomic

# --- directory file: the head and the signed records it covers ------------------------------

#: Largest head or signed record a directory file may hold (a composite-root record is ~5 kB):
#: a corrupt length must not make a reader allocate it.
MAX_ITEM_BYTES = 1 << 20
_TEXT, _BYTES, _ARRAY, _MAP = 3, 2, 4, 5


@dataclass(frozen=True)
class DirectoryFile:
    """The content of ``directory.cbor``; ``head`` is None in a file written before heads."""

    head: SignedDirectoryHead | None
    records: list[SignedKeyRecord]


@dataclass(frozen=True)
class DirectoryStream:
    """An open directory file: its head, read, and its records' bytes, read one at a time.

    ``records`` yields each in-scope record's bytes as stored, unparsed, with their position
    in the file (which a ``KeyDirectory`` may hold instead of the bytes); it refuses a malformed
    file (truncated, trailing bytes, a wrong type, a non-canonical length) when it reaches the
    fault, so a reader must exhaust it before trusting what it read.
    """

    head: SignedDirectoryHead | None
    records: Iterator[StoredRecord]
    #: The open file read (pass it as ``open_directory_file(..., file=)`` to read it again).
    file: RecordFile


class _ItemReader:
    """CBOR item headers and byte strings read one by one from a file (the directory file is a
    map or an array of byte strings: nothing in it needs a whole-document decode)."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh

    def _exact(self, size: int) -> bytes:
        data = self._fh.read(size)
        if len(data) != size:
            raise _malformed("directory file: not valid CBOR (truncated)")
        return data

    def header(self) -> tuple[int, int]:
        """``(major type, argument)`` of the next item, in the shortest (canonical) form."""
        (initial,) = self._exact(1)
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info
        if info > 27:
            raise _malformed("directory file: not valid CBOR (indefinite length or reserved)")
        size = 1 << (info - 24)
        value = int.from_bytes(self._exact(size), "big")
        if value < (24 if size == 1 else 1 << (4 * size)):
            raise _malformed("directory file: not in canonical CBOR form")
        return major, value

    def string(self, major: int, length: int, message: str) -> bytes:
        if length > MAX_ITEM_BYTES:
            raise _malformed(f"{message} (an item of {length} bytes)")
        data = self._exact(length)
        if major == _TEXT:
            try:
                data.decode()
            except UnicodeDecodeError:
                raise _malformed("directory file: not valid CBOR (text is not UTF-8)") from None
        return data

    def item(self, major: int, message: str) -> bytes:
        """The next item, which must be a string of type ``major``."""
        found, length = self.header()
        if found != major:
            raise _malformed(message)
        return self.string(major, length, message)

    def at_end(self) -> bool:
        return self._fh.read(1) == b""


class RecordIndex:
    """Where each record of a directory file is, by record set: what one strict pass over the
    file (``DirectoryRoster.from_file``) notes so that later loads of some sets (a worker's set 0
    at start, a vehicle bucket when its partition is assigned) read only those records by
    position instead of passing over the whole file again. 12 bytes per record."""

    def __init__(self) -> None:
        self._offsets: dict[int, array[int]] = {}
        self._lengths: dict[int, array[int]] = {}

    def add(self, index: int, offset: int, length: int) -> None:
        if index not in self._offsets:
            self._offsets[index], self._lengths[index] = array("Q"), array("I")
        self._offsets[index].append(offset)
        self._lengths[index].append(length)

    def records(self, file: RecordFile, keep: Callable[[int], bool]) -> Iterator[StoredRecord]:
        """The records of the sets ``keep`` holds, read back from ``file`` (the file indexed)."""
        for index in sorted(self._offsets):
            if keep(index):
                for offset, length in zip(self._offsets[index], self._lengths[index], strict=True):
                    yield StoredRecord(file.read(offset, length), file, offset)


_SHAPE = "directory file: expected a head and an array of signed records"
_RECORDS = "directory file: expected an array of signed records"


def _reopen(file: RecordFile) -> BinaryIO:
    """A reader of ``file``'s content from its start, with an offset of its own (so that two
    streams of one ``RecordFile`` never share one): a new open of the same inode on Linux
    (``/proc/self/fd``), else a duplicate descriptor rewound."""
    try:
        return open(f"/proc/self/fd/{file.fd}", "rb")
    except OSError:
        fh = os.fdopen(os.dup(file.fd), "rb")
        fh.seek(0)
        return fh


@contextmanager
def open_directory_file(
    path: Path,
    *,
    scope: DirectoryScope = WHOLE_DIRECTORY,
    file: RecordFile | None = None,
    index: RecordIndex | None = None,
) -> Iterator[DirectoryStream]:
    """Open a directory file: ``{"fmt", "head", "records"}`` in that (canonical) order, or the
    headless array of v1; the head is read and parsed, the records are read as a stream.

    Records outside ``scope`` (their set under the file's own head's bucket count, or in a
    headless file any vehicle not in ``scope.own`` when no bucket is held) are skipped before
    they are parsed: a process holding part of the directory holds neither the rest's bytes
    nor its parse. A lie in a skipped record's bytes can only make that record ignored.

    ``file``: read that open file (the content ``path`` had when it was opened) instead of
    opening ``path`` again, so that a directory holding records by their position in it can
    take more of them (a worker's buckets loaded as its partitions move).

    ``index``: the positions of ``file``'s records (a pass over it made them): the records of
    ``scope``'s sets are read from there, the others not at all (``scope.own`` is not used).
    """
    try:
        file = file or RecordFile(path)
    except FileNotFoundError:
        raise ConfigError(f"directory file {path} does not exist (run `keys init`)") from None
    # A second descriptor of the same file: what is read is what ``file`` reads back.
    with _reopen(file) as fh:
        reader = _ItemReader(fh)
        major, count = reader.header()
        head: SignedDirectoryHead | None = None
        if major == _MAP:
            if count != 3 or reader.item(_TEXT, _SHAPE) != b"fmt":
                raise _malformed(_SHAPE)
            major, length = reader.header()
            if major != _TEXT or length > 64:
                raise FleetbusError(
                    "directory file: unsupported format", reason=ReasonCode.UNSUPPORTED_VERSION
                )
            if reader.string(_TEXT, length, _SHAPE) != DIRECTORY_FILE_FORMAT.encode():
                raise FleetbusError(
                    "directory file: unsupported format", reason=ReasonCode.UNSUPPORTED_VERSION
                )
            if reader.item(_TEXT, _SHAPE) != b"head":
                raise _malformed(_SHAPE)
            head = SignedDirectoryHead.from_cbor(
                reader.item(_BYTES, "directory file: head must be bytes")
            )
            if reader.item(_TEXT, _SHAPE) != b"records":
                raise _malformed(_SHAPE)
            major, count = reader.header()
        if major != _ARRAY:
            raise _malformed(_SHAPE if head is not None else _RECORDS)
        keep = _scope_filter(head, scope)
        if index is not None:
            yield DirectoryStream(head, index.records(file, scope.holds), file)
            return

        def records() -> Iterator[StoredRecord]:
            for _ in range(count):
                major, length = reader.header()
                if major != _BYTES:
                    raise _malformed(_RECORDS)
                offset = fh.tell()
                item = reader.string(_BYTES, length, _RECORDS)
                if keep is None or (named := peek_record(item)) is None or keep(*named):
                    yield StoredRecord(item, file, offset)
            if not reader.at_end():
                raise _malformed("directory file: not valid CBOR (trailing bytes)")

        yield DirectoryStream(head, records(), file)


def _scope_filter(
    head: SignedDirectoryHead | None, scope: DirectoryScope
) -> Callable[[str, str], bool] | None:
    """Which named records of a file ``scope`` keeps (None: all of them)."""
    if scope.buckets is None or (head is None and scope.buckets):
        return None
    buckets = DEFAULT_VEHICLE_BUCKETS if head is None else head.head.vehicle_buckets

    def keep(principal_id: str, kind: str) -> bool:
        index = principal_set(principal_id, kind, buckets)
        return principal_id in scope.own or scope.holds(index)

    return keep


def read_directory_file(path: Path, *, scope: DirectoryScope = WHOLE_DIRECTORY) -> DirectoryFile:
    """Head and parsed records of ``scope`` of a directory file (``open_directory_file``)."""
    with open_directory_file(path, scope=scope) as stream:
        records = [SignedKeyRecord.from_cbor(i.data) for i in stream.records]
        return DirectoryFile(stream.head, records)


def write_directory_file(
    path: Path, head: SignedDirectoryHead, records: Iterable[SignedKeyRecord | bytes]
) -> None:
    """Atomically replace the directory file with a head and its records (public, mode 0644);
    a record may be given as its signed bytes (copying a file's records on unparsed)."""
    items = [item if isinstance(item, bytes) else item.to_cbor() for item in records]
    data = bytearray(b"\xa3" + canonical_cbor("fmt") + canonical_cbor(DIRECTORY_FILE_FORMAT))
    data += canonical_cbor("head") + canonical_cbor(head.to_cbor()) + canonical_cbor("records")
    data += _array_header(len(items))
    for item in items:
        data += canonical_cbor(item)
    write_atomic(path, bytes(data), 0o644)


def _array_header(count: int) -> bytes:
    """The canonical CBOR header of an array of ``count`` items."""
    if count < 24:
        return bytes([0x80 | count])
    size = next(size for size in (1, 2, 4, 8) if count < 1 << (8 * size))
    return bytes([0x80 | (24 + size.bit_length() - 1)]) + count.to_bytes(size, "big")


def sign_directory(
    root: FleetRoot,
    records: Iterable[SignedKeyRecord],
    *,
    previous: DirectoryHead | None = None,
    at: float | None = None,
    vehicle_buckets: int | None = None,
) -> tuple[SignedDirectoryHead, list[SignedKeyRecord]]:
    """Merge ``records`` (revocation sticky) and sign the next head over them.

    Returns the head (``previous.seq + 1``, or 1) and the merged records it covers;
    ``vehicle_buckets`` as ``next_head``.
    """
    merged = KeyDirectory(root.public)
    merged.ingest_all(records)
    head = next_head(root, merged, previous=previous, at=at, vehicle_buckets=vehicle_buckets)
    return head, merged.signed_records()


def next_head(
    root: FleetRoot,
    directory: KeyDirectory,
    *,
    previous: DirectoryHead | None,
    at: float | None = None,
    vehicle_buckets: int | None = None,
) -> SignedDirectoryHead:
    """The root's head after ``previous`` (1 if None) over every record ``directory`` holds.

    ``vehicle_buckets``: the head's bucket count; None keeps ``previous``'s
    (``DEFAULT_VEHICLE_BUCKETS`` for a first head). Another count commits the same records under
    other vehicle sets (``fleetbus keys rehead``).
    """
    if vehicle_buckets is None:
        vehicle_buckets = DEFAULT_VEHICLE_BUCKETS if previous is None else previous.vehicle_buckets
    head = directory.compute_head(
        seq=1 if previous is None else previous.seq + 1,
        at=time.time() if at is None else at,
        vehicle_buckets=vehicle_buckets,
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
        with open_directory_file(path) as stream:  # the head only
            current = stream.head
        if current is not None:
            previous = verify_signed_head(current, root.public)
    head, merged = sign_directory(root, records, previous=previous, at=at)
    write_directory_file(path, head, merged)
    return head


def headless_file_error(path: Path, accepted: DirectoryHead | None) -> FleetbusError:
    """Why a directory file without a signed head is refused: rolled back if a head was
    ``accepted`` before, else written before heads existed (how to migrate it)."""
    if accepted is not None:
        return FleetbusError(
            f"directory file {path} has no signed head, but head {accepted.seq} "
            "was accepted before: refusing rolled-back key material",
            reason=ReasonCode.DIRECTORY_ROLLBACK,
        )
    return ConfigError(
        f"directory file {path} has no signed directory head (written before heads "
        "existed); on the root's own copy run `fleetbus keys migrate --dir <folder>`"
    )


def load_directory(
    path: Path,
    root: RootPublicKey,
    *,
    head_store: HeadStore | None = None,
    scope: DirectoryScope = WHOLE_DIRECTORY,
    verify_each: bool = False,
    file: RecordFile | None = None,
    index: RecordIndex | None = None,
) -> KeyDirectory:
    """Read and verify a directory file: its head, and the records of ``scope`` (every record by
    default), which must match the head exactly.

    A record set that matches the root-signed head is authenticated by it
    (``KeyDirectory.ingest_committed``); ``verify_each`` checks every record's own signature
    too (the root holder, which writes them on to the next file and the topic).

    Refused with DIRECTORY_ROLLBACK: a head older than ``head_store``'s, records that do not
    match the head (one missing, e.g. a revocation, or one replayed). A file without a head is
    a CONFIG error telling how to migrate (DIRECTORY_ROLLBACK if this loader has seen a head).

    ``file`` and ``index``: read that open file's records by their positions
    (``open_directory_file``), not the whole file again.
    """
    directory = KeyDirectory(root, head_store=head_store, require_head=True, scope=scope)
    with open_directory_file(path, scope=scope, file=file, index=index) as stream:
        head = stream.head
        if head is None:
            raise headless_file_error(path, directory.head)
        if verify_each:
            directory.ingest_all(SignedKeyRecord.from_cbor(item.data) for item in stream.records)
        else:
            directory.ingest_committed(stream.records, head)
    directory.ingest_head(head)
    unsettled = directory.unsettled_sets()
    if unsettled:
        raise FleetbusError(
            f"directory file {path}: the records of set(s) {unsettled} do not match head "
            f"{head.head.seq} (a record missing or replaced by an older one)",
            reason=ReasonCode.DIRECTORY_ROLLBACK,
        )
    return directory
