"""bus.files (atomic writes) and bus.keyfolder (the names of a key folder's files)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fleetbus.bus.directory import ROOT_KEY, ROOT_PUB, head_store_for
from fleetbus.bus.files import write_atomic, write_private_file
from fleetbus.bus.keyfolder import DIRECTORY, KeyFolder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_private_file_is_0600_and_replaces_an_open_one(tmp_path: Path) -> None:
    path = tmp_path / "sae.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_private_file(path, b"new")
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae.key"]  # no temporary left


def test_write_atomic_keeps_the_mode_asked_for_and_can_sync_the_folder(tmp_path: Path) -> None:
    path = tmp_path / "directory.cbor"
    write_atomic(path, b"public", 0o644, sync_folder=True)
    assert path.read_bytes() == b"public"
    assert _mode(path) == 0o644 & ~_umask()


def test_a_temporary_file_left_by_a_killed_writer_does_not_block_the_next_write(
    tmp_path: Path,
) -> None:
    # The writer of a container restarts with the same pid (1): a temporary named after the pid
    # alone, opened with O_EXCL, made every later write of that file fail with FileExistsError.
    path = tmp_path / "root.key"
    (tmp_path / f".{path.name}.{os.getpid()}.tmp").write_bytes(b"half a key")
    write_private_file(path, b"whole key")
    assert path.read_bytes() == b"whole key"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kme-pool.json"
    path.write_bytes(b"old state")

    def fail(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new state", 0o600)
    assert path.read_bytes() == b"old state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kme-pool.json"]


def test_the_key_folder_names_every_file(tmp_path: Path) -> None:
    folder = KeyFolder(str(tmp_path))
    assert folder.path == tmp_path
    assert folder.root_key == tmp_path / ROOT_KEY == tmp_path / "root.key"
    assert folder.root_pub == tmp_path / ROOT_PUB == tmp_path / "root.pub"
    assert folder.directory == tmp_path / DIRECTORY == tmp_path / "directory.cbor"
    assert folder.private_key("veh-1") == tmp_path / "veh-1.key"
    assert folder.retired_key("veh-1", 3) == tmp_path / "veh-1.v3.key"
    assert folder.head_store("kabc") == tmp_path / "directory-head.kabc.cbor"
    for name in ("veh-1.key", "veh-1.v1.key", "veh-1.v2.key", "veh-10.key", "root.pub"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(p.name for p in folder.retired_keys("veh-1")) == ["veh-1.v1.key", "veh-1.v2.key"]
    assert sorted(p.name for p in folder.private_keys()) == [
        "veh-1.key",
        "veh-1.v1.key",
        "veh-1.v2.key",
        "veh-10.key",
    ]
    assert repr(folder) == f"KeyFolder({str(tmp_path)!r})"


def test_the_head_store_lives_where_the_key_folder_says(tmp_path: Path) -> None:
    class Root:
        key_id = "kroot"

    store = head_store_for(tmp_path, Root())  # type: ignore[arg-type]
    assert store.path == KeyFolder(tmp_path).head_store("kroot")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
