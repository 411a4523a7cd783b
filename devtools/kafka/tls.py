"""The broker PKI of ``security="mtls"``: a throw-away CA, certificates whose CN is the Kafka
principal, and ``write_pki`` for a cluster outside the tests (docker-compose)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.files import write_private_file
from fleetbus.devtools.pki import cn_name, issue_cert, key_pem, make_ca, san_list

#: Principal (certificate CN) of the brokers themselves in ``security="mtls"`` mode.
BROKER_PRINCIPAL: Final = "broker"
#: Principal of the operator / test harness: a super user like the brokers.
ADMIN_PRINCIPAL: Final = "admin"
#: ``User:<CN>`` from a subject DN ``CN=<CN>`` (our certificates carry only a CN).
PRINCIPAL_MAPPING_RULES: Final = "RULE:^CN=([^,]+)$/$1/,DEFAULT"
Security = Literal["plaintext", "mtls"]


def write_pki(
    out: Path,
    *,
    broker_sans: Sequence[str] = (),
    clients: Sequence[str] = (),
    mounted_at: str | None = None,
) -> list[Path]:
    """A broker PKI in ``out`` for a cluster outside this machine's tests (docker-compose):
    ``ca.pem``/``ca.key``; the broker's ``broker.pem``/``.key`` naming ``localhost``,
    ``127.0.0.1`` and ``broker_sans`` (DNS names or IP addresses); for every client
    ``<cn>.pem``/``.key``; Kafka's PEM key store (key, then certificate) for each of them as
    ``<cn>.keystore.pem``; and for every client a Java client config ``<cn>.properties``
    (for Kafka's own tools, ``--command-config``) naming the files under ``mounted_at``
    (default: ``out``). Existing files are kept. Returns the files; private ones are 0600."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    ensure_ca(out)
    where = (mounted_at or str(out)).rstrip("/")
    written = [out / "ca.pem", out / "ca.key"]
    for cn, server in [(BROKER_PRINCIPAL, True), *((c, False) for c in clients)]:
        cert, key = issue_pair(out, cn, server=server, sans=broker_sans if server else ())
        keystore = out / f"{cn}.keystore.pem"
        if not keystore.exists():
            write_private_file(keystore, key.read_bytes() + cert.read_bytes())
        written += [cert, key, keystore]
        if not server:
            config = out / f"{cn}.properties"
            config.write_text(
                "security.protocol=SSL\n"
                "ssl.keystore.type=PEM\n"
                f"ssl.keystore.location={where}/{cn}.keystore.pem\n"
                "ssl.truststore.type=PEM\n"
                f"ssl.truststore.location={where}/ca.pem\n"
            )
            written.append(config)
    return written


# -- the throw-away CA ----------------------------------------------------------------------


def ensure_ca(tls_dir: Path) -> None:
    """Write ``ca.pem`` / ``ca.key`` (EC P-256, 30 days) unless they exist."""
    if (tls_dir / "ca.pem").exists() and (tls_dir / "ca.key").exists():
        return
    from cryptography.hazmat.primitives import serialization

    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = make_ca(cn_name("fleetbus dev Kafka CA"), 30)
    write_private_file(tls_dir / "ca.key", key_pem(key))
    (tls_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue_pair(
    tls_dir: Path, cn: str, *, server: bool, sans: Sequence[str] = ()
) -> tuple[Path, Path]:
    """``<cn>.pem`` / ``<cn>.key`` signed by the CA (subject exactly ``CN=<cn>``, which
    ``PRINCIPAL_MAPPING_RULES`` turn into ``User:<cn>``), reused if present.

    Broker certificates are for server and client use (brokers connect to each other) and
    name ``localhost`` / ``127.0.0.1`` and ``sans``; client certificates are for client use
    only.
    """
    import re

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", cn):
        raise ConfigError(f"invalid principal {cn!r} for a certificate CN")
    names = san_list(["localhost", "127.0.0.1", *sans]) if server else []
    cert_path, key_path = tls_dir / f"{cn}.pem", tls_dir / f"{cn}.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    ca_cert = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_cert(
        cn_name(cn),
        key.public_key(),
        ca_cert,
        ca_key,
        server=server,
        client=True,
        valid_days=30,
        sans=names,
    )
    write_private_file(key_path, key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
