"""The configuration of a simulated KME pair (``KMEPairConfig``) and the KME ID a certificate
names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleetbus.bus.errors import ConfigError
from fleetbus.providers.qkd import kme_id_of_certificate

#: Names of the two simulated KMEs; their server certs are ``kme-a.pem`` / ``kme-b.pem``.
KME_NAMES: tuple[str, str] = ("kme-a", "kme-b")
#: Their default KME IDs: the subject CN of each server certificate, which SAEs check.
DEFAULT_KME_IDS: tuple[str, str] = ("KME-A", "KME-B")
#: Subject CN of the admin client certificate.
ADMIN_CN = "kme-admin"

API_PREFIX = "/api/v1/keys"
#: Largest request body a KME or the admin endpoint reads, in bytes.
MAX_BODY_BYTES = 64 * 1024


class KMEPairConfig(BaseModel):
    """Everything ``fleetbus kme serve`` needs. Ports may be 0 (the OS picks a free one)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port_a: int = Field(8443, ge=0, le=65535)
    port_b: int = Field(8444, ge=0, le=65535)
    #: The admin and metrics port; always bound to 127.0.0.1.
    admin_port: int = Field(9464, ge=0, le=65535)
    #: A second, metrics-only listener (GET /metrics, nothing else); None = off.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    #: Require a client certificate with CN ``kme-admin`` on the admin port (served with KME-A's
    #: server certificate). Off by default: loopback-only plain HTTP, like most exporters.
    admin_mtls: bool = False

    ca_file: Path
    kme_a_cert: Path
    kme_a_key: Path
    kme_b_cert: Path
    kme_b_key: Path
    #: The KME IDs (status ``source_KME_ID``); each must be the subject CN of its KME's server
    #: certificate, which is what SAEs check (014 clause 5.1). ``from_cert_dir`` reads them.
    kme_a_id: str = "KME-A"
    kme_b_id: str = "KME-B"
    #: SAE ids (client-certificate subject CNs) attached to each KME.
    sae_a: tuple[str, ...] = ("sae-dispatch-hub",)
    sae_b: tuple[str, ...] = ("sae-depot-north",)

    key_rate_bps: float = Field(10_000.0, ge=0)
    #: Pool bound, in keys of ``key_size`` bits (the 014 status field ``max_key_count``).
    max_key_count: int = Field(1000, ge=1, le=10_000_000)
    #: Keys in the pool at start; None fills the pool.
    prefill_keys: int | None = Field(None, ge=0)
    key_size: int = Field(256, ge=8)
    min_key_size: int = Field(64, ge=8)
    max_key_size: int = Field(1024, ge=8)
    max_key_per_request: int = Field(128, ge=1)

    qber_baseline: float = Field(0.02, ge=0, le=0.5)
    #: QBER an intercept-resend eavesdropper on BB84 causes (25 %).
    qber_eavesdropper: float = Field(0.25, ge=0, le=0.5)
    qber_threshold: float = Field(0.11, ge=0, le=0.5)
    flush_on_eavesdropper: bool = False
    #: A key reserved by enc_keys and never fetched by the slave is dropped after this long.
    reservation_ttl_s: float = Field(600.0, gt=0)
    #: Where the pool and its reservations are kept across restarts; None = memory only.
    state_dir: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        for name in ("key_size", "min_key_size", "max_key_size"):
            if getattr(self, name) % 8:
                raise ValueError(f"{name} must be a multiple of 8")
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("need min_key_size <= key_size <= max_key_size")
        if not self.sae_a or not self.sae_b:
            raise ValueError("each KME needs at least one SAE")
        if set(self.sae_a) & set(self.sae_b):
            raise ValueError("an SAE id may be attached to one KME only")
        if self.kme_a_id == self.kme_b_id:
            raise ValueError("the two KME ids must differ")
        if self.qber_baseline > self.qber_threshold:
            raise ValueError("qber_baseline above qber_threshold: the link would never run")
        return self

    @classmethod
    def from_cert_dir(cls, cert_dir: Path, **overrides: Any) -> KMEPairConfig:
        """Config reading the file layout ``fleetbus kme certs`` writes; the KME IDs are taken
        from the server certificates when they exist (and not overridden)."""
        a, b = KME_NAMES
        certs = {"kme_a": cert_dir / f"{a}.pem", "kme_b": cert_dir / f"{b}.pem"}
        ids: dict[str, Any] = {
            f"{side}_id": certificate_kme_id(pem)
            for side, pem in certs.items()
            if f"{side}_id" not in overrides and pem.is_file()
        }
        return cls(
            ca_file=cert_dir / "ca.pem",
            kme_a_cert=certs["kme_a"],
            kme_a_key=cert_dir / f"{a}.key",
            kme_b_cert=certs["kme_b"],
            kme_b_key=cert_dir / f"{b}.key",
            **ids,
            **overrides,
        )


def certificate_kme_id(pem_file: Path) -> str:
    """The KME ID a KME server certificate (PEM file) names; ``ConfigError`` if it names none."""
    try:
        cert = x509.load_pem_x509_certificate(pem_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read KME certificate {pem_file}: {exc}") from None
    kme_id = kme_id_of_certificate(cert)
    if kme_id is None:
        raise ConfigError(f"KME certificate {pem_file} has no single subject CN (its KME ID)")
    return kme_id
