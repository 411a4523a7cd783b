"""Private key files: a principal's keys as stored on disk (JSON, mode 0600)."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fleetbus.bus.directory.records import PRIVATE_KEY_FORMAT, KeyRecord, _malformed, derive_key_id
from fleetbus.bus.errors import ConfigError
from fleetbus.bus.files import write_private_file
from fleetbus.bus.keys import (
    PrivateKeySet,
    Signer,
)
from fleetbus.bus.registry import load_signature_suite

# --- private key files ---------------------------------------------------------------------


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
