"""A throw-away test PKI for the QKD KME simulator (``fleetbus kme certs``): one CA, KME server
certs, SAE client certs.

Not for production: the CA key sits next to the certificates and nothing is revocable. Private
keys are written with mode 0600 (created that way, never chmod-ed after the fact).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.files import write_private_file
from fleetbus.devtools.pki import (
    cn_name,
    issue_cert,
    key_pem,
    make_ca,
    san_list,
)
from fleetbus.devtools.pki import parse_san as parse_san  # `kme certs --san` checks, re-exported
from fleetbus.kmesim.config import ADMIN_CN, DEFAULT_KME_IDS, KME_NAMES

#: SAE ids become file names and certificate CNs, so they are restricted to a safe alphabet.
#: Used with ``fullmatch`` (``$`` would let a trailing newline through).
_SAE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: SANs every KME server certificate carries.
DEFAULT_SERVER_SANS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")


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
    if not _SAE_ID_RE.fullmatch(sae_id) or sae_id in KME_NAMES or sae_id in ("ca", "admin"):
        raise ConfigError(
            f"invalid SAE id {sae_id!r}: use 1-64 of [A-Za-z0-9._-], starting alphanumeric, "
            f"and not one of {', '.join((*KME_NAMES, 'ca', 'admin'))}"
        )
    return sae_id


def server_san_list(extra: Sequence[str] = ()) -> list[x509.GeneralName]:
    """The default SANs plus ``extra``, parsed, without duplicates, in order."""
    return san_list([*DEFAULT_SERVER_SANS, *extra])


def _name(cn: str) -> x509.Name:
    return cn_name(cn, organization="fleetbus test PKI")


def make_test_pki(
    out_dir: Path,
    sae_ids: Sequence[str],
    *,
    admin: bool = True,
    valid_days: int = 30,
    ca_name: str = "fleetbus test KME CA",
    server_sans: Sequence[str] = (),
    kme_ids: tuple[str, str] = DEFAULT_KME_IDS,
) -> TestPKI:
    """Write a CA, server certs for both KMEs, one client cert per SAE id and an admin cert.

    Layout of ``out_dir``: ``ca.pem``, ``ca.key``, ``kme-a.{pem,key}``, ``kme-b.{pem,key}``,
    ``<sae_id>.{pem,key}`` and ``admin.{pem,key}``. KME server certs carry the SANs
    ``localhost``, ``127.0.0.1`` and ``::1`` plus ``server_sans`` (DNS names or IP addresses,
    e.g. the ``kme`` host name of a compose service); a client's SAE id is its certificate's
    subject CN, and a KME's ID (``kme_ids``, KME-A's then KME-B's) its server certificate's.
    Both KMEs share the SANs (they usually share a host), so only the KME ID tells them apart.
    """
    sans = server_san_list(server_sans)  # before writing anything: a bad SAN writes nothing
    ids = [validate_sae_id(s) for s in sae_ids]
    if len(set(ids)) != len(ids):
        raise ConfigError("duplicate SAE id in the PKI request")
    for kme_id in kme_ids:
        if not _SAE_ID_RE.fullmatch(kme_id):
            raise ConfigError(
                f"invalid KME ID {kme_id!r}: use 1-64 of [A-Za-z0-9._-], starting alphanumeric"
            )
    # One name, one identity: a KME ID that is also an SAE id (in any case) invites confusion.
    folded = [i.casefold() for i in (*kme_ids, *ids, ADMIN_CN)]
    if len(set(folded)) != len(folded):
        raise ConfigError("the two KME IDs, the SAE ids and the admin CN must all differ")
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(_name(ca_name), valid_days)
    ca_pem = out_dir / "ca.pem"
    ca_key_path = out_dir / "ca.key"
    ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write_private_file(ca_key_path, key_pem(ca_key))

    def issue(file_stem: str, cn: str, server: bool) -> CertKeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_cert(
            _name(cn),
            key.public_key(),
            ca_cert,
            ca_key,
            server=server,
            client=not server,
            valid_days=valid_days,
            sans=sans,
        )
        pair = CertKeyPair(out_dir / f"{file_stem}.pem", out_dir / f"{file_stem}.key")
        write_private_file(pair.key, key_pem(key))
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return pair

    kmes = {
        name: issue(name, kme_id, server=True)
        for name, kme_id in zip(KME_NAMES, kme_ids, strict=True)
    }
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
