"""Micro-benchmark of envelope seal / open per key path, signature suite, key epochs and batch
signing, with an AES-256-GCM-only baseline on the same payload. Prints a table and writes
bench/results/envelope.json. Not a test: numbers depend on the machine and its load.

    .venv/bin/python bench/bench_envelope.py [--iterations 200] [--payload 512]

QKD rows use a KME pair the benchmark starts itself (``fleetbus kme serve`` over mTLS on
loopback), unless both ends of another KME pair are configured, as JSON objects of
``QKDProvider`` keyword arguments, in FLEETBUS_BENCH_QKD_SENDER and FLEETBUS_BENCH_QKD_RECIPIENT
(the recipient's needs ``master_sae_id``) with the recipient's SAE id in
FLEETBUS_BENCH_QKD_RECIPIENT_SAE. ``--no-kme`` skips them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetbus.bus.keys import (
    KeyPath,
    KeyProvider,
    PrivateKeySet,
    RecipientKeys,
    SecurityProfile,
    Verifier,
)
from fleetbus.bus.registry import load_signature_suite
from fleetbus.devtools.kme import KMEPairProcess
from fleetbus.providers.hpke import MLKEM768Provider, X25519Provider, XWingProvider
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
from fleetbus.providers.sealing import EnvelopeOpener, EnvelopeSealer, EpochPolicy, SealRequest

TOPIC = "fleet.commands.outbound"
PATHS = ["x25519", "mlkem768", "xwing", "qkd-etsi014+xwing"]
SUITES = ["ed25519", "mldsa65", "composite-mldsa65-ed25519"]
BATCH_SIZES = [1, 16, 64]
RESULTS = Path(__file__).parent / "results" / "envelope.json"


@dataclass
class Row:
    case: str
    key_path: str
    suite: str
    epochs: bool
    batch: int  # 0 = per-message signing
    seal_us: float | None
    open_us: float | None
    envelope_bytes: int | None
    establishes: int | None
    signatures: int | None
    note: str = ""


class _Directory:
    def __init__(self, principal: str, key_id: str, verifier: Verifier) -> None:
        self._entry = (principal, key_id)
        self._verifier = verifier

    def verifier_for(self, principal_id: str, key_id: str, *, at: float) -> Verifier:
        if (principal_id, key_id) != self._entry:
            raise KeyError(principal_id)
        return self._verifier


_LOCAL_KME: KMEPairProcess | None = None


def _qkd_providers() -> tuple[KeyProvider, KeyProvider, str] | None:
    sender_cfg = os.environ.get("FLEETBUS_BENCH_QKD_SENDER")
    recipient_cfg = os.environ.get("FLEETBUS_BENCH_QKD_RECIPIENT")
    recipient_sae = os.environ.get("FLEETBUS_BENCH_QKD_RECIPIENT_SAE")
    if not (sender_cfg and recipient_cfg and recipient_sae):
        if _LOCAL_KME is None:
            return None
        sender_cfg = json.dumps(_LOCAL_KME.provider_config("sae-hub"))
        recipient_cfg = json.dumps(
            _LOCAL_KME.provider_config("sae-edge-1", master_sae_id="sae-hub")
        )
        recipient_sae = "sae-edge-1"
    from fleetbus.providers.qkd import QKDProvider

    return (
        QKDProvider(**json.loads(sender_cfg)),
        QKDProvider(**json.loads(recipient_cfg)),
        recipient_sae,
    )


def _hpke() -> dict[str, KeyProvider]:
    return {"x25519": X25519Provider(), "mlkem768": MLKEM768Provider(), "xwing": XWingProvider()}


def _per_op_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def baseline(payload: bytes, n: int) -> Row:
    key, iv, aad = AESGCM.generate_key(256), os.urandom(12), b"aad"
    aead = AESGCM(key)
    ct = aead.encrypt(iv, payload, aad)
    seal = _per_op_us(lambda: AESGCM(key).encrypt(iv, payload, aad), n * 10)
    opened = _per_op_us(lambda: AESGCM(key).decrypt(iv, ct, aad), n * 10)
    return Row("baseline AES-256-GCM only", "-", "-", False, 0, seal, opened, len(ct), 0, 0)


def run_case(
    path: str, suite_name: str, *, epochs: bool, batch: int, payload: bytes, n: int
) -> Row:
    label = f"{path} / {suite_name} / epochs {'on' if epochs else 'off'}" + (
        f" / batch {batch}" if batch else ""
    )
    sender_providers, recipient_providers = _hpke(), _hpke()
    qkd_sae: str | None = None
    if "qkd-etsi014" in path:
        qkd = _qkd_providers()
        if qkd is None:
            return Row(label, path, suite_name, epochs, batch, None, None, None, None, None,
                       "skipped: no KME")  # fmt: skip
        sender_providers["qkd-etsi014"], recipient_providers["qkd-etsi014"], qkd_sae = qkd

    private: dict[str, bytes] = {}
    public: dict[str, bytes] = {}
    ids: dict[str, str] = {}
    for provider in recipient_providers.values():
        if provider.algorithm is not None:
            private[provider.algorithm], public[provider.algorithm] = provider.generate_keypair()
            ids[provider.algorithm] = f"V-17/{provider.algorithm}/1"
    recipient = RecipientKeys("V-17", public, ids, qkd_sae_id=qkd_sae)
    own = PrivateKeySet("V-17", private, ids, qkd_sae_id=qkd_sae)

    suite = load_signature_suite(suite_name)
    sk, pk = suite.generate()
    signer = suite.signer(sk, "bus-sealer-1/sig/1")
    key_path = KeyPath.parse(path)
    profile = SecurityProfile("bench", [key_path], suite_name, False, key_path)
    sealer = EnvelopeSealer(
        "bus-sealer-1",
        signer,
        ProfileSealer(KeyPathRunner(sender_providers)),
        epochs=EpochPolicy(max_age_s=3600, max_messages=1_000_000) if epochs else None,
        batch_signing=batch > 0,
    )
    opener = EnvelopeOpener(
        own,
        _Directory("bus-sealer-1", signer.key_id, suite.verifier(pk)),
        KeyPathRunner(recipient_providers),
        key_path,
    )
    now = time.time()
    counter = iter(range(10**9))

    def request() -> SealRequest:
        return SealRequest(
            "cmd", TOPIC, recipient, f"m-{next(counter)}", "doors.unlock", payload,
            now, now + 3600, profile,
        )  # fmt: skip

    envelopes: list[bytes] = []
    if batch:
        rounds = max(1, n // batch)
        start = time.perf_counter()
        for _ in range(rounds):
            envelopes.extend(sealer.seal_batch([request() for _ in range(batch)]))
        seal_us = (time.perf_counter() - start) / len(envelopes) * 1e6
    else:
        start = time.perf_counter()
        for _ in range(n):
            envelopes.extend(sealer.seal_batch([request()]))
        seal_us = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    for envelope in envelopes:
        opener.open(envelope, topic=TOPIC)
    open_us = (time.perf_counter() - start) / len(envelopes) * 1e6
    return Row(
        label,
        path,
        suite_name,
        epochs,
        batch,
        seal_us,
        open_us,
        int(statistics.mean(len(e) for e in envelopes)),
        sealer.stats.establishes,
        sealer.stats.signatures,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--payload", type=int, default=512)
    parser.add_argument(
        "--no-kme",
        action="store_true",
        help="do not start a local KME pair for the qkd-etsi014 rows",
    )
    args = parser.parse_args()
    payload = os.urandom(args.payload)
    n = args.iterations
    global _LOCAL_KME
    if not args.no_kme and "FLEETBUS_BENCH_QKD_SENDER" not in os.environ:
        # A real KME pair over mTLS on loopback; each QKD establish is one enc_keys round trip.
        _LOCAL_KME = KMEPairProcess(
            Path(tempfile.mkdtemp(prefix="fleetbus-bench-kme-")), ["sae-hub"], ["sae-edge-1"]
        ).start()
    try:
        run_all(args, payload, n)
    finally:
        if _LOCAL_KME is not None:
            _LOCAL_KME.stop()


def run_all(args: argparse.Namespace, payload: bytes, n: int) -> None:

    rows = [baseline(payload, n)]
    for path in PATHS:
        for suite in SUITES:
            for epochs in (False, True):
                rows.append(run_case(path, suite, epochs=epochs, batch=0, payload=payload, n=n))
    for suite in SUITES:
        for size in BATCH_SIZES:
            rows.append(
                run_case("xwing", suite, epochs=True, batch=size, payload=payload, n=max(n, size))
            )

    header = f"{'case':<58} {'seal µs':>10} {'open µs':>10} {'bytes':>7} {'KEM':>6} {'sigs':>6}"
    print(f"envelope micro-benchmark: {n} messages per row, payload {args.payload} B")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.seal_us is None:
            print(f"{r.case:<58} {r.note}")
            continue
        print(
            f"{r.case:<58} {r.seal_us:>10.1f} {r.open_us or 0:>10.1f} {r.envelope_bytes:>7} "
            f"{r.establishes:>6} {r.signatures:>6}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "benchmark": "envelope",
        "iterations": n,
        "payload_bytes": args.payload,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "timestamp": time.time(),
        "rows": [r.__dict__ for r in rows],
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
