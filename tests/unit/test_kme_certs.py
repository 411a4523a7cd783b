"""`fleetbus kme certs`: extra DNS names and IP addresses (`--san`) in the KME server
certificates, and the KME ID each one names (`--kme-a-id`, `--kme-b-id`)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fleetbus.bus.errors import ConfigError
from fleetbus.cli.kme import kme_app
from fleetbus.devtools.kme_pki import make_test_pki, parse_san
from fleetbus.kmesim.config import KMEPairConfig
from fleetbus.kmesim.server import KMEPair


def sans_of(cert_file: Path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return dns, ips


def test_san_options_end_up_in_both_kme_server_certificates(tmp_path: Path) -> None:
    args = ["certs", "--out", str(tmp_path), "--sae", "sae-hub", "--sae", "sae-edge-1"]
    args += ["--san", "kme", "--san", "kme.fleet.svc.cluster.local", "--san", "10.0.0.5"]
    args += ["--san", "fd00::1", "--san", "KME"]  # a name twice (any case) is listed once
    result = CliRunner().invoke(kme_app, args)
    assert result.exit_code == 0, result.output
    for name in ("kme-a", "kme-b"):
        dns, ips = sans_of(tmp_path / f"{name}.pem")
        assert dns == {"localhost", "kme", "kme.fleet.svc.cluster.local"}
        assert ips == {"127.0.0.1", "::1", "10.0.0.5", "fd00::1"}
    # Client certificates are identified by their CN and carry no server SANs.
    client = x509.load_pem_x509_certificate((tmp_path / "sae-hub.pem").read_bytes())
    with pytest.raises(x509.ExtensionNotFound):
        client.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_without_san_the_server_certificates_name_loopback_only(tmp_path: Path) -> None:
    result = CliRunner().invoke(kme_app, ["certs", "--out", str(tmp_path), "--sae", "sae-hub"])
    assert result.exit_code == 0, result.output
    assert sans_of(tmp_path / "kme-a.pem") == ({"localhost"}, {"127.0.0.1", "::1"})


@pytest.mark.parametrize(
    "bad",
    [
        *("", "https://kme:8443", "kme:8443", "*.fleet.svc", "-kme", "a..b", "ké", "x" * 64),
        "kme\n.fleet",  # a label ending in a newline passed the `$`-anchored match
    ],
)
def test_a_bad_san_is_refused_before_anything_is_written(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid SAN"):
        parse_san(bad)
    out = tmp_path / "pki"
    result = CliRunner().invoke(kme_app, ["certs", "--out", str(out), "--san", bad])
    assert result.exit_code == 2
    assert "invalid SAN" in result.output
    assert not out.exists()


def test_ip_addresses_are_parsed_as_ip_sans() -> None:
    assert parse_san("192.168.1.7") == x509.IPAddress(ipaddress.ip_address("192.168.1.7"))
    assert parse_san("2001:db8::7") == x509.IPAddress(ipaddress.ip_address("2001:db8::7"))
    assert parse_san("Kme.Fleet.") == x509.DNSName("kme.fleet")


# -- the KME IDs: each KME server certificate names its own (subject CN), which SAEs check ----


def _cn(cert_file: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def test_the_two_kme_certificates_name_different_kme_ids_which_serve_reports(
    tmp_path: Path,
) -> None:
    default, custom = tmp_path / "default", tmp_path / "custom"
    result = CliRunner().invoke(kme_app, ["certs", "--out", str(default), "--sae", "sae-hub"])
    assert result.exit_code == 0, result.output
    assert (_cn(default / "kme-a.pem"), _cn(default / "kme-b.pem")) == (["KME-A"], ["KME-B"])
    args = ["certs", "--out", str(custom), "--sae", "sae-hub", "--kme-a-id", "hub-kme"]
    result = CliRunner().invoke(kme_app, [*args, "--kme-b-id", "depot-kme"])
    assert result.exit_code == 0, result.output
    assert (_cn(custom / "kme-a.pem"), _cn(custom / "kme-b.pem")) == (["hub-kme"], ["depot-kme"])
    # `kme serve` reads its config this way: status source_KME_ID is what the certificate says.
    config = KMEPairConfig.from_cert_dir(custom)
    assert (config.kme_a_id, config.kme_b_id) == ("hub-kme", "depot-kme")


def test_serve_refuses_a_kme_id_its_certificate_does_not_name(tmp_path: Path) -> None:
    make_test_pki(tmp_path, ["sae-hub"])
    config = KMEPairConfig.from_cert_dir(tmp_path, kme_a_id="KME-X")
    with pytest.raises(ConfigError, match="does not name KME ID 'KME-X'"):
        KMEPair(config)


@pytest.mark.parametrize(
    ("kme_ids", "saes"),
    [
        (("KME-A", "KME-A"), ["sae-hub"]),
        (("KME-A", "KME-B"), ["kme-b"]),  # an SAE id equal to a KME ID, in any case
        (("KME-A", "kme-admin"), ["sae-hub"]),
        (("KME A", "KME-B"), ["sae-hub"]),
        (("KME-A\n", "KME-B"), ["sae-hub"]),
        (("KME-A", "KME-B"), ["sae-hub\n"]),  # `$` matched before a trailing newline
    ],
)
def test_colliding_or_malformed_ids_are_refused_before_anything_is_written(
    tmp_path: Path, kme_ids: tuple[str, str], saes: list[str]
) -> None:
    with pytest.raises(ConfigError):
        make_test_pki(tmp_path / "pki", saes, kme_ids=kme_ids)
    assert not (tmp_path / "pki").exists()
