"""The ``qkd-etsi014`` key provider: a QKD key from any ETSI GS QKD 014 KME, by key_ID.

The sender (master SAE) asks its own KME for a key for the recipient's SAE (``enc_keys``) and
puts the key_ID in the envelope; the recipient (slave SAE) fetches the same key from its own KME
with that key_ID (``dec_keys``). The key is only as good as the KMEs: QKD moves key material
between *trusted* nodes; a compromised KME knows every key it served. That is why fleetbus only
ever mixes a QKD key with a PQC KEM secret (the combiner), never uses it alone.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import (
    Encapsulation,
    KeyProvider,
    KeyProviderError,
    PrivateKeySet,
    ProviderTraits,
    RecipientKeys,
)

if TYPE_CHECKING:
    from fleetbus.bus.settings import FleetbusSettings

API_PREFIX = "/api/v1/keys"
#: How long a status answer is trusted for the fail-fast check before ``enc_keys``.
STATUS_CACHE_S = 1.0
#: key_IDs are UUIDs in 014; accept any short printable token from another KME, nothing more.
#: Always used with ``fullmatch``: ``$`` would also match before a trailing newline.
_KEY_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
_MAX_RESPONSE_BYTES = 1 << 20


def kme_id_of_certificate(cert: x509.Certificate | bytes) -> str | None:
    """The KME ID a KME server certificate (or its DER bytes) names: its one subject CN.

    fleetbus's choice for 014 clause 5.1, like an SAE id is its client certificate's CN. A
    certificate with no CN, or with several, names no KME ID.
    """
    if isinstance(cert, bytes):
        try:
            cert = x509.load_der_x509_certificate(cert)
        except ValueError:
            return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return names[0].value


@dataclass(frozen=True)
class QKDConfig:
    """What ``QKDProvider`` takes from the bus's settings (``FLEETBUS_QKD_*``)."""

    kme_url: str
    kme_id: str | None
    sae_id: str
    ca_file: str
    cert_file: str
    key_file: str
    timeout_s: float


@dataclass(frozen=True)
class _Status:
    at: float
    stored_key_count: int


