"""`fleetbus keys` through typer's CliRunner: init, issue, rotate, revoke, show."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fleetbus.bus.directory import (
    RootPublicKey,
    head_store_for,
    load_directory,
    load_key_file,
    read_directory_file,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.cli.keys import keys_app

runner = CliRunner()


def _run(*args: str) -> Result:
    return runner.invoke(keys_app, list(args))


def _ok(*args: str) -> Result:
    result = _run(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    _ok("init", "--dir", str(directory))
    return directory


def _private_strings(paths: list[Path]) -> list[str]:
    forms: list[str] = []
    for path in paths:
        for raw in load_key_file(path).private_keys.values():
            forms += [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()]
            forms.append(base64.urlsafe_b64encode(raw).decode().rstrip("="))
    return forms


def test_init_creates_root_files(keydir: Path) -> None:
    assert _mode(keydir / "root.key") == 0o600
    root = RootPublicKey.from_bytes((keydir / "root.pub").read_bytes())
    assert root.suite == "composite-mldsa65-ed25519"
    content = read_directory_file(keydir / "directory.cbor")
    assert content.records == []
    assert content.head is not None
    assert content.head.head.seq == 1
    assert load_key_file(keydir / "root.key").key_id == root.key_id
    result = _run("init", "--dir", str(keydir))
    assert result.exit_code != 0
    assert isinstance(result.exception, FleetbusError)
    assert result.exception.reason is ReasonCode.CONFIG


def test_full_lifecycle(keydir: Path) -> None:
    d = str(keydir)
    _ok(
        "issue", "--dir", d, "--principal", "veh-0001", "--kind", "vehicle",
        "--kem", "xwing", "--kem", "x25519", "--qkd-sae-id", "SAE_VEH_0001",
        "--valid-days", "90", "--capability", "ota",
    )  # fmt: skip
    _ok("issue", "--dir", d, "--principal", "dispatch-1", "--kind", "dispatcher")
    assert _mode(keydir / "veh-0001.key") == 0o600
    assert _mode(keydir / "dispatch-1.key") == 0o600

    root = RootPublicKey.from_bytes((keydir / "root.pub").read_bytes())
    directory = load_directory(keydir / "directory.cbor", root)
    v1 = directory.latest("veh-0001")
    assert v1.version == 1
    assert set(v1.public_keys) == {"ed25519", "mldsa65", "xwing", "x25519"}
    assert v1.capabilities == {"ota", "pqc", "qkd"}
    assert v1.qkd_sae_id == "SAE_VEH_0001"
    assert v1.not_after - v1.not_before == pytest.approx(90 * 86400)
    key_file = load_key_file(keydir / "veh-0001.key")
    assert key_file.key_id == v1.key_id
    message = b"unlock"
    verifier = directory.verifier_for("veh-0001", v1.key_id, at=v1.not_before + 1)
    assert verifier.verify(message, key_file.signer().sign(message))

    _ok("rotate", "--dir", d, "--principal", "veh-0001", "--overlap-hours", "2")
    assert _mode(keydir / "veh-0001.key") == 0o600
    assert _mode(keydir / "veh-0001.v1.key") == 0o600
    directory = load_directory(keydir / "directory.cbor", root)
    v2 = directory.latest("veh-0001")
    assert v2.version == 2
    assert v2.key_id != v1.key_id
    assert v2.overlap_s == 2 * 3600
    assert set(v2.public_keys) == set(v1.public_keys)
    assert v2.qkd_sae_id == "SAE_VEH_0001"
    assert load_key_file(keydir / "veh-0001.key").key_id == v2.key_id
    assert load_key_file(keydir / "veh-0001.v1.key").key_id == v1.key_id
    directory.verifier_for("veh-0001", v1.key_id, at=v2.not_before + 3600)
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("veh-0001", v1.key_id, at=v2.not_before + 2 * 3600 + 1)
    assert exc.value.reason is ReasonCode.SIGNER_EXPIRED

    _ok("revoke", "--dir", d, "--principal", "veh-0001", "--key-id", v2.key_id)
    directory = load_directory(keydir / "directory.cbor", root)
    with pytest.raises(FleetbusError) as exc:
        directory.verifier_for("veh-0001", v2.key_id, at=v2.not_before + 1)
    assert exc.value.reason is ReasonCode.SIGNER_REVOKED

    shown = _ok("show", "--dir", d).output
    assert "veh-0001" in shown
    assert "dispatch-1" in shown
    assert v1.key_id in shown
    assert v2.key_id in shown
    assert "REVOKED" in shown
    as_json = json.loads(_ok("show", "--dir", d, "--principal", "veh-0001", "--json").output)
    assert as_json["root_key_id"] == root.key_id
    # init, two issues, a rotation and a revocation: one head each.
    assert as_json["head"]["seq"] == 5
    assert "directory head 5" in shown
    rows = as_json["records"]
    assert [r["version"] for r in rows] == [1, 2]
    assert rows[1]["revoked"] is True
    assert rows[0]["revoked"] is False
    assert rows[0]["superseded_after"] is not None
    assert rows[0]["algorithms"] == ["ed25519", "mldsa65", "x25519", "xwing"]

    # No private key material (of any principal or the root) in any output form.
    secrets = _private_strings(sorted(keydir.glob("*.key")))
    assert len(secrets) >= 4 * 6
    for output in (shown, json.dumps(as_json), _ok("show", "--dir", d, "--json").output):
        for secret in secrets:
            assert secret not in output


def test_issue_errors(keydir: Path) -> None:
    d = str(keydir)
    _ok("issue", "--dir", d, "--principal", "veh-1", "--kind", "vehicle")
    again = _run("issue", "--dir", d, "--principal", "veh-1", "--kind", "vehicle")
    assert again.exit_code != 0
    assert isinstance(again.exception, FleetbusError)
    bad_kind = _run("issue", "--dir", d, "--principal", "x", "--kind", "spaceship")
    assert isinstance(bad_kind.exception, FleetbusError)
    bad_kem = _run("issue", "--dir", d, "--principal", "y", "--kind", "edge", "--kem", "rsa")
    assert isinstance(bad_kem.exception, FleetbusError)
    bad_name = _run("issue", "--dir", d, "--principal", "../etc", "--kind", "edge")
    assert isinstance(bad_name.exception, FleetbusError)
    assert not (keydir.parent / "etc.key").exists()


def test_revoke_unknown_key(keydir: Path) -> None:
    d = str(keydir)
    _ok("issue", "--dir", d, "--principal", "veh-1", "--kind", "vehicle")
    result = _run("revoke", "--dir", d, "--principal", "veh-1", "--key-id", "k-nope")
    assert isinstance(result.exception, FleetbusError)
    assert result.exception.reason is ReasonCode.UNKNOWN_SIGNER


def test_tampered_directory_is_rejected(keydir: Path) -> None:
    d = str(keydir)
    _ok("issue", "--dir", d, "--principal", "veh-1", "--kind", "vehicle")
    path = keydir / "directory.cbor"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # inside the last signed record (its root key id)
    path.write_bytes(bytes(data))
    result = _run("show", "--dir", d)
    assert isinstance(result.exception, FleetbusError)
    assert result.exception.reason in {ReasonCode.BAD_SIGNATURE, ReasonCode.MALFORMED}


def test_loose_root_key_mode_is_refused(keydir: Path) -> None:
    (keydir / "root.key").chmod(0o640)
    result = _run("issue", "--dir", str(keydir), "--principal", "veh-1", "--kind", "vehicle")
    assert isinstance(result.exception, FleetbusError)
    assert result.exception.reason is ReasonCode.CONFIG


def test_a_principal_id_with_a_trailing_newline_is_refused(keydir: Path) -> None:
    # The pattern ended with `$`, which also matches before a final newline.
    result = _run("issue", "--dir", str(keydir), "--principal", "veh-1\n", "--kind", "vehicle")
    assert isinstance(result.exception, FleetbusError)
    assert "invalid principal id" in str(result.exception)
    assert not (keydir / "veh-1\n.key").exists()


def test_every_change_publishes_a_new_head_over_the_records(keydir: Path) -> None:
    d = str(keydir)
    root = RootPublicKey.from_bytes((keydir / "root.pub").read_bytes())
    seqs = []
    for args in (
        ("issue", "--principal", "dispatch-1", "--kind", "dispatcher"),
        ("rotate", "--principal", "dispatch-1"),
        ("revoke", "--principal", "dispatch-1"),
    ):
        _ok(args[0], "--dir", d, *args[1:])
        content = read_directory_file(keydir / "directory.cbor")
        assert content.head is not None
        seqs.append(content.head.head.seq)
        # The folder remembers the head it wrote.
        stored = head_store_for(keydir, root).load(root)
        assert stored is not None
        assert stored.head == content.head.head
    assert seqs == [2, 3, 4]
    assert load_directory(keydir / "directory.cbor", root).unsettled_sets() == []


def test_an_older_directory_file_is_refused_by_the_keys_commands(keydir: Path) -> None:
    d = str(keydir)
    _ok("issue", "--dir", d, "--principal", "dispatch-1", "--kind", "dispatcher")
    before_revocation = (keydir / "directory.cbor").read_bytes()
    _ok("revoke", "--dir", d, "--principal", "dispatch-1")
    (keydir / "directory.cbor").write_bytes(before_revocation)
    for args in (("show",), ("issue", "--principal", "dispatch-2", "--kind", "dispatcher")):
        result = _run(args[0], "--dir", d, *args[1:])
        assert result.exit_code != 0
        assert isinstance(result.exception, FleetbusError)
        assert result.exception.reason is ReasonCode.DIRECTORY_ROLLBACK
    # Signing a new head over the rolled-back records would make the rollback permanent.
    assert read_directory_file(keydir / "directory.cbor").records != []
    content = read_directory_file(keydir / "directory.cbor")
    assert content.head is not None
    assert content.head.head.seq == 2


def test_migrate_signs_the_first_head_of_a_headless_directory(keydir: Path) -> None:
    import cbor2

    d = str(keydir)
    _ok("issue", "--dir", d, "--principal", "dispatch-1", "--kind", "dispatcher")
    _ok("revoke", "--dir", d, "--principal", "dispatch-1")
    content = read_directory_file(keydir / "directory.cbor")
    root = RootPublicKey.from_bytes((keydir / "root.pub").read_bytes())
    # A folder as an older fleetbus left it: a bare array of records, no head, no head state.
    legacy = cbor2.dumps([s.to_cbor() for s in content.records], canonical=True)
    (keydir / "directory.cbor").write_bytes(legacy)
    head_store_for(keydir, root).path.unlink()
    result = _run("show", "--dir", d)
    assert result.exit_code != 0
    assert isinstance(result.exception, FleetbusError)
    assert result.exception.reason is ReasonCode.CONFIG
    assert "keys migrate" in str(result.exception)
    out = _ok("migrate", "--dir", d).output
    assert "1 records (1 revoked)" in out
    directory = load_directory(keydir / "directory.cbor", root)
    assert directory.head is not None
    assert directory.head.seq == 1
    assert directory.latest("dispatch-1").revoked
    again = _run("migrate", "--dir", d)
    assert again.exit_code != 0
    assert isinstance(again.exception, FleetbusError)
    assert again.exception.reason is ReasonCode.CONFIG
    # Migrating a headless copy after the folder has seen a head is a rollback, not a migration.
    (keydir / "directory.cbor").write_bytes(legacy)
    result = _run("migrate", "--dir", d)
    assert isinstance(result.exception, FleetbusError)
    assert result.exception.reason is ReasonCode.DIRECTORY_ROLLBACK


def test_issue_refuses_kem_keys_no_chosen_profile_can_seal_to(keydir: Path) -> None:
    """Issue 13: mlkem768 + x25519 earns pqc, whose default profile seals only on xwing, so
    every command to the vehicle would fail key_path_exhausted. The CLI says so and writes
    nothing."""
    d = str(keydir)
    before = (keydir / "directory.cbor").read_bytes()
    result = _run("issue", "--dir", d, "--principal", "veh-ml", "--kind", "vehicle",
                  "--kem", "mlkem768", "--kem", "x25519")  # fmt: skip
    assert isinstance(result.exception, FleetbusError)
    assert result.exception.reason is ReasonCode.CONFIG
    assert "profile pqc" in str(result.exception)
    assert "mlkem768, x25519" in str(result.exception)
    assert not (keydir / "veh-ml.key").exists()
    assert (keydir / "directory.cbor").read_bytes() == before
    # The same for an x25519 key under the default composite (ML-DSA) suite, which earns pqc;
    # under Ed25519 it is a legacy vehicle and the legacy profile seals to it.
    legacy = ("issue", "--dir", d, "--principal", "veh-old", "--kind", "vehicle",
              "--kem", "x25519")  # fmt: skip
    assert "profile pqc" in str(_run(*legacy).exception)
    _ok(*legacy, "--suite", "ed25519")
    # Edge units are recipients too; a sealer's KEM keys are for uplink, no profile applies.
    edge = _run("issue", "--dir", d, "--principal", "edge-1", "--kind", "edge",
                "--kem", "mlkem768", "--kem", "x25519", "--qkd-sae-id", "SAE_EDGE_1")  # fmt: skip
    assert "profile enclave" in str(edge.exception)
    assert "profile standard" in str(edge.exception)
    _ok("issue", "--dir", d, "--principal", "sealer-2", "--kind", "sealer", "--kem", "mlkem768")


def test_issue_accepts_kem_keys_a_configured_profile_seals_to(
    keydir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipe of docs/key-paths.md §3: a profile on mlkem768+x25519 and a rule for a
    capability given at issue, ahead of the pqc rule."""
    profiles = {
        "pqc": {"key_paths": ["xwing"], "minimum_path": "xwing"},
        "mlkem-hybrid": {"key_paths": ["mlkem768+x25519"], "minimum_path": "xwing"},
        "legacy": {"key_paths": ["x25519"], "minimum_path": "x25519"},
    }
    rules = [
        {"profile": "mlkem-hybrid", "capability": "mlkem-hybrid"},
        {"profile": "pqc", "capability": "pqc"},
        {"profile": "legacy"},
    ]
    monkeypatch.setenv("FLEETBUS_PROFILES", json.dumps(profiles))
    monkeypatch.setenv("FLEETBUS_PROFILE_RULES", json.dumps(rules))
    d = str(keydir)
    args = ("issue", "--dir", d, "--principal", "veh-ml", "--kind", "vehicle",
            "--kem", "mlkem768", "--kem", "x25519")  # fmt: skip
    assert "profile pqc" in str(_run(*args).exception)
    _ok(*args, "--capability", "mlkem-hybrid")
    record = load_directory(keydir / "directory.cbor", RootPublicKey.from_bytes(
        (keydir / "root.pub").read_bytes())).latest("veh-ml")  # fmt: skip
    assert {"pqc", "mlkem-hybrid"} <= record.capabilities
