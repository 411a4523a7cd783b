"""``fleetbus keys export``: a service's key folder holds public records and its own keys only;
and a worker warns when its key folder holds the fleet root's private key."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fleetbus.bus.directory import RootPublicKey, load_directory
from fleetbus.bus.errors import ConfigError
from fleetbus.cli.keys import keys_app
from fleetbus.processors.app import warn_if_root_private_key

runner = CliRunner()


def _ok(*args: str) -> Result:
    result = runner.invoke(keys_app, list(args))
    assert result.exit_code == 0, f"{result.output}{result.exception!r}"
    return result


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    _ok("init", "--dir", str(folder))
    _ok("issue", "--dir", str(folder), "--principal", "bus-sealer", "--kind", "sealer",
        "--kem", "xwing")  # fmt: skip
    _ok("issue", "--dir", str(folder), "--principal", "V-0001", "--kind", "vehicle",
        "--kem", "xwing")  # fmt: skip
    _ok("issue", "--dir", str(folder), "--principal", "dispatch-1", "--kind", "dispatcher")
    return folder


def test_export_holds_public_records_and_the_named_keys_only(keys: Path, tmp_path: Path) -> None:
    out = tmp_path / "worker"
    _ok("export", "--dir", str(keys), "--out", str(out), "--principal", "bus-sealer")
    assert sorted(p.name for p in out.iterdir()) == ["bus-sealer.key", "directory.cbor", "root.pub"]
    assert (out / "bus-sealer.key").read_bytes() == (keys / "bus-sealer.key").read_bytes()
    assert stat.S_IMODE((out / "bus-sealer.key").stat().st_mode) == 0o600
    # The export verifies as the original does: same root, same records.
    root = RootPublicKey.from_bytes((out / "root.pub").read_bytes())
    assert len(load_directory(out / "directory.cbor", root).records()) == 3
    assert not warn_if_root_private_key(out)


def test_export_again_drops_keys_no_longer_named_and_keeps_rotated_ones(
    keys: Path, tmp_path: Path
) -> None:
    out = tmp_path / "svc"
    _ok("export", "--dir", str(keys), "--out", str(out), "--principal", "bus-sealer",
        "--principal", "V-0001")  # fmt: skip
    (out / "root.key").write_bytes(b"left by hand")
    _ok("rotate", "--dir", str(keys), "--principal", "V-0001")
    _ok("export", "--dir", str(keys), "--out", str(out), "--principal", "V-0001")
    assert sorted(p.name for p in out.glob("*.key")) == ["V-0001.key", "V-0001.v1.key"]


@pytest.mark.parametrize(
    ("principal", "message"),
    [("nobody", "has no keys"), ("root", "invalid principal")],
)
def test_export_refuses_unknown_principals_and_the_root(
    keys: Path, tmp_path: Path, principal: str, message: str
) -> None:
    out = tmp_path / "svc"
    result = runner.invoke(
        keys_app, ["export", "--dir", str(keys), "--out", str(out), "--principal", principal]
    )
    assert isinstance(result.exception, ConfigError)
    assert message in str(result.exception)
    assert not out.exists()


def test_export_refuses_to_write_over_the_source(keys: Path) -> None:
    result = runner.invoke(keys_app, ["export", "--dir", str(keys), "--out", str(keys)])
    assert isinstance(result.exception, ConfigError)
    assert (keys / "root.key").exists()


def test_worker_warns_about_a_root_private_key(
    keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fleetbus.processors.app"):
        assert warn_if_root_private_key(keys)
    (record,) = caplog.records
    assert "fleet root's private key" in record.getMessage()
    assert "fleetbus keys export" in record.getMessage()
