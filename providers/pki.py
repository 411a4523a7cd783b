"""A throw-away test PKI for the QKD KME simulator: one CA, KME server certs, SAE client certs.

Not for production: the CA key sits next to the certificates and nothing is revocable. Private
keys are written with mode 0600 (created that way, never chmod-ed after the fact).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetbus.bus.errors import ConfigError

#: Names of the two simulated KMEs; their server certs are ``kme-a.pem`` / ``kme-b.pem``.
KME_NAMES: tuple[str, str] = ("kme-a", "kme-b")
#: Subject CN of the admin client certificate.
ADMIN_CN = "kme-admin"
#: SAE ids become file names and certificate CNs, so they are restricted to a safe alphabet.
_SAE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: SANs every KME server certificate carries.
DEFAULT_SERVER_SANS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class CertKeyPair:
    """Paths of one PEM certificate and its PEM (PKCS#8, unencrypted) private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class TestPKI:
    """Where ``make_test_pki`` wrote everything."""

    __test__ = False  # not a pytest test class, despite the name

    directory: Path
    ca_cert: Path
    ca_key: Path
    kmes: dict[str, CertKeyPair] = field(default_factory=dict)
    saes: dict[str, CertKeyPair] = field(default_factory=dict)
    admin: CertKeyPair | None = None


def validate_sae_id(sae_id: str) -> str:
    """Return ``sae_id`` when it is usable as a CN and a file name, else raise ``ConfigError``."""
    if not _SAE_ID_RE.match(sae_id) or sae_id in KME_NAMES or sae_id in ("ca", "admin"):
        raise ConfigError(
            f"invalid SAE id {sae_id!r}: use 1-64 of [A-Za-z0-9._-], starting alphanumeric, "
            f"and not one of {', '.join((*KME_NAMES, 'ca', 'admin'))}"
        )
    return sae_id


def parse_san(value: str) -> x509.GeneralName:
    """An IP address (v4 or v6, by ``ipaddress``) or a DNS host name as a SAN entry; anything
    else (URLs, ports, wildcards, empty labels) raises ``ConfigError``."""
    text = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.rstrip(".").lower()
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
        raise ConfigError(
            f"invalid SAN {value!r}: give a DNS host name (e.g. kme, kme.fleet.svc) "
            "or an IP address"
        )
    return x509.DNSName(name)


def server_san_list(extra: Sequence[str] = ()) -> list[x509.GeneralName]:
    """The default SANs plus ``extra``, parsed, without duplicates, in order."""
    out: list[x509.GeneralName] = []
    for value in (*DEFAULT_SERVER_SANS, *extra):
        name = parse_san(value)
        if name not in out:
            out.append(name)
    return out


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # The mode argument only applies on creation; an existing file keeps its old mode.
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetbus test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _issue(
    *,
    subject_cn: str,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    server: bool,
    valid_days: int,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(sans) or server_san_list()), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


def _make_ca(valid_days: int, ca_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_test_pki(
    out_dir: Path,
    sae_ids: Sequence[str],
    *,
    admin: bool = True,
    valid_days: int = 30,
    ca_name: str = "fleetbus test KME CA",
    server_sans: Sequence[str] = (),
) -> TestPKI:
    """Write a CA, server certs for both KMEs, one client cert per SAE id and an admin cert.

    Layout of ``out_dir``: ``ca.pem``, ``ca.key``, ``kme-a.{pem,key}``, ``kme-b.{pem,key}``,
    ``<sae_id>.{pem,key}`` and ``admin.{pem,key}``. KME server certs carry the SANs
    ``localhost``, ``127.0.0.1`` and ``::1`` plus ``server_sans`` (DNS names or IP addresses,
    e.g. the ``kme`` host name of a compose service); a client's SAE id is its certificate's
    subject CN.
    """
    sans = server_san_list(server_sans)  # before writing anything: a bad SAN writes nothing
    ids = [validate_sae_id(s) for s in sae_ids]
    if len(set(ids)) != len(ids):
        raise ConfigError("duplicate SAE id in the PKI request")
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _make_ca(valid_days, ca_name)
    ca_pem = out_dir / "ca.pem"
    ca_key_path = out_dir / "ca.key"
    _write_public(ca_pem, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(ca_key_path, _key_pem(ca_key))

    def issue(file_stem: str, cn: str, server: bool) -> CertKeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            subject_cn=cn,
            public_key=key.public_key(),
            ca_cert=ca_cert,
            ca_key=ca_key,
            server=server,
            valid_days=valid_days,
            sans=sans,
        )
        pair = CertKeyPair(out_dir / f"{file_stem}.pem", out_dir / f"{file_stem}.key")
        _write_private(pair.key, _key_pem(key))
        _write_public(pair.cert, cert.public_bytes(serialization.Encoding.PEM))
        return pair

    kmes = {name: issue(name, name.upper(), server=True) for name in KME_NAMES}
    saes = {sae: issue(sae, sae, server=False) for sae in ids}
    admin_pair = issue("admin", ADMIN_CN, server=False) if admin else None
    return TestPKI(
        directory=out_dir,
        ca_cert=ca_pem,
        ca_key=ca_key_path,
        kmes=kmes,
        saes=saes,
        admin=admin_pair,
    )
