"""A simulated QKD link: two ETSI GS QKD 014 (v1.1.1) Key Management Entities in one process.

KME-A serves the SAEs of site A, KME-B those of site B; both draw from one key pool that a
simulated link fills at a configured key rate. Key bits come from ``os.urandom``: this is a
simulator of the *interfaces and failure modes* of a QKD link, not of quantum physics, and its
keys have no information-theoretic property at all. With a state directory the pool and
its reservations survive a restart (``PoolStateFile``). See ``docs/qkd.md``.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import json
import os
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from aiohttp import web
from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.files import write_atomic
from fleetbus.kmesim.pki import ADMIN_CN, KME_NAMES
from fleetbus.providers.qkd import kme_id_of_certificate

API_PREFIX = "/api/v1/keys"
#: Largest request body a KME or the admin endpoint reads, in bytes.
MAX_BODY_BYTES = 64 * 1024


# --------------------------------------------------------------------------------------------
# Configuration


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


# --------------------------------------------------------------------------------------------
# Errors, as the 014 error body {"message": ..., "details": [...]}


class KMEError(Exception):
    """An ETSI 014 error response. ``message`` and ``details`` never carry key material."""

    status = 503

    def __init__(self, message: str, details: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = [dict(d) for d in details]

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class KMEBadRequest(KMEError):
    status = 400


class KMEUnauthorized(KMEError):
    status = 401


class KMEUnavailable(KMEError):
    status = 503


# --------------------------------------------------------------------------------------------
# The key pool shared by both KMEs (no I/O; the clock and the randomness are injectable)


@dataclass(frozen=True)
class _Reservation:
    key_id: str
    material: bytes
    master: str
    slave: str
    source_kme: str
    target_kme: str
    reserved_at: float
    #: Wall-clock time of the reservation: what the state file keeps, so the TTL keeps
    #: running while the KME is down.
    reserved_wall: float = 0.0


class KMEStateError(ConfigError):
    """The pool's state directory is unusable: locked by another KME, unreadable or corrupt."""


#: Format tag and version of the state file.
STATE_FORMAT = "fleetbus-kme-pool"
STATE_VERSION = 1


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _digest(canonical_state: str) -> str:
    return hashlib.sha256(canonical_state.encode()).hexdigest()


