"""Cost of one timer tick of the authorize and track stages against the size of their state.

    .venv/bin/python bench/bench_tick.py [--sizes 100000 1000000] [--rounds 5]

Each stage's partition state is filled with ``size`` entries as the stage writes them (authorize:
the replay set — commands remembered until expiry + skew, a share still pending approval, early
approvals; track: command lifecycles, most finished, some still active), deadlines spread over a
24-hour replay window, so that about ``size / 86400`` entries fall due per second. Each round is
one tick a second later than the last: the full scan every tick did before the deadline index
(the stage's ``tick`` on a state whose ``due`` decodes every entry) runs on the state and is
rolled back, then the indexed ``tick`` runs on the same state and is committed; both must
produce the same outputs and the same state changes. Also measured: building the index from the
committed entries (once per assignment: one decode of every entry) and the memory it takes
(RSS growth). Prints a table and writes ``bench/results/tick.json``; see docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

from fleetbus.bus.commands import uuid7_timestamp_ms
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.processors.eos import DeadlineOf, PartitionState, StageResult
from fleetbus.processors.stages import AuthorizeStage, CommandEntry, PipelineTopics, TrackStage

RESULTS = Path(__file__).resolve().parent / "results" / "tick.json"
DAY_S = 86400.0
SKEW_S = 30.0
WINDOW_S = 300.0
RETENTION_S = 300.0
NOW = 1_800_000_000.0
# A signed command's size: kept in state while the command is pending (filler, not a secret).
SIGNED = bytes(random.Random(1).randbytes(900))  # noqa: S311


# --- the tick as it was before the deadline index (commit 17c3d58): a full scan -------------


class FullScan:
    """A partition state whose ``due`` decodes every entry, as each tick did before the deadline
    index: the stage's own ``tick`` run on it is the full-scan tick, with the same work on each
    due entry as the indexed one (so the two stay comparable as the stages change)."""

    def __init__(self, state: PartitionState) -> None:
        self._state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def due(self, now: float, deadline_of: DeadlineOf) -> list[str]:
        keys = []
        for key, value in list(self._state.items()):
            deadline = deadline_of(key, value)
            if deadline is not None and deadline < now:
                keys.append(key)
        return keys


def full_scan_tick(stage: Any, partition: int, state: PartitionState, now: float) -> StageResult:
    result: StageResult = stage.tick(partition, FullScan(state), now)
    return result


# --- state as the stages write it ----------------------------------------------------------


def _cid(rng: random.Random, at: float) -> str:
    """A UUIDv7-shaped command id issued at ``at`` (the track stage reads its timestamp)."""
    ms = int(at * 1000)
    tail = rng.getrandbits(76)
    hexed = f"{ms:012x}7{tail >> 64:03x}{0x8 | (tail >> 62) & 0x3:x}{tail & ((1 << 62) - 1):015x}"
    return f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:32]}"


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def authorize_state(size: int, rng: random.Random) -> dict[str, bytes]:
    """Commands authorized (or refused) over the last day, remembered until expiry + skew;
    1 % still pending approval within a 5-minute window; 1 % early approvals."""
    state: dict[str, bytes] = {}
    for i in range(size):
        until = NOW + rng.uniform(0, DAY_S)
        issued = until - SKEW_S - rng.uniform(60, 3600)
        cid = _cid(rng, issued)
        kind = rng.random()
        if kind < 0.01:
            held = {
                "approver": "dispatch-2",
                "deny": False,
                "value": SIGNED[:200],
                "partition": 0,
                "offset": i,
                "until": _ms(NOW + rng.uniform(0, WINDOW_S)),
            }
            state[f"apr/{cid}"] = cbor2.dumps({"approvals": [held]}, canonical=True)
            continue
        pending = kind < 0.02
        entry = CommandEntry(
            status="pending" if pending else rng.choice(["authorized"] * 9 + ["rejected"]),
            until=until,
            issuer="dispatch-1",
            window_until=NOW + rng.uniform(0, WINDOW_S) if pending else issued + WINDOW_S,
            signed=SIGNED if pending else b"",
            offset=i,
            partition=0,
        )
        state[f"cmd/{cid}"] = entry.encode()
    return state


def track_state(size: int, rng: random.Random) -> dict[str, bytes]:
    """Command lifecycles: 95 % finished (kept for the retention after expiry), 5 % with a
    vehicle still active (expired at expiry + skew)."""
    state: dict[str, bytes] = {}
    for _ in range(size):
        active = rng.random() < 0.05
        expires = NOW + rng.uniform(0, DAY_S) - (0.0 if active else SKEW_S + RETENTION_S)
        issued = expires - rng.uniform(60, 3600)
        cid = _cid(rng, issued)
        vehicle = f"V-{rng.randrange(1, 10_000):04d}"
        last = rng.choice(["sealed", "delivered"]) if active else "succeeded"
        entry = {"issued_at": _ms(issued), "expires_at": _ms(expires), "vehicles": {vehicle: last}}
        state[f"cmd/{cid}"] = cbor2.dumps(entry, canonical=True)
    return state


# --- measurement ---------------------------------------------------------------------------


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


Tick = Callable[[int, PartitionState, float], StageResult]


def _round(
    tick: Tick, state: PartitionState, now: float
) -> tuple[float, StageResult, dict[str, Any]]:
    began = time.perf_counter()
    result = tick(0, state, now)
    elapsed = time.perf_counter() - began
    changes = state.changes()
    state.rollback()  # the indexed tick then starts from the same state
    return elapsed, result, changes


def measure(
    name: str, stage: Any, old: Tick, committed: dict[str, bytes], rounds: int
) -> dict[str, Any]:
    gc.collect()
    rss_before = _rss_mib()
    state = PartitionState(committed)
    began = time.perf_counter()
    state.due(NOW, stage.deadline)  # builds the index, as the first tick after assignment does
    build_s = time.perf_counter() - began
    gc.collect()
    index_mib = _rss_mib() - rss_before
    old_s, new_s, due = [], [], []
    for r in range(rounds):
        now = NOW + 1 + r  # one tick a second, as the runner does
        t_old, out_old, changes_old = _round(lambda p, s, n: old(stage, p, s, n), state, now)
        began = time.perf_counter()
        out_new = stage.tick(0, state, now)
        t_new = time.perf_counter() - began
        changes_new = state.changes()
        # Same work, same result: the index only changes which entries are looked at.
        assert changes_old == changes_new, f"{name}: state changes differ in round {r}"
        assert len(out_old.outputs) == len(out_new.outputs), f"{name}: outputs differ"
        state.commit()  # the next second starts from this tick's result, as in production
        old_s.append(t_old)
        new_s.append(t_new)
        due.append(len(changes_new))
    return {
        "stage": name,
        "entries": len(committed),
        "rounds": rounds,
        "changed_per_tick_median": statistics.median(due),
        "full_scan_ms_median": round(statistics.median(old_s) * 1e3, 3),
        "full_scan_ms_range": [round(min(old_s) * 1e3, 3), round(max(old_s) * 1e3, 3)],
        "index_ms_median": round(statistics.median(new_s) * 1e3, 4),
        "index_ms_range": [round(min(new_s) * 1e3, 4), round(max(new_s) * 1e3, 4)],
        "speedup": round(statistics.median(old_s) / statistics.median(new_s)),
        "index_build_s": round(build_s, 2),
        "index_rss_mib": round(index_mib, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    topics = PipelineTopics.from_settings(FleetbusSettings().topics)
    authorize = AuthorizeStage(
        topics=topics,
        directory=None,
        policy=None,  # type: ignore[arg-type]  # tick decides nothing by policy
        approvals_required=1,
        approval_window_s=WINDOW_S,
        clock_skew_s=SKEW_S,
        max_lifetime_s=DAY_S,
        max_message_bytes=32 * 1024,
    )
    track = TrackStage(
        topics=topics, clock_skew_s=SKEW_S, max_message_bytes=32 * 1024,
        retention_s=RETENTION_S,
    )  # fmt: skip
    assert uuid7_timestamp_ms(_cid(random.Random(0), NOW)) == _ms(NOW)  # noqa: S311
    load_before = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        rng = random.Random(size)  # noqa: S311 - reproducible data, not secrets
        rows.append(
            measure(
                "authorize",
                authorize,
                full_scan_tick,
                authorize_state(size, rng),
                args.rounds,
            )
        )
        rows.append(measure("track", track, full_scan_tick, track_state(size, rng), args.rounds))
    load_after = os.getloadavg()[0]
    header = (
        f"{'stage':<10} {'entries':>9} {'changed':>8} {'full scan ms':>13} {'index ms':>9} "
        f"{'speedup':>8} {'build s':>8} {'index MiB':>10}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['stage']:<10} {row['entries']:>9} {row['changed_per_tick_median']:>8} "
            f"{row['full_scan_ms_median']:>13} {row['index_ms_median']:>9} "
            f"{row['speedup']:>7}x {row['index_build_s']:>8} {row['index_rss_mib']:>10}"
        )
    print(f"median of {args.rounds} rounds; load {load_before:.1f} -> {load_after:.1f}")
    RESULTS.write_text(
        json.dumps(
            {
                "rows": rows,
                "load_average": [round(load_before, 2), round(load_after, 2)],
                "cpus": os.cpu_count(),
                "method": "one tick a second; each round the full scan (rolled back), then the "
                "index (committed) on the same state",
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
