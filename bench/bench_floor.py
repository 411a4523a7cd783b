"""The cryptographic floor of one secure-epochs command: the primitives the design requires per
command, timed alone (``cryptography`` calls, nothing else), next to an AES-256-GCM-only baseline
in the same run, and the best secure / plaintext ratio they leave.

    .venv/bin/python bench/bench_floor.py [--iterations 2000] [--pipeline PIPELINE_JSON]

Counts per command follow the ``secure-epochs`` topology of bench_pipeline.py (authorize, seal,
vehicle; batch signing over ``--batch`` records, audit checkpoints every ``--checkpoint-every``
records per chain, key epochs of ``--epoch-messages`` messages). Each primitive's CPU time
(``time.process_time``, one thread) is the median of ``--repeats`` runs of ``--iterations``
calls. With a pipeline result (``bench_pipeline.py``'s JSON) the bound is computed against that
run's plaintext CPU per command: even if every line of Python around the primitives cost nothing,
the secure path could not cost less than plaintext + floor. Prints a table; writes
bench/results/floor.json. Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetbus.bus.keys import PrivateKeySet, RecipientKeys
from fleetbus.bus.registry import load_signature_suite
from fleetbus.providers.hpke import XWingProvider

RESULTS = Path(__file__).parent / "results"

COMMAND_BYTES = 354  # a signed ping on commands.requested (bench_pipeline.py)
ANSWER_BYTES = 160  # the vehicle's answer payload
LEAF_BYTES = 2048  # one envelope's signature input: protected header + ciphertext
AUDIT_ENTRY_BYTES = 300  # one audit chain entry


@dataclass
class Line:
    where: str
    operation: str
    per_command: float
    us_each: float

    @property
    def us_per_command(self) -> float:
        return self.per_command * self.us_each


def cpu_us(fn: Callable[[], object], iterations: int, repeats: int) -> float:
    """Median CPU microseconds per call over ``repeats`` runs of ``iterations`` calls."""
    runs = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(iterations):
            fn()
        runs.append((time.process_time() - start) / iterations * 1e6)
    return statistics.median(runs)


def measure(
    *, iterations: int, repeats: int, batch: int, checkpoint_every: int, epoch_messages: int
) -> tuple[list[Line], list[Line]]:
    n, r = iterations, repeats
    slow = max(20, n // 20)  # ML-DSA and X-Wing: fewer calls
    ed = load_signature_suite("ed25519")
    ed_sk, ed_pk = ed.generate()
    ed_signer, ed_verifier = ed.signer(ed_sk, "k"), ed.verifier(ed_pk)
    composite = load_signature_suite("composite-mldsa65-ed25519")
    c_sk, c_pk = composite.generate()
    c_signer, c_verifier = composite.signer(c_sk, "k"), composite.verifier(c_pk)

    command, answer = os.urandom(COMMAND_BYTES), os.urandom(ANSWER_BYTES)
    ed_sig = ed_signer.sign(command)
    root = hashlib.sha256(b"root").digest()
    c_sig = c_signer.sign(root)
    key, iv, aad = AESGCM.generate_key(256), os.urandom(12), os.urandom(64)
    ct_command = AESGCM(key).encrypt(iv, command, aad)
    ct_answer = AESGCM(key).encrypt(iv, answer, aad)
    leaf, node, entry = os.urandom(LEAF_BYTES), os.urandom(65), os.urandom(AUDIT_ENTRY_BYTES)
    header = os.urandom(600)

    xwing = XWingProvider()
    x_sk, x_pk = xwing.generate_keypair()
    alg = xwing.algorithm or "xwing"
    recipient = RecipientKeys("V-1", {alg: x_pk}, {alg: "V-1/xwing/1"})
    own = PrivateKeySet("V-1", {alg: x_sk}, {alg: "V-1/xwing/1"})
    encapsulated = xwing.establish(recipient, context=b"context")

    def hkdf() -> bytes:
        return HKDF(hashes.SHA256(), 32, None, header).derive(key)

    us = {
        "ed_verify": cpu_us(lambda: ed_verifier.verify(command, ed_sig), n, r),
        "ed_sign": cpu_us(lambda: ed_signer.sign(answer), n, r),
        "c_sign": cpu_us(lambda: c_signer.sign(root), slow, r),
        "c_verify": cpu_us(lambda: c_verifier.verify(root, c_sig), slow, r),
        "hkdf": cpu_us(hkdf, n, r),
        "enc_command": cpu_us(lambda: AESGCM(key).encrypt(iv, command, aad), n, r),
        "dec_command": cpu_us(lambda: AESGCM(key).decrypt(iv, ct_command, aad), n, r),
        "enc_answer": cpu_us(lambda: AESGCM(key).encrypt(iv, answer, aad), n, r),
        "dec_answer": cpu_us(lambda: AESGCM(key).decrypt(iv, ct_answer, aad), n, r),
        "sha_leaf": cpu_us(lambda: hashlib.sha256(leaf).digest(), n, r),
        "sha_node": cpu_us(lambda: hashlib.sha256(node).digest(), n, r),
        "sha_entry": cpu_us(lambda: hashlib.sha256(entry).digest(), n, r),
        "x_encap": cpu_us(lambda: xwing.establish(recipient, context=b"context"), slow, r),
        "x_decap": cpu_us(
            lambda: xwing.recover(
                encapsulated.key_ref, encapsulated.key_id, own, context=b"context"
            ),
            slow,
            r,
        ),
    }
    b, c, e = batch, checkpoint_every, epoch_messages
    depth = max(1, (b - 1).bit_length())  # inclusion path length in a tree of b leaves
    floor = [
        Line("bus: authorize", "Ed25519 verify (dispatcher's signature)", 1, us["ed_verify"]),
        Line("bus: authorize + seal", "SHA-256 audit chain entry", 2, us["sha_entry"]),
        Line("bus: authorize + seal", "composite sign (audit checkpoint)", 2 / c, us["c_sign"]),
        Line("bus: seal", "X-Wing encapsulate (per epoch)", 1 / e, us["x_encap"]),
        Line("bus: seal", "HKDF-SHA256 message key", 1, us["hkdf"]),
        Line("bus: seal", "AES-256-GCM encrypt (command)", 1, us["enc_command"]),
        Line("bus: seal", "SHA-256 Merkle leaf", 1, us["sha_leaf"]),
        Line("bus: seal", "SHA-256 Merkle inner node", (b - 1) / b, us["sha_node"]),
        Line("bus: seal", f"composite sign (batch root, 1 per {b})", 1 / b, us["c_sign"]),
        Line("vehicle", "X-Wing decapsulate (per epoch)", 1 / e, us["x_decap"]),
        Line("vehicle", f"composite verify (batch root, 1 per {b})", 1 / b, us["c_verify"]),
        Line("vehicle", "SHA-256 Merkle leaf + inclusion path", 1, us["sha_leaf"]),
        Line("vehicle", "SHA-256 Merkle path nodes", depth, us["sha_node"]),
        Line("vehicle", "HKDF-SHA256 message key", 1, us["hkdf"]),
        Line("vehicle", "AES-256-GCM decrypt (command)", 1, us["dec_command"]),
        Line("vehicle", "Ed25519 verify (dispatcher's signature, end to end)", 1, us["ed_verify"]),
        Line("vehicle: answer", "X-Wing encapsulate (per epoch)", 1 / e, us["x_encap"]),
        Line("vehicle: answer", "HKDF-SHA256 message key", 1, us["hkdf"]),
        Line("vehicle: answer", "AES-256-GCM encrypt (answer)", 1, us["enc_answer"]),
        Line("vehicle: answer", "Ed25519 sign (answer)", 1, us["ed_sign"]),
    ]
    baseline = [  # encryption only, as a proxy that encrypts each record hop (Kroxylicious)
        Line("baseline", "AES-256-GCM encrypt (command)", 1, us["enc_command"]),
        Line("baseline", "AES-256-GCM decrypt (command)", 1, us["dec_command"]),
        Line("baseline", "AES-256-GCM encrypt (answer)", 1, us["enc_answer"]),
        Line("baseline", "AES-256-GCM decrypt (answer)", 1, us["dec_answer"]),
    ]
    return floor, baseline


def bounds(pipeline: dict[str, Any], floor_ms: float, target: float) -> list[dict[str, Any]]:
    """Per partition count: the plaintext run's CPU per command and the best ratio it allows."""
    out = []
    for row in pipeline.get("rows", []):
        if row.get("mode") != "plaintext" or "saturation" not in row:
            continue
        sat = row["saturation"]
        for basis, key in (
            ("worker + vehicle", "cpu_ms_per_command"),
            ("whole machine", "machine_cpu_ms_per_command"),
            ("whole machine less idle", "machine_net_cpu_ms_per_command"),
        ):
            plain = sat.get(key)
            if not plain:
                continue
            secure = next(
                (
                    r["saturation"].get(key)
                    for r in pipeline["rows"]
                    if r.get("mode") == "secure-epochs"
                    and r.get("partitions") == row["partitions"]
                    and "saturation" in r
                ),
                None,
            )
            out.append(
                {
                    "partitions": row["partitions"],
                    "basis": basis,
                    "plaintext_cpu_ms": plain,
                    "secure_epochs_cpu_ms": secure,
                    "floor_ms": round(floor_ms, 3),
                    "best_ratio": round(plain / (plain + floor_ms), 3),
                    # What the target leaves for everything but the primitives, per command.
                    "budget_at_target_ms": round(plain / target - plain - floor_ms, 3),
                    "measured_overhead_ms": round(secure - plain, 3) if secure else None,
                }
            )
    return out


