"""The layout of a key folder (``fleetbus keys --dir``, a worker's ``key_dir``): one place names
every file in it, so the CLI, the SDKs, devtools and tests never spell a file name themselves.

- ``root.key`` (0600): the fleet root's private keys (on the root holder's copy only)
- ``root.pub``: the pinned root public key
- ``directory.cbor``: the signed directory head and the records it covers
- ``<principal>.key`` (0600): a principal's private keys; ``<principal>.v<n>.key``: rotated out
- ``directory-head.<root kid>.cbor``: the highest head accepted from this folder (``HeadStore``)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

__all__ = ["DIRECTORY", "ROOT_KEY", "ROOT_PUB", "KeyFolder"]

ROOT_KEY: Final = "root.key"
ROOT_PUB: Final = "root.pub"
DIRECTORY: Final = "directory.cbor"
_KEY_SUFFIX: Final = ".key"


class KeyFolder:
    """The files of one key folder (nothing is read or created here)."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"KeyFolder({str(self.path)!r})"

    @property
    def root_key(self) -> Path:
        return self.path / ROOT_KEY

    @property
    def root_pub(self) -> Path:
        return self.path / ROOT_PUB

    @property
    def directory(self) -> Path:
        return self.path / DIRECTORY

    def private_key(self, principal_id: str) -> Path:
        """A principal's current private key file."""
        return self.path / f"{principal_id}{_KEY_SUFFIX}"

    def retired_key(self, principal_id: str, version: int) -> Path:
        """Where ``keys rotate`` keeps a principal's key of ``version`` once replaced."""
        return self.path / f"{principal_id}.v{version}{_KEY_SUFFIX}"

    def retired_keys(self, principal_id: str) -> Iterator[Path]:
        return self.path.glob(f"{principal_id}.v*{_KEY_SUFFIX}")

    def private_keys(self) -> Iterator[Path]:
        """Every private key file (the root's, principals', retired ones)."""
        return self.path.glob(f"*{_KEY_SUFFIX}")

    def head_store(self, root_key_id: str) -> Path:
        """The head store file of loaders of the root ``root_key_id`` (one per root, so a
        folder that outlives a fleet root never mixes two fleets' sequences)."""
        return self.path / f"directory-head.{root_key_id}.cbor"
