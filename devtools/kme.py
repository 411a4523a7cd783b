"""A KME pair (``fleetbus kme serve``) in a child process, with its test PKI, for the demo and
the benchmarks. Tests use the fixtures in ``tests/support/fixtures_kme.py`` instead."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetbus.bus.errors import ConfigError
from fleetbus.devtools.process import spawn, stop_group

READY_PREFIX = "fleetbus-kme ready "


@dataclass
class KMEPairProcess:
    """Two ETSI 014 KMEs joined by a simulated link, running until ``stop()``.

    SAEs in ``sae_a`` sit behind KME-A (the sealing side, master), those in ``sae_b`` behind
    KME-B (edge units, slaves). Certificates are written to ``workdir / "pki"``. With
    ``durable=True`` the pool is kept in ``workdir / "kme-state"``, so a ``stop()`` then
    ``start()`` keeps the keys handed out but not yet fetched (and the PKI is not re-issued).
    """

    workdir: Path
    sae_a: list[str]
    sae_b: list[str]
    key_rate_bps: float = 1_000_000.0
    pool_size: int = 4096
    durable: bool = False
    urls: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[str] | None = field(default=None, repr=False)

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def state_dir(self) -> Path | None:
        return self.workdir / "kme-state" if self.durable else None

    def start(self, timeout_s: float = 60.0) -> KMEPairProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cli = [sys.executable, "-m", "fleetbus.cli.kme"]
        saes = [arg for sae in (*self.sae_a, *self.sae_b) for arg in ("--sae", sae)]
        if not (self.durable and (self.pki / "ca.pem").is_file()):
            subprocess.run(  # noqa: S603
                [*cli, "certs", "--out", str(self.pki), *saes],
                check=True,
                capture_output=True,
            )
        state = [] if self.state_dir is None else ["--state-dir", str(self.state_dir)]
        args = [
            *cli, "serve", "--cert-dir", str(self.pki),
            "--port-a", "0", "--port-b", "0", "--admin-port", "0",
            "--key-rate", str(self.key_rate_bps), "--pool-size", str(self.pool_size),
            "--prefill", str(self.pool_size), *state,
            *[a for sae in self.sae_a for a in ("--sae-a", sae)],
            *[a for sae in self.sae_b for a in ("--sae-b", sae)],
        ]  # fmt: skip
        with open(self.workdir / "kme.log", "w") as log:  # the child keeps its own copy
            self._proc = spawn(args, stdout=subprocess.PIPE, stderr=log, text=True)
        found: dict[str, Any] = {}

        stdout = self._proc.stdout
        assert stdout is not None

        def read() -> None:
            for line in stdout:
                if line.startswith(READY_PREFIX) and not found:
                    found.update(json.loads(line[len(READY_PREFIX) :]))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not found:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.workdir / "kme.log").read_text(errors="replace")[-2000:]
                raise ConfigError(f"the KME pair did not start:\n{tail}")
            time.sleep(0.05)
        self.urls = {k: str(v) for k, v in found.items()}
        return self

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def kme_id(self, side: str) -> str:
        """The KME ID of ``side`` ("kme_a" or "kme_b"), read from its server certificate."""
        from fleetbus.kmesim.config import certificate_kme_id

        return certificate_kme_id(self.pki / f"{side.replace('_', '-')}.pem")

    def provider_config(self, sae_id: str, *, master_sae_id: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``QKDProvider`` acting as ``sae_id``."""
        side = "kme_a" if sae_id in self.sae_a else "kme_b"
        config: dict[str, Any] = {
            "kme_url": self.urls[side],
            "kme_id": self.kme_id(side),
            "sae_id": sae_id,
            "ca_file": str(self.pki / "ca.pem"),
            "cert_file": str(self.pki / f"{sae_id}.pem"),
            "key_file": str(self.pki / f"{sae_id}.key"),
        }
        if master_sae_id is not None:
            config["master_sae_id"] = master_sae_id
        return config

    def admin(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the admin endpoint, e.g. ``admin("/admin/link", {"up": False})``."""
        import urllib.request

        req = urllib.request.Request(  # noqa: S310 - loopback admin URL we started
            self.urls["admin"] + path, data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            stop_group(self._proc, timeout_s=15)