def floor_report(
    pipeline: dict[str, Any],
    *,
    iterations: int = 2000,
    repeats: int = 5,
    batch: int = 50,
    checkpoint_every: int = 100,
    epoch_messages: int = 375,
    target: float = 0.75,
) -> dict[str, Any]:
    """Measure the floor now and bound it against ``pipeline`` (a bench_pipeline report, or
    ``{}``); bench_pipeline.py calls this at the end of its run, so that both come from the
    machine in the same state."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    parameters = {
        "iterations": iterations,
        "repeats": repeats,
        "batch": batch,
        "checkpoint_every": checkpoint_every,
        "epoch_messages": epoch_messages,
    }
    floor, baseline = measure(**parameters)
    floor_us = sum(line.us_per_command for line in floor)
    return {
        "benchmark": "floor",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "parameters": {**parameters, "target": target},
        "floor_us_per_command": round(floor_us, 1),
        "baseline_us_per_command": round(sum(line.us_per_command for line in baseline), 2),
        "floor": [{**asdict(line), "us_per_command": line.us_per_command} for line in floor],
        "baseline": [{**asdict(line), "us_per_command": line.us_per_command} for line in baseline],
        "bounds": bounds(pipeline, floor_us / 1000, target),
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{'where':<22}{'operation':<52}{'/cmd':>7}{'us each':>10}{'us/cmd':>9}")
    for line in [*report["floor"], *report["baseline"]]:
        print(
            f"{line['where']:<22}{line['operation']:<52}{line['per_command']:>7.3f}"
            f"{line['us_each']:>10.1f}{line['us_per_command']:>9.1f}"
        )
    print(f"\nfloor of secure-epochs: {report['floor_us_per_command']:.0f} us CPU per command")
    print(f"AES-256-GCM-only baseline: {report['baseline_us_per_command']:.1f} us CPU per command")
    if report["bounds"]:
        print(f"\nagainst the pipeline run (target ratio {report['parameters']['target']}):")
        print(
            f"{'P':>3} {'basis':<26}{'plain ms':>9}{'secure ms':>10}{'floor ms':>9}"
            f"{'best ratio':>11}{'budget ms':>10}{'overhead ms':>12}"
        )
        for b in report["bounds"]:
            print(
                f"{b['partitions']:>3} {b['basis']:<26}{b['plaintext_cpu_ms']:>9.2f}"
                f"{b['secure_epochs_cpu_ms'] or float('nan'):>10.2f}{b['floor_ms']:>9.3f}"
                f"{b['best_ratio']:>11.3f}{b['budget_at_target_ms']:>10.3f}"
                f"{b['measured_overhead_ms'] or float('nan'):>12.2f}"
            )
        print(
            "best ratio: plaintext / (plaintext + floor); budget: what the target leaves per "
            "command for everything but the primitives (negative: out of reach)"
        )


def markdown(report: dict[str, Any]) -> list[str]:
    """The floor as Markdown lines (bench_pipeline.py appends them to pipeline.md)."""
    lines = [
        "## Floor: the primitives alone (bench_floor.py, measured after the rounds)",
        "",
        f"Load average {report['load_before']} / {report['load_after']}. Floor of "
        f"secure-epochs: **{report['floor_us_per_command']:.0f} µs** CPU per command; "
        f"AES-256-GCM-only baseline: {report['baseline_us_per_command']:.1f} µs.",
        "",
        "| where | operation | per command | µs each | µs per command |",
        "|---|---|---|---|---|",
    ]
    for line in [*report["floor"], *report["baseline"]]:
        lines.append(
            f"| {line['where']} | {line['operation']} | {line['per_command']:.3f} "
            f"| {line['us_each']:.1f} | {line['us_per_command']:.1f} |"
        )
    if report["bounds"]:
        lines += [
            "",
            "| partitions | basis | plaintext CPU ms | secure-epochs CPU ms | floor ms "
            "| best ratio | left at the target, ms | measured overhead, ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for b in report["bounds"]:
            lines.append(
                f"| {b['partitions']} | {b['basis']} | {b['plaintext_cpu_ms']} "
                f"| {b['secure_epochs_cpu_ms']} | {b['floor_ms']} | {b['best_ratio']} "
                f"| {b['budget_at_target_ms']} | {b['measured_overhead_ms']} |"
            )
    return [*lines, ""]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=50, help="records per signed batch")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--epoch-messages", type=int, default=375, help="messages per key epoch")
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument("--pipeline", type=Path, default=RESULTS / "pipeline.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    pipeline = json.loads(args.pipeline.read_text()) if args.pipeline.exists() else {}
    options = {k: v for k, v in vars(args).items() if k not in ("pipeline", "out")}
    report = floor_report(pipeline, **options)
    report["pipeline"] = str(args.pipeline) if pipeline else None
    print_report(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "floor.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'floor.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
