"""Pytest plugin: a real ``fleetbus kme serve`` subprocess (two ETSI 014 KMEs, mutual TLS).

Load it as ``pytest_plugins = ["tests.support.fixtures_kme"]`` (``tests/conftest.py`` does) or
``-p tests.support.fixtures_kme``. Fixtures: ``kme_pki``, ``kme_foreign_pki``, ``kme_pair``
(session) and ``qkd_provider_sides`` (per test, link reset to its start state).
"""

from __future__ import annotations

import http.client
import json
import queue
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from fleetbus.bus.keys import PrivateKeySet, RecipientKeys
from fleetbus.devtools.kme_pki import DEFAULT_KME_IDS, TestPKI, make_test_pki
from fleetbus.providers.qkd import QKDProvider
from tests.support.sides import ProviderSides

READY_PREFIX = "fleetbus-kme ready "
START_TIMEOUT_S = 60.0

MASTER_SAE = "sae-hub"  # site A, behind KME-A
SLAVE_SAE = "sae-edge-1"  # site B, behind KME-B
OTHER_SLAVE_SAE = "sae-edge-2"  # also site B: must never get sae-edge-1's keys
OUTSIDER_SAE = "sae-outsider"  # a valid certificate of our CA, attached to no KME
POOL_KEYS = 64
KEY_RATE_BPS = 1_000_000


@dataclass
class KMEPairUnderTest:
    """A running simulated link: URLs, the PKI it trusts, and helpers for tests."""

    kme_a_url: str
    kme_b_url: str
    admin_url: str
    pki: TestPKI
    process: subprocess.Popen[str]
    log_file: Path
    master_sae: str = MASTER_SAE
    slave_sae: str = SLAVE_SAE
    other_slave_sae: str = OTHER_SLAVE_SAE
    kme_a_id: str = DEFAULT_KME_IDS[0]
    kme_b_id: str = DEFAULT_KME_IDS[1]
    pool_keys: int = POOL_KEYS
    key_rate_bps: int = KEY_RATE_BPS
    _reader: threading.Thread | None = field(default=None, repr=False)

    def client_context(self, sae_id: str | None, *, ca_file: Path | None = None) -> ssl.SSLContext:
        """A TLS client context trusting our CA, presenting ``sae_id``'s certificate if given."""
        ctx = ssl.create_default_context(cafile=str(ca_file or self.pki.ca_cert))
        if sae_id is not None:
            pair = self.pki.saes[sae_id]
            ctx.load_cert_chain(str(pair.cert), str(pair.key))
        return ctx

    def call(
        self,
        base_url: str,
        sae_id: str | None,
        method: str,
        path: str,
        body: Any = None,
        *,
        context: ssl.SSLContext | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """One 014 request with plain ``http.client``; returns (status, JSON object)."""
        url = urlsplit(base_url)
        assert url.hostname is not None
        conn = http.client.HTTPSConnection(
            url.hostname, url.port, context=context or self.client_context(sae_id), timeout=10
        )
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = json.loads(resp.read())
            return resp.status, data
        finally:
            conn.close()

    def admin(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.admin_url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def metrics(self) -> str:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=10) as resp:
            text: str = resp.read().decode()
        return text

    def reset(self) -> dict[str, Any]:
        """Link up, no eavesdropper, start rate, full pool, no reservations."""
        return self.admin("POST", "/admin/reset", {})

    def provider(self, side: str, **overrides: Any) -> QKDProvider:
        """A ``QKDProvider`` for the master (side "a") or the slave (side "b")."""
        sae = self.master_sae if side == "a" else self.slave_sae
        pair = self.pki.saes[sae]
        kwargs: dict[str, Any] = {
            "kme_url": self.kme_a_url if side == "a" else self.kme_b_url,
            "kme_id": self.kme_a_id if side == "a" else self.kme_b_id,
            "sae_id": sae,
            "ca_file": self.pki.ca_cert,
            "cert_file": pair.cert,
            "key_file": pair.key,
        }
        if side == "b":
            kwargs["master_sae_id"] = self.master_sae
        kwargs.update(overrides)
        return QKDProvider(**kwargs)


@pytest.fixture(scope="session")
def kme_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """CA, KME server certs and client certs for the test SAEs (plus the admin cert)."""
    return make_test_pki(
        tmp_path_factory.mktemp("kme-pki"),
        [MASTER_SAE, SLAVE_SAE, OTHER_SLAVE_SAE, OUTSIDER_SAE],
    )


@pytest.fixture(scope="session")
def kme_foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """Another CA issuing certificates with the *same* SAE names: must be rejected."""
    return make_test_pki(
        tmp_path_factory.mktemp("kme-foreign-pki"),
        [MASTER_SAE, SLAVE_SAE],
        ca_name="not the fleetbus KME CA",
    )


def start_kme_process(
    cert_dir: Path, log_file: Path, *extra_args: str
) -> tuple[subprocess.Popen[str], dict[str, str], threading.Thread]:
    """Start ``python -m fleetbus.cli.kme serve`` on free ports; wait for its ready line."""
    cmd = [
        sys.executable,
        "-m",
        "fleetbus.cli.kme",
        "serve",
        "--cert-dir",
        str(cert_dir),
        "--port-a",
        "0",
        "--port-b",
        "0",
        "--admin-port",
        "0",
        *extra_args,
    ]
    log = log_file.open("w")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    finally:
        log.close()  # the child holds its own descriptor
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, name="kme-stdout", daemon=True)
    reader.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(0.05, remaining))
        except queue.Empty:
            line = None
        if line is not None and line.startswith(READY_PREFIX):
            return proc, json.loads(line[len(READY_PREFIX) :]), reader
        if line is None or remaining <= 0:
            stop_kme_process(proc, reader)
            pytest.fail(f"kme serve did not get ready; log:\n{log_file.read_text()}")