class QKDProvider(KeyProvider):
    """Key provider over the ETSI GS QKD 014 REST API (HTTPS with mutual TLS, JSON).

    One instance speaks for one SAE at one KME. Senders need ``sae_id``; recipients also need
    ``master_sae_id`` (the SAE whose ``enc_keys`` call produced the key), because the 014
    ``dec_keys`` URL names the master. ``kme_id`` is the KME ID the KME's server certificate
    must name (its subject commonName, 014 clause 5.1); there is no default.
    """

    name = "qkd-etsi014"
    algorithm = None
    # Information-theoretic key distribution between trusted KMEs: no computational assumption
    # a quantum computer could break (``traits.quantum_safe``), but not a post-quantum KEM. The
    # KMEs themselves must be trusted (docs/qkd.md).
    traits = ProviderTraits(qkd=True, needs_sae_id=True)

    @classmethod
    def config_from_settings(cls, settings: FleetbusSettings) -> QKDConfig | None:
        """The bus's own SAE at its KME; None (not loaded) when no KME URL is set."""
        if not settings.qkd_kme_url:
            return None
        return QKDConfig(
            kme_url=settings.qkd_kme_url,
            kme_id=settings.qkd_kme_id,
            sae_id=settings.qkd_sae_id or settings.sealer_principal,
            ca_file=settings.qkd_ca_file or "",
            cert_file=settings.qkd_cert_file or "",
            key_file=settings.qkd_key_file or "",
            timeout_s=min(settings.provider_timeout_s, 5.0),
        )

    def __init__(
        self,
        *,
        kme_url: str,
        sae_id: str,
        kme_id: str | None = None,
        ca_file: str | Path,
        cert_file: str | Path,
        key_file: str | Path,
        master_sae_id: str | None = None,
        timeout_s: float = 2.0,
        key_size_bits: int = 256,
        check_status: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        url = urlsplit(kme_url)
        if url.scheme != "https" or not url.hostname:
            raise KeyProviderError(
                f"kme_url must be an https:// URL, got {kme_url!r}", reason=ReasonCode.CONFIG
            )
        if not kme_id:
            # Fail closed: CA and host name alone accept every KME the CA ever certified.
            raise KeyProviderError(
                "kme_id is required: the KME ID the KME's certificate must name "
                "(ETSI GS QKD 014 clause 5.1)",
                reason=ReasonCode.CONFIG,
            )
        if key_size_bits <= 0 or key_size_bits % 8:
            raise KeyProviderError(
                "key_size_bits must be a positive multiple of 8", reason=ReasonCode.CONFIG
            )
        self._host = url.hostname
        self._port = url.port or 443
        self._base = url.path.rstrip("/")
        self.kme_url = kme_url
        self.kme_id = kme_id
        self.sae_id = sae_id
        self.master_sae_id = master_sae_id
        self.timeout_s = timeout_s
        self.key_size_bits = key_size_bits
        self.check_status = check_status
        self._clock = clock
        if not str(ca_file):
            # create_default_context(cafile="") would fall back to the system trust store.
            raise KeyProviderError(
                "ca_file must name the KME's CA; the system trust store is not used",
                reason=ReasonCode.CONFIG,
            )
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(cert_file), str(key_file))
        except (OSError, ssl.SSLError) as exc:
            raise KeyProviderError(
                f"cannot load QKD client TLS material: {type(exc).__name__}",
                reason=ReasonCode.CONFIG,
            ) from None
        # create_default_context already sets these; stated because the trust model needs them.
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._ssl = ctx
        self._lock = threading.Lock()
        self._status: dict[str, _Status] = {}
        self._healthy: bool | None = None

    def __repr__(self) -> str:
        return (
            f"QKDProvider(kme_url={self.kme_url!r}, kme_id={self.kme_id!r}, sae_id={self.sae_id!r})"
        )

    # -- HTTP ----------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None
    ) -> tuple[int, dict[str, Any]]:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPSConnection(
            self._host, self._port, context=self._ssl, timeout=self.timeout_s
        )
        try:
            conn.connect()
            # Before the request: a key_ID must not reach, nor a key be drawn from, another KME.
            self._confirm_kme_id(conn.sock)
            conn.request(method, self._base + path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(_MAX_RESPONSE_BYTES + 1)
            status = resp.status
        except ssl.SSLCertVerificationError:
            self._healthy = False
            raise KeyProviderError(
                f"KME {self.kme_url} presented a certificate that does not verify",
                reason=ReasonCode.CONFIG,
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            # Timeouts, refused connections, resets, TLS alerts: the KME is not usable now.
            self._healthy = False
            raise KeyProviderError(
                f"KME {self.kme_url} unreachable: {type(exc).__name__}",
                reason=ReasonCode.QKD_UNAVAILABLE,
            ) from None
        finally:
            conn.close()
        if len(raw) > _MAX_RESPONSE_BYTES:
            raise KeyProviderError("KME response too large", reason=ReasonCode.KEY_PROVIDER_FAILED)
        try:
            data = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            raise KeyProviderError(
                f"KME answered HTTP {status} without a JSON object",
                reason=ReasonCode.KEY_PROVIDER_FAILED,
            )
        return status, data

    def _confirm_kme_id(self, sock: Any) -> None:
        """014 clause 5.1: the SAE confirms the KME ID from the KME's certificate.

        The CA and host-name checks only say "some KME of this CA at this address"; the two KMEs
        of a link (or every KME of an operator) usually share both, so the ID is compared too.
        """
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        presented = kme_id_of_certificate(der) if der else None
        if presented != self.kme_id:
            self._healthy = False
            raise KeyProviderError(
                f"KME {self.kme_url} presented a certificate for KME ID {presented!r}, "
                f"expected {self.kme_id!r}",
                reason=ReasonCode.CONFIG,
            )

    def _fail(self, status: int, data: Mapping[str, Any], operation: str) -> KeyProviderError:
        # The 014 error body carries only "message" and "details"; never echo a key field.
        message = data.get("message")
        text = message[:200] if isinstance(message, str) else "no message"
        if status == 503:
            self._healthy = False
            reason = ReasonCode.QKD_UNAVAILABLE
        elif operation == "dec_keys" and status in (400, 401):
            # 014 Table 7: 401 when this SAE is not the key's slave; 400 when the KME does not
            # know the key_ID (any more). Either way this envelope's key is not ours to have.
            # An SAE not attached to its KME also gets 401; healthy() (a status call) shows it.
            reason = ReasonCode.UNKNOWN_KEY_ID
        elif status in (400, 401):
            reason = ReasonCode.CONFIG
        else:
            reason = ReasonCode.KEY_PROVIDER_FAILED
        return KeyProviderError(f"KME {operation} failed: HTTP {status}: {text}", reason=reason)

    def status(self, slave_sae_id: str) -> dict[str, Any]:
        """The 014 status for ``slave_sae_id`` (GET), also refreshing ``healthy()``."""
        code, data = self._request(
            "GET", f"{API_PREFIX}/{quote(slave_sae_id, safe='')}/status", None
        )
        if code != 200:
            raise self._fail(code, data, "status")
        count = data.get("stored_key_count")
        if isinstance(count, bool) or not isinstance(count, int):
            raise KeyProviderError(
                "KME status lacks stored_key_count", reason=ReasonCode.KEY_PROVIDER_FAILED
            )
        with self._lock:
            self._status[slave_sae_id] = _Status(self._clock(), count)
            self._healthy = True
        return data

    def _stored_keys(self, slave_sae_id: str) -> int:
        with self._lock:
            cached = self._status.get(slave_sae_id)
        if cached is not None and self._clock() - cached.at < STATUS_CACHE_S:
            return cached.stored_key_count
        return int(self.status(slave_sae_id)["stored_key_count"])

    @staticmethod
    def _one_key(data: Mapping[str, Any], key_id: str | None, size_bits: int) -> tuple[str, bytes]:
        keys = data.get("keys")
        if not isinstance(keys, list) or len(keys) != 1 or not isinstance(keys[0], dict):
            raise KeyProviderError(
                "KME key container does not hold exactly one key",
                reason=ReasonCode.KEY_PROVIDER_FAILED,
            )
        got_id, encoded = keys[0].get("key_ID"), keys[0].get("key")
        if not isinstance(got_id, str) or not _KEY_ID_RE.fullmatch(got_id):
            raise KeyProviderError(
                "KME returned no usable key_ID", reason=ReasonCode.KEY_PROVIDER_FAILED
            )
        if key_id is not None and got_id != key_id:
            raise KeyProviderError(
                "KME returned a different key_ID", reason=ReasonCode.UNKNOWN_KEY_ID
            )
        try:
            material = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
        except (binascii.Error, ValueError):
            material = b""
        if len(material) * 8 != size_bits:
            raise KeyProviderError(
                f"KME key for {got_id} is not {size_bits} bits of base64",
                reason=ReasonCode.KEY_PROVIDER_FAILED,
            )
        return got_id, material

    # -- KeyProvider ---------------------------------------------------------------------

    # ``context`` is not used by QKD: a QKD key is bound to nothing but its key_ID. The
    # combiner binds every provider's secret to the message transcript in its KDF.

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        slave = recipient.qkd_sae_id
        if not slave:
            raise KeyProviderError(
                "recipient has no QKD SAE id", reason=ReasonCode.KEY_PROVIDER_FAILED
            )
        if self.check_status and self._stored_keys(slave) < 1:
            self._healthy = False
            raise KeyProviderError(
                f"KME {self.kme_url} has no stored key for {slave}",
                reason=ReasonCode.QKD_UNAVAILABLE,
            )
        code, data = self._request(
            "POST",
            f"{API_PREFIX}/{quote(slave, safe='')}/enc_keys",
            {"number": 1, "size": self.key_size_bits},
        )
        if code != 200:
            raise self._fail(code, data, "enc_keys")
        key_id, material = self._one_key(data, None, self.key_size_bits)
        with self._lock:
            cached = self._status.get(slave)
            if cached is not None:
                # Keep the fail-fast view honest between status calls.
                self._status[slave] = _Status(cached.at, max(0, cached.stored_key_count - 1))
        return Encapsulation(
            provider=self.name,
            key_id=key_id,
            key_ref=key_id.encode("utf-8"),
            shared_secret=material,
        )

    def recover(self, key_ref: bytes, key_id: str, own: PrivateKeySet, *, context: bytes) -> bytes:
        if not self.master_sae_id:
            raise KeyProviderError(
                "qkd-etsi014 recipient needs master_sae_id (the sender's SAE id)",
                reason=ReasonCode.CONFIG,
            )
        if own.qkd_sae_id is not None and own.qkd_sae_id != self.sae_id:
            raise KeyProviderError(
                "own QKD SAE id does not match the provider's sae_id", reason=ReasonCode.CONFIG
            )
        try:
            ref = key_ref.decode("ascii")
        except UnicodeDecodeError:
            ref = ""
        if not _KEY_ID_RE.fullmatch(ref):
            raise KeyProviderError("malformed QKD key_ID in envelope", reason=ReasonCode.MALFORMED)
        if key_id and key_id != ref:
            raise KeyProviderError(
                "envelope key_ref and key_id name different QKD keys",
                reason=ReasonCode.UNKNOWN_KEY_ID,
            )
        code, data = self._request(
            "POST",
            f"{API_PREFIX}/{quote(self.master_sae_id, safe='')}/dec_keys",
            {"key_IDs": [{"key_ID": ref}]},
        )
        if code != 200:
            raise self._fail(code, data, "dec_keys")
        _, material = self._one_key(data, ref, self.key_size_bits)
        return material

    def healthy(self) -> bool:
        """The outcome of the last KME call; asks the KME once when nothing is known yet."""
        if self._healthy is None:
            peer = self.master_sae_id
            if peer is None:
                return True  # a sender learns the slave only from a recipient; nothing to ask
            try:
                self.status(peer)
            except KeyProviderError:
                return False
        return bool(self._healthy)