class PoolStateFile:
    """The pool's durable state: one JSON file in a state directory, replaced atomically.

    ``save`` writes a temporary file (mode 0600, created so), fsyncs it, ``os.replace``-s it over
    the old one and fsyncs the directory, so a crash leaves the old or the new state, never a mix.
    An exclusive ``flock`` on a lock file keeps a second KME process off the same directory (two
    writers would hand out the same keys twice); the kernel drops it when the process dies.
    """

    FILE_NAME = "kme-pool.json"
    LOCK_NAME = "kme-pool.lock"

    def __init__(self, directory: Path) -> None:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(directory / self.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KMEStateError(f"KME state directory {directory} unusable: {exc}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise KMEStateError(
                f"KME state directory {directory} is in use by another KME process"
            ) from None
        self.directory = directory
        self.path = directory / self.FILE_NAME
        self._lock_fd: int | None = lock_fd
        #: Writes done and the seconds they took (the cost of durability, see docs/qkd.md).
        self.writes = 0
        self.write_seconds = 0.0

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none yet. Raises ``KMEStateError`` when the
        file exists but cannot be trusted (truncated, edited, another format or version)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KMEStateError(f"cannot read KME state file {self.path}: {exc}") from None
        problem = f"KME state file {self.path} is corrupt or truncated"
        hint = "; move it away to start with a fresh pool (keys it holds are then lost)"
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise KMEStateError(problem + hint) from None
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise KMEStateError(problem + hint)
        if doc.get("version") != STATE_VERSION:
            raise KMEStateError(
                f"KME state file {self.path} has version {doc.get('version')!r}, "
                f"this KME reads version {STATE_VERSION}" + hint
            )
        state = doc.get("state")
        if not isinstance(state, dict) or doc.get("sha256") != _digest(_canonical(state)):
            raise KMEStateError(problem + " (checksum mismatch)" + hint)
        return state

    def save(self, canonical_state: str) -> None:
        """Write ``canonical_state``: the state as ``json.dumps(..., sort_keys=True,
        separators=(",", ":"))`` would give it (the checksum is taken over that form)."""
        began = time.perf_counter()
        head = _canonical(
            {"format": STATE_FORMAT, "version": STATE_VERSION, "sha256": _digest(canonical_state)}
        )
        data = (head[:-1] + ',"state":' + canonical_state + "}").encode()
        write_atomic(self.path, data, 0o600, sync_folder=True)
        self.writes += 1
        self.write_seconds += time.perf_counter() - began

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


class KeyPool:
    """Key material both ends of the simulated link hold, plus who each handed-out key is for.

    The link adds ``key_rate_bps`` bits per second of clock time while it is up and the QBER is
    at or below the threshold, up to ``max_key_count * key_size`` bits. ``enc_keys`` takes
    material out of the pool and reserves it for one (master, slave) pair; ``dec_keys`` on the
    other KME hands it to that slave and forgets it. So every key is handed out once per side.

    With a ``state_file`` the unreserved material and the reservations are written to it before
    ``reserve``, ``deliver``, ``flush`` and ``reset`` return, and read back at start instead of
    the initial fill: a key handed to the master before a restart is still fetchable by the
    slave after it, and a key delivered to both sides is gone for good. Switches (link,
    eavesdropper, rate) and the ``delivered`` counters start afresh.
    """

    def __init__(
        self,
        *,
        key_size: int = 256,
        max_key_count: int = 1000,
        key_rate_bps: float = 10_000.0,
        prefill_keys: int | None = None,
        qber_baseline: float = 0.02,
        qber_eavesdropper: float = 0.25,
        qber_threshold: float = 0.11,
        flush_on_eavesdropper: bool = False,
        reservation_ttl_s: float = 600.0,
        state_file: PoolStateFile | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if key_size % 8 or key_size <= 0:
            raise ValueError("key_size must be a positive multiple of 8")
        self.key_size = key_size
        self.max_key_count = max_key_count
        self.qber_baseline = qber_baseline
        self.qber_eavesdropper = qber_eavesdropper
        self.qber_threshold = qber_threshold
        self.flush_on_eavesdropper = flush_on_eavesdropper
        self.reservation_ttl_s = reservation_ttl_s
        #: Unfetched reservations beyond this many are dropped, oldest first.
        self.max_reserved = 4 * max_key_count
        self._clock = clock
        self._wall_clock = wall_clock
        self._random = random_bytes
        self._lock = threading.Lock()
        self._initial_rate = float(key_rate_bps)
        self._initial_fill = max_key_count if prefill_keys is None else prefill_keys
        self._reserved: OrderedDict[str, _Reservation] = OrderedDict()
        self.delivered: dict[str, int] = {}
        self.state_file = state_file
        #: key_ID -> the reservation's canonical JSON, so a save re-encodes only new ones.
        self._fragments: dict[str, str] = {}
        saved = state_file.load() if state_file is not None else None
        if saved is None:
            self.reset()
        else:
            with self._lock:
                self._start_state()
                self._restore(saved)

    # -- state and switches -------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.max_key_count * self.key_size // 8

    def reset(self) -> None:
        """Back to the start-up state: link up, no eavesdropper, initial rate and fill, no
        reservations (also in the state file)."""
        with self._lock:
            self._start_state()
            fill = min(self._initial_fill, self.max_key_count) * self.key_size // 8
            self._material = bytearray(self._random(fill))
            self._reserved.clear()
            self._persist()

    def _start_state(self) -> None:
        self._link_up = True
        self._eavesdropper = False
        self._rate = self._initial_rate
        self._material = bytearray()
        self._carry_bits = 0.0
        self._last = self._clock()

    # -- durability ----------------------------------------------------------------------

    def _persist(self) -> None:
        """Write the pool to the state file (caller holds the lock). Key material at rest."""
        if self.state_file is None:
            return
        fragments = []
        for r in self._reserved.values():
            fragment = self._fragments.get(r.key_id)
            if fragment is None:
                fragment = self._fragments[r.key_id] = _canonical(
                    {
                        "key_ID": r.key_id,
                        "key": _b64(r.material),
                        "master": r.master,
                        "slave": r.slave,
                        "source_kme": r.source_kme,
                        "target_kme": r.target_kme,
                        "reserved_at": r.reserved_wall,
                    }
                )
            fragments.append(fragment)
        if len(self._fragments) != len(fragments):  # drop delivered and expired ones
            self._fragments = {k: self._fragments[k] for k in self._reserved}
        # Keys in sorted order, compact: the same text as _canonical() of the parsed state.
        material = _canonical(_b64(bytes(self._material)))
        self.state_file.save(
            '{"material":' + material + ',"reservations":[' + ",".join(fragments) + "]}"
        )

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Take over a saved state (caller holds the lock); reservation ages keep running over
        the time the KME was down (wall clock)."""
        assert self.state_file is not None
        where = self.state_file.path
        try:
            material = base64.b64decode(state["material"], validate=True)
            now, wall = self._clock(), self._wall_clock()
            reserved: OrderedDict[str, _Reservation] = OrderedDict()
            for entry in state["reservations"]:
                fields = ("key_ID", "master", "slave", "source_kme", "target_kme")
                key_id, master, slave, source, target = (str(entry[f]) for f in fields)
                reserved_wall = float(entry["reserved_at"])
                reserved[key_id] = _Reservation(
                    key_id,
                    base64.b64decode(entry["key"], validate=True),
                    master,
                    slave,
                    source,
                    target,
                    now - max(0.0, wall - reserved_wall),
                    reserved_wall,
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise KMEStateError(
                f"KME state file {where} has an unexpected shape ({type(exc).__name__}); "
                "move it away to start with a fresh pool (keys it holds are then lost)"
            ) from None
        # A smaller --pool-size than before keeps the first keys of the pool, drops the rest.
        self._material = bytearray(material[: self.capacity_bytes])
        self._reserved = reserved
        self._expire()

    def close(self) -> None:
        """Release the state directory (its lock); the pool stays usable in memory."""
        if self.state_file is not None:
            self.state_file.close()
            self.state_file = None

    def _persist_or_undo(self, undo: Callable[[], None]) -> None:
        """Persist a change before it is answered; if the write fails, undo it and answer 503,
        so no key is ever handed out (or forgotten) that the state file does not reflect."""
        try:
            self._persist()
        except OSError as exc:
            undo()
            raise KMEUnavailable(
                "key pool state could not be written",
                [{"reason": "state_write_failed", "error": exc.strerror or type(exc).__name__}],
            ) from None

    @property
    def qber(self) -> float:
        return self.qber_eavesdropper if self._eavesdropper else self.qber_baseline

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def eavesdropper(self) -> bool:
        return self._eavesdropper

    @property
    def key_rate_bps(self) -> float:
        """The configured rate of the link (what it produces while generating)."""
        return self._rate

    @property
    def generating(self) -> bool:
        """Whether new key material is being distilled right now."""
        return self._link_up and self.qber <= self.qber_threshold and self._rate > 0

    def set_link(self, up: bool) -> None:
        with self._lock:
            self._refill()
            self._link_up = up

    def set_eavesdropper(self, on: bool) -> None:
        with self._lock:
            self._refill()
            self._eavesdropper = on
            if on and self.flush_on_eavesdropper and self.qber > self.qber_threshold:
                self._material.clear()
                self._persist()

    def set_key_rate(self, bits_per_second: float) -> None:
        if bits_per_second < 0:
            raise ValueError("key rate must be >= 0")
        with self._lock:
            self._refill()
            self._rate = float(bits_per_second)

    def flush(self) -> None:
        """Drop all unreserved key material (reserved keys stay fetchable)."""
        with self._lock:
            self._refill()
            self._material.clear()
            self._carry_bits = 0.0
            self._persist()

    def stored_key_count(self) -> int:
        """Unreserved keys of the default size in the pool (014 ``stored_key_count``)."""
        with self._lock:
            self._refill()
            return len(self._material) * 8 // self.key_size

    def reserved_key_count(self) -> int:
        with self._lock:
            self._expire()
            return len(self._reserved)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        if not self.generating:
            self._carry_bits = 0.0
            return
        room = self.capacity_bytes - len(self._material)
        bits = self._carry_bits + elapsed * self._rate
        whole = int(bits // 8)
        if whole >= room:
            whole, self._carry_bits = room, 0.0
        else:
            self._carry_bits = bits - whole * 8
        if whole > 0:
            self._material += self._random(whole)

    def _expire(self) -> None:
        deadline = self._clock() - self.reservation_ttl_s
        while self._reserved:
            oldest = next(iter(self._reserved.values()))
            if oldest.reserved_at > deadline and len(self._reserved) <= self.max_reserved:
                break
            self._reserved.popitem(last=False)

    # -- the two halves of a key exchange -----------------------------------------------

    def reserve(
        self,
        *,
        source_kme: str,
        target_kme: str,
        master: str,
        slave: str,
        number: int,
        size_bits: int,
    ) -> list[tuple[str, bytes]]:
        """``enc_keys``: take ``number`` keys of ``size_bits`` out of the pool for ``slave``."""
        if number < 1 or size_bits <= 0 or size_bits % 8:
            raise KMEBadRequest("number must be >= 1 and size a positive multiple of 8")
        with self._lock:
            if not self._link_up:
                raise KMEUnavailable("QKD link down", [{"reason": "link_down", "kme": source_kme}])
            self._refill()
            needed = number * size_bits // 8
            if len(self._material) < needed:
                details: dict[str, Any] = {
                    "reason": "key_pool_empty",
                    "stored_key_count": len(self._material) * 8 // self.key_size,
                }
                if self.qber > self.qber_threshold:
                    details = {
                        "reason": "eavesdropper_detected",
                        "qber": self.qber,
                        "qber_threshold": self.qber_threshold,
                    }
                raise KMEUnavailable("not enough key material in the pool", [details])
            chunk = bytes(self._material[:needed])
            del self._material[:needed]
            self._expire()
            before = OrderedDict(self._reserved)
            now, wall = self._clock(), self._wall_clock()
            step = size_bits // 8
            out: list[tuple[str, bytes]] = []
            for i in range(number):
                key_id = str(uuid.uuid4())
                material = chunk[i * step : (i + 1) * step]
                self._reserved[key_id] = _Reservation(
                    key_id, material, master, slave, source_kme, target_kme, now, wall
                )
                out.append((key_id, material))
            self._expire()

            def undo() -> None:
                self._material[:0] = chunk
                self._reserved = before

            self._persist_or_undo(undo)
            self.delivered[source_kme] = self.delivered.get(source_kme, 0) + number
            return out

    def deliver(
        self, *, target_kme: str, master: str, slave: str, key_ids: Sequence[str]
    ) -> list[tuple[str, bytes]]:
        """``dec_keys``: hand the keys ``master`` reserved for ``slave`` to it, once, all or none.

        A key_ID held for another slave SAE is refused with 401 (014 Table 7: the caller is not
        the key's slave); one that is unknown, already fetched, expired, or held for this slave
        under another master with 400. Nothing is handed out or used up by a refusal.
        """
        if not key_ids:
            raise KMEBadRequest("no key_ID given")
        if len(set(key_ids)) != len(key_ids):
            raise KMEBadRequest("duplicate key_ID in request")
        with self._lock:
            if not self._link_up:
                raise KMEUnavailable("QKD link down", [{"reason": "link_down", "kme": target_kme}])
            self._expire()
            foreign: list[dict[str, Any]] = []
            bad: list[dict[str, Any]] = []
            for key_id in key_ids:
                res = self._reserved.get(key_id)
                if res is not None and res.slave != slave:
                    foreign.append({"key_ID": key_id, "reason": "not the slave SAE of this key"})
                elif res is None or res.master != master or res.target_kme != target_kme:
                    bad.append({"key_ID": key_id, "reason": "unknown or not available"})
            if foreign:
                raise KMEUnauthorized(f"SAE {slave!r} is not the slave SAE of the key", foreign)
            if bad:
                raise KMEBadRequest("key_ID not available to this SAE", bad)
            before = OrderedDict(self._reserved)
            out = [(k, self._reserved.pop(k).material) for k in key_ids]

            def undo() -> None:
                self._reserved = before

            self._persist_or_undo(undo)
            self.delivered[target_kme] = self.delivered.get(target_kme, 0) + len(out)
            return out

    def snapshot(self) -> dict[str, Any]:
        """The admin view (no key material)."""
        stored = self.stored_key_count()
        return {
            "link_up": self._link_up,
            "eavesdropper": self._eavesdropper,
            "qber": self.qber,
            "qber_threshold": self.qber_threshold,
            "generating": self.generating,
            "key_rate_bps": self._rate,
            "key_size": self.key_size,
            "stored_key_count": stored,
            "max_key_count": self.max_key_count,
            "reserved_key_count": self.reserved_key_count(),
            "delivered": dict(self.delivered),
        }


# --------------------------------------------------------------------------------------------
# The 014 HTTP API of one KME


def _json(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", charset="utf-8"
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def caller_sae_id(peercert: Mapping[str, Any] | None) -> str | None:
    """The SAE id of a verified TLS peer: its certificate's subject commonName."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                return str(value)
    return None


def _int_field(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KMEBadRequest(f"{name} must be an integer", [{"parameter": name}])
    return value


def _int_query(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        return int(raw, 10)
    except ValueError:
        raise KMEBadRequest(f"{name} must be an integer", [{"parameter": name}]) from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise KMEBadRequest("request body is not JSON") from None
    if not isinstance(body, dict):
        raise KMEBadRequest("request body must be a JSON object")
    return body


class KMEService:
    """One KME: the SAEs attached to it, its peer, and the shared pool."""

    def __init__(
        self,
        *,
        kme_id: str,
        peer_kme_id: str,
        local_saes: Iterable[str],
        remote_saes: Iterable[str],
        pool: KeyPool,
        config: KMEPairConfig,
        requests_total: Counter | None = None,
    ) -> None:
        self.kme_id = kme_id
        self.peer_kme_id = peer_kme_id
        self.local_saes = frozenset(local_saes)
        self.remote_saes = frozenset(remote_saes)
        self.pool = pool
        self.config = config
        self._requests_total = requests_total

    # -- checks --------------------------------------------------------------------------

    def _caller(self, request: web.Request) -> str:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        sae = caller_sae_id(peercert)
        if sae is None or sae not in self.local_saes:
            raise KMEUnauthorized(
                f"client certificate does not name an SAE attached to {self.kme_id}"
            )
        return sae

    def _remote(self, sae_id: str, role: str) -> str:
        if sae_id not in self.remote_saes:
            raise KMEBadRequest(
                f"{role} SAE {sae_id!r} is not reachable over the link of {self.kme_id}",
                [{"parameter": f"{role}_SAE_ID"}],
            )
        return sae_id

    def _size(self, size: int | None) -> int:
        cfg = self.config
        size = cfg.key_size if size is None else size
        details = [{"parameter": "size", "value": size}]
        if size % 8:
            # The message is the one 014 clause 6.4 gives, word for word: clients match on it.
            raise KMEBadRequest("size shall be a multiple of 8", details)
        if not cfg.min_key_size <= size <= cfg.max_key_size:
            raise KMEBadRequest(
                f"size shall be between {cfg.min_key_size} and {cfg.max_key_size}", details
            )
        return size

    def _number(self, number: int | None) -> int:
        number = 1 if number is None else number
        if not 1 <= number <= self.config.max_key_per_request:
            raise KMEBadRequest(
                f"number must be between 1 and {self.config.max_key_per_request}",
                [{"parameter": "number", "value": number}],
            )
        return number

    async def _in_pool(
        self, operation: Callable[..., list[tuple[str, bytes]]], **kwargs: Any
    ) -> list[tuple[str, bytes]]:
        """Run a key hand-out. A durable pool writes its state file on every change (two
        fsyncs, 4-15 ms): that runs in a worker thread, so the event loop goes on serving other
        requests and /metrics meanwhile; the pool's lock orders the operations."""
        if self.pool.state_file is None:
            return operation(**kwargs)
        return await asyncio.to_thread(operation, **kwargs)

    # -- handlers ------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        master = self._caller(request)
        slave = self._remote(request.match_info["slave_SAE_ID"], "slave")
        if not self.pool.link_up:
            raise KMEUnavailable("QKD link down", [{"reason": "link_down", "kme": self.kme_id}])
        cfg = self.config
        return _json(
            {
                "source_KME_ID": self.kme_id,
                "target_KME_ID": self.peer_kme_id,
                "master_SAE_ID": master,
                "slave_SAE_ID": slave,
                "key_size": cfg.key_size,
                "stored_key_count": self.pool.stored_key_count(),
                "max_key_count": cfg.max_key_count,
                "max_key_per_request": cfg.max_key_per_request,
                "max_key_size": cfg.max_key_size,
                "min_key_size": cfg.min_key_size,
                "max_SAE_ID_count": 0,
            }
        )

    async def enc_keys(self, request: web.Request) -> web.Response:
        master = self._caller(request)
        slave = self._remote(request.match_info["slave_SAE_ID"], "slave")
        if request.method == "GET":
            number = _int_query(request.query, "number")
            size = _int_query(request.query, "size")
        else:
            body = await _json_body(request)
            number = None if body.get("number") is None else _int_field(body["number"], "number")
            size = None if body.get("size") is None else _int_field(body["size"], "size")
            extra = body.get("additional_slave_SAE_IDs") or []
            if not isinstance(extra, list):
                raise KMEBadRequest("additional_slave_SAE_IDs must be an array")
            if extra:
                raise KMEBadRequest(
                    "key multicast is not supported (max_SAE_ID_count is 0)",
                    [{"parameter": "additional_slave_SAE_IDs"}],
                )
            mandatory = body.get("extension_mandatory") or []
            if not isinstance(mandatory, list):
                raise KMEBadRequest("extension_mandatory must be an array")
            if mandatory:
                names = sorted(str(k) for ext in mandatory if isinstance(ext, dict) for k in ext)
                raise KMEBadRequest(
                    "not all extension_mandatory parameters are supported",  # 014 clause 6.4
                    [{"extension_mandatory_unsupported": names}],
                )
            optional = body.get("extension_optional") or []
            if not isinstance(optional, list):
                raise KMEBadRequest("extension_optional must be an array")
            # Optional extensions may be ignored (014 clause 6.2); this KME supports none.
        keys = await self._in_pool(
            self.pool.reserve,
            source_kme=self.kme_id,
            target_kme=self.peer_kme_id,
            master=master,
            slave=slave,
            number=self._number(number),
            size_bits=self._size(size),
        )
        return _json({"keys": [{"key_ID": k, "key": _b64(m)} for k, m in keys]})

    async def dec_keys(self, request: web.Request) -> web.Response:
        slave = self._caller(request)
        master = self._remote(request.match_info["master_SAE_ID"], "master")
        key_ids: list[str]
        if request.method == "GET":
            key_ids = request.query.getall("key_ID", [])
        else:
            body = await _json_body(request)
            entries = body.get("key_IDs")
            if not isinstance(entries, list) or not entries:
                raise KMEBadRequest("key_IDs must be a non-empty array", [{"parameter": "key_IDs"}])
            key_ids = []
            for entry in entries:
                if not isinstance(entry, dict) or not isinstance(entry.get("key_ID"), str):
                    raise KMEBadRequest("each key_IDs entry needs a string key_ID")
                key_ids.append(entry["key_ID"])
        if not key_ids:
            raise KMEBadRequest("key_ID is required", [{"parameter": "key_ID"}])
        if len(key_ids) > self.config.max_key_per_request:
            raise KMEBadRequest(f"at most {self.config.max_key_per_request} key_IDs per request")
        keys = await self._in_pool(
            self.pool.deliver, target_kme=self.kme_id, master=master, slave=slave, key_ids=key_ids
        )
        return _json({"keys": [{"key_ID": k, "key": _b64(m)} for k, m in keys]})

    # -- the application ----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors_middleware])
        app.router.add_get(API_PREFIX + "/{slave_SAE_ID}/status", self.status)
        app.router.add_route("GET", API_PREFIX + "/{slave_SAE_ID}/enc_keys", self.enc_keys)
        app.router.add_route("POST", API_PREFIX + "/{slave_SAE_ID}/enc_keys", self.enc_keys)
        app.router.add_route("GET", API_PREFIX + "/{master_SAE_ID}/dec_keys", self.dec_keys)
        app.router.add_route("POST", API_PREFIX + "/{master_SAE_ID}/dec_keys", self.dec_keys)
        return app

    @web.middleware
    async def _errors_middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        endpoint = request.path.rsplit("/", 1)[-1]
        if endpoint not in ("status", "enc_keys", "dec_keys"):
            endpoint = "other"
        try:
            response = await handler(request)
        except KMEError as exc:
            response = _json(exc.body(), exc.status)
        except web.HTTPException as exc:
            # 404 / 405 / 413 as 014 error bodies too, so clients parse one shape.
            response = _json({"message": exc.reason}, exc.status)
        if self._requests_total is not None:
            self._requests_total.labels(self.kme_id, endpoint, str(response.status)).inc()
        return response


# --------------------------------------------------------------------------------------------
# Admin switches and metrics


class _PairCollector(Collector):
    """Reads the pool at scrape time, so gauges are never stale."""

    def __init__(self, pool: KeyPool, kme_ids: Sequence[str]) -> None:
        self._pool = pool
        self._kme_ids = tuple(kme_ids)

    def collect(self) -> Iterable[Metric]:
        pool = self._pool
        yield GaugeMetricFamily(
            "fleetbus_qkd_key_pool_keys",
            "Unreserved keys of the default size in the simulated link's key pool.",
            value=pool.stored_key_count(),
        )
        yield GaugeMetricFamily(
            "fleetbus_qkd_key_pool_capacity_keys",
            "Bound of the key pool (014 max_key_count).",
            value=pool.max_key_count,
        )
        yield GaugeMetricFamily(
            "fleetbus_qkd_key_reserved_keys",
            "Keys handed to a master SAE and not yet fetched by the slave SAE.",
            value=pool.reserved_key_count(),
        )
        yield GaugeMetricFamily(
            # Prometheus base unit: bytes (promtool check metrics refuses bits).
            "fleetbus_qkd_key_rate_bytes_per_second",
            "Current secret key rate of the link in bytes per second (0 while down or above "
            "the QBER threshold).",
            value=pool.key_rate_bps / 8 if pool.generating else 0.0,
        )
        yield GaugeMetricFamily(
            "fleetbus_qkd_link_up", "1 while the simulated QKD link is up.", value=pool.link_up
        )
        yield GaugeMetricFamily(
            "fleetbus_qkd_qber", "Quantum bit error rate of the link (ratio).", value=pool.qber
        )
        yield GaugeMetricFamily(
            "fleetbus_qkd_qber_threshold",
            "QBER above which key generation stops (ratio).",
            value=pool.qber_threshold,
        )
        delivered = CounterMetricFamily(
            "fleetbus_qkd_keys_delivered",
            "Keys handed to SAEs, by KME (enc_keys on the master side, dec_keys on the slave).",
            labels=["kme"],
        )
        for kme in self._kme_ids:
            delivered.add_metric([kme], pool.delivered.get(kme, 0))
        yield delivered


async def _admin_json(request: web.Request) -> dict[str, Any]:
    try:
        return await _json_body(request)
    except KMEError as exc:
        raise web.HTTPBadRequest(text=exc.message) from None


def _admin_bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if not isinstance(value, bool):
        raise web.HTTPBadRequest(text=f'expected {{"{name}": true|false}}')
    return value


def admin_app(pool: KeyPool, registry: CollectorRegistry) -> web.Application:
    """The loopback-only control plane: link and eavesdropper switches, state, /metrics."""

    async def state(_: web.Request) -> web.Response:
        return _json(pool.snapshot())

    async def link(request: web.Request) -> web.Response:
        pool.set_link(_admin_bool(await _admin_json(request), "up"))
        return _json(pool.snapshot())

    async def eavesdropper(request: web.Request) -> web.Response:
        pool.set_eavesdropper(_admin_bool(await _admin_json(request), "on"))
        return _json(pool.snapshot())

    async def key_rate(request: web.Request) -> web.Response:
        value = (await _admin_json(request)).get("bits_per_second")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise web.HTTPBadRequest(text='expected {"bits_per_second": number >= 0}')
        pool.set_key_rate(float(value))
        return _json(pool.snapshot())

    async def flush(_: web.Request) -> web.Response:
        pool.flush()
        return _json(pool.snapshot())

    async def reset(_: web.Request) -> web.Response:
        pool.reset()
        return _json(pool.snapshot())

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/admin/state", state)
    app.router.add_post("/admin/link", link)
    app.router.add_post("/admin/eavesdropper", eavesdropper)
    app.router.add_post("/admin/key-rate", key_rate)
    app.router.add_post("/admin/flush", flush)
    app.router.add_post("/admin/reset", reset)
    app.router.add_get("/metrics", metrics)
    return app


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """The metrics-only listener: ``GET /metrics`` and nothing else (404), no switches, so it
    may bind to a non-loopback address for Prometheus while the admin listener stays local."""

    async def only_metrics(request: web.Request) -> web.Response:
        if request.path != "/metrics" or request.method not in ("GET", "HEAD"):
            raise web.HTTPNotFound()
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_route("*", "/{tail:.*}", only_metrics)
    return app


def _admin_mtls_middleware() -> Any:
    @web.middleware
    async def check(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        if caller_sae_id(peercert) != ADMIN_CN:
            raise web.HTTPUnauthorized(text=f"admin needs a client certificate with CN {ADMIN_CN}")
        return await handler(request)

    return check


# --------------------------------------------------------------------------------------------
# Running the pair


def server_ssl_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS >= 1.2 with a mandatory client certificate issued by ``ca_file``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


@dataclass(frozen=True)
class PairEndpoints:
    """Where a running pair listens (actual ports, also when 0 was configured)."""

    kme_a_url: str
    kme_b_url: str
    admin_url: str
    metrics_url: str | None = None

    def as_dict(self) -> dict[str, str]:
        out = {"kme_a": self.kme_a_url, "kme_b": self.kme_b_url, "admin": self.admin_url}
        if self.metrics_url is not None:
            out["metrics"] = self.metrics_url
        return out


class KMEPair:
    """Both KMEs, the pool between them and the admin endpoint, as aiohttp applications."""

    def __init__(self, config: KMEPairConfig, *, clock: Callable[[], float] = time.monotonic):
        for cert, kme_id in (
            (config.kme_a_cert, config.kme_a_id),
            (config.kme_b_cert, config.kme_b_id),
        ):
            # A status source_KME_ID its own certificate contradicts would fail every SAE's
            # KME ID check: refuse to start instead.
            if certificate_kme_id(cert) != kme_id:
                raise ConfigError(f"{cert} does not name KME ID {kme_id!r} (its subject CN)")
        self.config = config
        state_file = None if config.state_dir is None else PoolStateFile(config.state_dir)
        self.pool = KeyPool(
            key_size=config.key_size,
            max_key_count=config.max_key_count,
            key_rate_bps=config.key_rate_bps,
            prefill_keys=config.prefill_keys,
            qber_baseline=config.qber_baseline,
            qber_eavesdropper=config.qber_eavesdropper,
            qber_threshold=config.qber_threshold,
            flush_on_eavesdropper=config.flush_on_eavesdropper,
            reservation_ttl_s=config.reservation_ttl_s,
            state_file=state_file,
            clock=clock,
        )
        self.registry = CollectorRegistry()
        self.registry.register(_PairCollector(self.pool, (config.kme_a_id, config.kme_b_id)))
        requests_total = Counter(
            "fleetbus_qkd_kme_requests",
            "ETSI 014 requests answered, by KME, endpoint and HTTP status code.",
            ["kme", "endpoint", "code"],
            registry=self.registry,
        )
        self.kme_a = KMEService(
            kme_id=config.kme_a_id,
            peer_kme_id=config.kme_b_id,
            local_saes=config.sae_a,
            remote_saes=config.sae_b,
            pool=self.pool,
            config=config,
            requests_total=requests_total,
        )
        self.kme_b = KMEService(
            kme_id=config.kme_b_id,
            peer_kme_id=config.kme_a_id,
            local_saes=config.sae_b,
            remote_saes=config.sae_a,
            pool=self.pool,
            config=config,
            requests_total=requests_total,
        )
        self._runners: list[web.AppRunner] = []

    async def start(self) -> PairEndpoints:
        cfg = self.config
        ctx_a = server_ssl_context(cfg.ca_file, cfg.kme_a_cert, cfg.kme_a_key)
        ctx_b = server_ssl_context(cfg.ca_file, cfg.kme_b_cert, cfg.kme_b_key)
        admin = admin_app(self.pool, self.registry)
        admin_ctx: ssl.SSLContext | None = None
        if cfg.admin_mtls:
            admin_ctx = server_ssl_context(cfg.ca_file, cfg.kme_a_cert, cfg.kme_a_key)
            admin.middlewares.append(_admin_mtls_middleware())
        port_a = await self._serve(self.kme_a.app(), cfg.host, cfg.port_a, ctx_a)
        port_b = await self._serve(self.kme_b.app(), cfg.host, cfg.port_b, ctx_b)
        # The switches and metrics have no SAE authentication: loopback only, always.
        port_admin = await self._serve(admin, "127.0.0.1", cfg.admin_port, admin_ctx)
        metrics_url = None
        if cfg.metrics_port is not None:
            port = await self._serve(
                metrics_app(self.registry), cfg.metrics_host, cfg.metrics_port, None
            )
            metrics_url = f"http://{_url_host(cfg.metrics_host)}:{port}"
        scheme = "https" if admin_ctx else "http"
        return PairEndpoints(
            kme_a_url=f"https://{_url_host(cfg.host)}:{port_a}",
            kme_b_url=f"https://{_url_host(cfg.host)}:{port_b}",
            admin_url=f"{scheme}://127.0.0.1:{port_admin}",
            metrics_url=metrics_url,
        )

    async def _serve(
        self, app: web.Application, host: str, port: int, ctx: ssl.SSLContext | None
    ) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        self._runners.append(runner)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
        site = web.SockSite(runner, sock, ssl_context=ctx)
        await site.start()
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        self.pool.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve_pair(
    config: KMEPairConfig,
    stop: asyncio.Event,
    on_ready: Callable[[PairEndpoints], None] | None = None,
) -> None:
    """Run both KMEs until ``stop`` is set, then close every listener (and the state dir)."""
    pair = KMEPair(config)
    try:
        endpoints = await pair.start()
        if on_ready is not None:
            on_ready(endpoints)
        await stop.wait()
    finally:
        await pair.stop()
