"""Cost of the KME simulator's durable pool: one state write per enc_keys/dec_keys.

    .venv/bin/python bench/bench_kme_state.py [--rounds 200]

Prints a table (pool size, outstanding reservations, state file size, median and p95 per key
request) and writes ``bench/results/kme_state.json``. Numbers depend on the disk (two fsyncs
per write) and on the load average, which is recorded with them; see docs/qkd.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fleetbus.kmesim.pool import KeyPool
from fleetbus.kmesim.state import PoolStateFile

CASES = [(1000, 0), (1000, 100), (4096, 0), (4096, 1000)]
RESULTS = Path(__file__).resolve().parent / "results" / "kme_state.json"


def one_request_pair(pool: KeyPool) -> None:
    ((key_id, _),) = pool.reserve(
        source_kme="KME-A", target_kme="KME-B", master="m", slave="s", number=1, size_bits=256
    )
    pool.deliver(target_kme="KME-B", master="m", slave="s", key_ids=[key_id])


def measure(pool_keys: int, reserved: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        state = PoolStateFile(Path(directory))
        pool = KeyPool(max_key_count=pool_keys, key_rate_bps=1e9, state_file=state)
        for _ in range(reserved):
            pool.reserve(
                source_kme="KME-A", target_kme="KME-B", master="m", slave="s", number=1,
                size_bits=256,
            )  # fmt: skip
        per_request = []
        for _ in range(rounds):
            began = time.perf_counter()
            one_request_pair(pool)
            per_request.append((time.perf_counter() - began) / 2)
        size = (Path(directory) / PoolStateFile.FILE_NAME).stat().st_size
        pool.close()
    per_request.sort()
    return {
        "pool_keys": pool_keys,
        "reserved": reserved,
        "state_file_kib": round(size / 1024),
        "median_ms": round(statistics.median(per_request) * 1e3, 2),
        "p95_ms": round(per_request[int(0.95 * len(per_request))] * 1e3, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = [measure(p, r, args.rounds) for p, r in CASES]
    memory = KeyPool(max_key_count=4096, key_rate_bps=1e9)
    began = time.perf_counter()
    for _ in range(args.rounds * 10):
        one_request_pair(memory)
    memory_us = (time.perf_counter() - began) / (args.rounds * 20) * 1e6
    load_after = os.getloadavg()[0]
    print(f"{'pool':>6} {'reserved':>9} {'file KiB':>9} {'median ms':>10} {'p95 ms':>8}")
    for row in rows:
        print(
            f"{row['pool_keys']:>6} {row['reserved']:>9} {row['state_file_kib']:>9} "
            f"{row['median_ms']:>10} {row['p95_ms']:>8}"
        )
    load = f"load {load_before:.1f} -> {load_after:.1f}"
    print(f"memory only: {memory_us:.1f} us per request; {load}")
    RESULTS.write_text(
        json.dumps(
            {
                "rows": rows,
                "memory_only_us": round(memory_us, 1),
                "load_average": [round(load_before, 2), round(load_after, 2)],
                "rounds": args.rounds,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
