"""Cost of recording one message id in a replay state that already holds n ids: the vehicle's
in-memory ``ReplayCache``, the bus stages' ``UplinkReplay`` (partition state + its deadline index),
and, for comparison, the shared cache the bus used before (evict the id closest to expiry,
found by a scan). Also the tick's expiry cost. Prints a table and writes
bench/results/replay_state.json. Not a test: numbers depend on the machine and its load.

    .venv/bin/python bench/bench_replay_state.py [--sizes 10000,100000] [--inserts 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetbus.processors.eos import PartitionState
from fleetbus.processors.uplink import UplinkLimits, UplinkReplay
from fleetbus.providers.sealing import ReplayCache

RESULTS = Path(__file__).parent / "results" / "replay_state.json"
NOW = 1_800_000_000.0
SENDERS = 100


class SharedEvictingCache:
    """The bus's former uplink cache (before issue 11 finding 6), kept here only to measure it:
    one bounded map for all senders; when full, the id closest to expiry is dropped (a scan)."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: dict[tuple[str, str], float] = {}

    def add(self, sender: str, message_id: str, *, until: float) -> None:
        if len(self._entries) >= self._max:
            expired = [k for k, u in self._entries.items() if u < NOW]
            for k in expired:
                del self._entries[k]
            while len(self._entries) >= self._max:
                del self._entries[min(self._entries, key=self._entries.__getitem__)]
        self._entries[(sender, message_id)] = until


def per_insert_us(add: Callable[[int], Any], inserts: int) -> float:
    started = time.perf_counter()
    for i in range(inserts):
        add(i)
    return (time.perf_counter() - started) / inserts * 1e6


def measure(n: int, inserts: int) -> list[dict[str, Any]]:
    rows = []
    per_sender = n // SENDERS

    old = SharedEvictingCache(n)
    for i in range(n):
        old.add(f"V-{i % SENDERS}", f"m{i}", until=NOW + 300 + i)
    old_inserts = max(10, inserts // 100)  # each one scans all n entries
    rows.append(
        {
            "state": "shared cache, evict closest to expiry (before)",
            "n": n,
            "us_per_insert": per_insert_us(
                lambda i: old.add("V-flood", f"f{i}", until=NOW + 3e9), old_inserts
            ),
        }
    )

    cache = ReplayCache(max_per_sender=per_sender + inserts, clock=lambda: NOW)
    for i in range(n):
        cache.add(f"V-{i % SENDERS}", f"m{i}", until=NOW + 300 + i)
    rows.append(
        {
            "state": "ReplayCache per sender (vehicle)",
            "n": n,
            "us_per_insert": per_insert_us(
                lambda i: cache.add("V-0", f"f{i}", until=NOW + 300), inserts
            ),
        }
    )

    replay = UplinkReplay(limits=UplinkLimits(ids_per_sender=per_sender + inserts), skew_s=30)
    state = PartitionState()
    for i in range(n):
        replay.admit(state, f"V-{i % SENDERS}", f"m{i}", NOW + 300, NOW)
    state.commit()
    state.due(NOW, replay.deadline)  # builds the deadline index once
    started = time.perf_counter()
    for i in range(inserts):
        replay.admit(state, "V-0", f"f{i}", NOW + 300, NOW)
    state.commit()  # the index takes the new ids on commit: part of their cost
    rows.append(
        {
            "state": "UplinkReplay in partition state (bus stages)",
            "n": n,
            "us_per_insert": (time.perf_counter() - started) / inserts * 1e6,
        }
    )
    started = time.perf_counter()
    nothing_due = replay.expire(state, state.due(NOW + 1, replay.deadline), NOW + 1)
    idle_ms = (time.perf_counter() - started) * 1000
    rows.append({"state": "UplinkReplay tick, nothing due", "n": n, "tick_ms": idle_ms})
    assert nothing_due == 0
    started = time.perf_counter()
    removed = replay.expire(state, state.due(NOW + 400, replay.deadline), NOW + 400)
    all_ms = (time.perf_counter() - started) * 1000
    rows.append({"state": f"UplinkReplay tick, {removed} due", "n": n, "tick_ms": all_ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--inserts", type=int, default=2000)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += measure(n, args.inserts)
    print(f"{'state':<52} {'n':>8} {'µs/insert':>10} {'tick ms':>9}")
    for r in rows:
        us = f"{r['us_per_insert']:.1f}" if "us_per_insert" in r else ""
        tick = f"{r['tick_ms']:.1f}" if "tick_ms" in r else ""
        print(f"{r['state']:<52} {r['n']:>8} {us:>10} {tick:>9}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=1)
        + "\n"
    )


if __name__ == "__main__":
    main()