def stop_kme_process(proc: subprocess.Popen[str], reader: threading.Thread) -> int:
    """SIGTERM, then wait; kill only if it ignores that. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    reader.join(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()
    return int(proc.returncode)


def _wait_until_status_answers(pair: KMEPairUnderTest) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    path = f"/api/v1/keys/{pair.slave_sae}/status"
    while True:
        try:
            status, _ = pair.call(pair.kme_a_url, pair.master_sae, "GET", path)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("KME-A status never answered over mutual TLS")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def kme_pair(
    kme_pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KMEPairUnderTest]:
    """``fleetbus kme serve`` as a real subprocess; stopped with SIGTERM at session end."""
    log_file = tmp_path_factory.mktemp("kme-log") / "kme.log"
    proc, urls, reader = start_kme_process(
        kme_pki.directory,
        log_file,
        "--sae-a",
        MASTER_SAE,
        "--sae-b",
        SLAVE_SAE,
        "--sae-b",
        OTHER_SLAVE_SAE,
        "--pool-size",
        str(POOL_KEYS),
        "--max-key-per-request",
        str(POOL_KEYS),
        "--key-rate",
        str(KEY_RATE_BPS),
    )
    pair = KMEPairUnderTest(
        kme_a_url=urls["kme_a"],
        kme_b_url=urls["kme_b"],
        admin_url=urls["admin"],
        pki=kme_pki,
        process=proc,
        log_file=log_file,
        _reader=reader,
    )
    try:
        _wait_until_status_answers(pair)
        yield pair
    finally:
        code = stop_kme_process(proc, reader)
    assert code == 0, f"kme serve exited with {code}; log:\n{log_file.read_text()}"


@pytest.fixture
def qkd_provider_sides(kme_pair: KMEPairUnderTest) -> ProviderSides:
    """Sender = master SAE at KME-A, receiver = slave SAE at KME-B, over the real server."""
    kme_pair.reset()
    slave = kme_pair.slave_sae
    return ProviderSides(
        sender=kme_pair.provider("a"),
        receiver=kme_pair.provider("b"),
        recipient=RecipientKeys(
            principal_id="depot-edge-1", public_keys={}, key_ids={}, qkd_sae_id=slave
        ),
        own=PrivateKeySet(principal_id="depot-edge-1", private_keys={}, qkd_sae_id=slave),
    )
