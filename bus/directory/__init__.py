"""The key directory: root-signed key records for every principal, and the fleet root of trust.

A hybrid fleet root key (composite ML-DSA-65 + Ed25519) signs one ``KeyRecord`` per principal key;
vehicles pin the root public key. Rotation and revocation are records too. Records travel on a
Kafka compacted topic keyed by ``principal_id/key_id``; revocation is never a tombstone. A
root-signed, monotonically numbered ``DirectoryHead`` commits to the whole record set, so older
signed material (a record from before its revocation, an older file) cannot be replayed.

One module per concern: ``records`` (records and the format constants), ``heads`` (heads,
record sets, scopes, the key topic's wire form), ``trust`` (the root; issuing keys),
``keydirectory`` (``KeyDirectory``), ``keyfiles`` (private key files), ``headstore`` (the
highest accepted head on disk), ``dirfile`` (``directory.cbor``). Import from here.
"""

from __future__ import annotations

from fleetbus.bus.directory.dirfile import (
    DirectoryFile,
    DirectoryStream,
    RecordIndex,
    headless_file_error,
    load_directory,
    next_head,
    open_directory_file,
    publish_directory_file,
    read_directory_file,
    sign_directory,
    write_directory_file,
)
from fleetbus.bus.directory.heads import (
    WHOLE_DIRECTORY,
    DirectoryHead,
    DirectoryScope,
    SignedDirectoryHead,
    build_head,
    from_kafka,
    head_signing_input,
    head_to_kafka,
    kafka_key,
    peek_record,
    principal_set,
    record_digest,
    record_set,
    set_digest,
    to_kafka,
    vehicle_agent_scope,
    verify_signed_head,
)
from fleetbus.bus.directory.headstore import (
    HeadStore,
    head_store_for,
)
from fleetbus.bus.directory.keydirectory import (
    KeyDirectory,
    RecordFile,
    StoredRecord,
)
from fleetbus.bus.directory.keyfiles import (
    PrincipalKeyFile,
    load_key_file,
    save_key_file,
)
from fleetbus.bus.directory.records import (
    COMMAND_RECIPIENT_KINDS,
    DEFAULT_VEHICLE_BUCKETS,
    DIRECTORY_FILE_FORMAT,
    HEAD_FORMAT,
    HEAD_KAFKA_KEY,
    HEAD_SIGNING_PREFIX,
    KINDS,
    MAX_VEHICLE_BUCKETS,
    POST_QUANTUM_SIGNATURE_ALGORITHMS,
    PRIVATE_KEY_FORMAT,
    RECORD_FIELDS,
    RECORD_FORMAT,
    RECORD_SIGNING_PREFIX,
    ROOT_PUBLIC_FORMAT,
    ROOT_SUITE,
    SET_DIGEST_PREFIX,
    KeyRecord,
    SignedKeyRecord,
    canonical_cbor,
    derive_key_id,
    signed_record_fields,
    signing_input,
)
from fleetbus.bus.directory.trust import (
    FleetRoot,
    IssuedKey,
    RootPublicKey,
    generate_principal_keys,
    issue_key,
    verify_signed_record,
)
from fleetbus.bus.files import (
    write_private_file,
)
from fleetbus.bus.keyfolder import (
    DIRECTORY,
    ROOT_KEY,
    ROOT_PUB,
)

__all__ = [
    "COMMAND_RECIPIENT_KINDS",
    "DEFAULT_VEHICLE_BUCKETS",
    "DIRECTORY",
    "DIRECTORY_FILE_FORMAT",
    "HEAD_FORMAT",
    "HEAD_KAFKA_KEY",
    "HEAD_SIGNING_PREFIX",
    "KINDS",
    "MAX_VEHICLE_BUCKETS",
    "POST_QUANTUM_SIGNATURE_ALGORITHMS",
    "PRIVATE_KEY_FORMAT",
    "RECORD_FIELDS",
    "RECORD_FORMAT",
    "RECORD_SIGNING_PREFIX",
    "ROOT_KEY",
    "ROOT_PUB",
    "ROOT_PUBLIC_FORMAT",
    "ROOT_SUITE",
    "SET_DIGEST_PREFIX",
    "WHOLE_DIRECTORY",
    "DirectoryFile",
    "DirectoryHead",
    "DirectoryScope",
    "DirectoryStream",
    "FleetRoot",
    "HeadStore",
    "IssuedKey",
    "KeyDirectory",
    "KeyRecord",
    "PrincipalKeyFile",
    "RecordFile",
    "RecordIndex",
    "RootPublicKey",
    "SignedDirectoryHead",
    "SignedKeyRecord",
    "StoredRecord",
    "build_head",
    "canonical_cbor",
    "derive_key_id",
    "from_kafka",
    "generate_principal_keys",
    "head_signing_input",
    "head_store_for",
    "head_to_kafka",
    "headless_file_error",
    "issue_key",
    "kafka_key",
    "load_directory",
    "load_key_file",
    "next_head",
    "open_directory_file",
    "peek_record",
    "principal_set",
    "publish_directory_file",
    "read_directory_file",
    "record_digest",
    "record_set",
    "save_key_file",
    "set_digest",
    "sign_directory",
    "signed_record_fields",
    "signing_input",
    "to_kafka",
    "vehicle_agent_scope",
    "verify_signed_head",
    "verify_signed_record",
    "write_directory_file",
    "write_private_file",
]
