"""The long fault soak: the faults of tests/integration/test_faults.py with more commands.

    .venv/bin/python tests/soak/run_soak.py --commands 1000 --vehicles 500 --rounds 1

Starts its own three-broker cluster, KME pair and worker (nothing to set up), runs every fault
``--rounds`` times with ``--commands`` commands each, then a burst, prints a table and writes
``bench/results/soak.json``. Exit code 1 if any command ran twice or was lost silently.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # for tests.support

from tests.support.fault_rig import FaultCounts, FaultRig, peak_rss_mb  # noqa: E402

COLUMNS = (
    "fault", "sent", "executed", "executed_twice", "lost", "failed_qkd_unavailable",
    "store_finished", "answered",
    "status_succeeded", "publish_retries", "drain_s",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=1000, help="commands per fault run")
    parser.add_argument("--vehicles", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=1, help="times every fault is repeated")
    parser.add_argument("--rate", type=float, default=25.0, help="commands/s while streaming")
    parser.add_argument("--burst", type=int, default=3000, help="commands in the burst")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    results: list[FaultCounts] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleetbus-soak-") as tmp:
        rig = FaultRig(Path(tmp), vehicles=args.vehicles)
        try:
            console.print(f"starting 3 brokers, KME, worker, {args.vehicles} vehicles ...")
            rig.start()
            faults = [
                ("broker leader SIGKILL + restart", rig.kill_leader),
                ("worker SIGKILL + restart", rig.kill_worker),
                ("KME SIGKILL + restart", rig.restart_kme),
                ("QKD link cut + restored", rig.cut_qkd_link),
            ]
            for round_no in range(args.rounds):
                for name, fault in faults:
                    label = f"{name} #{round_no + 1}" if args.rounds > 1 else name
                    console.print(f"running: {label} ({args.commands} commands)")
                    counts = rig.run(fault, args.commands, name=label, rate_per_s=args.rate)
                    results.append(counts)
                    console.print(json.dumps(counts.as_dict()))
            console.print(f"running: burst of {args.burst} commands")
            burst = rig.sign_commands(args.burst, edge_every=1_000_000)
            publish_s = rig.burst(burst)
            backlog = rig.backlog()
            drain_s = rig.wait_executed([s.command.id for s in burst], timeout_s=1800)
            counts = rig.count("burst", burst, drain_s=drain_s)
            counts.extra = {
                "burst_publish_per_s": round(args.burst / publish_s, 1),
                "drain_per_s": round(args.burst / drain_s, 1) if drain_s else None,
                "backlog_after_publish": backlog,
                "worker_peak_rss_mb": round(peak_rss_mb(rig.worker.proc.pid), 1),
            }
            results.append(counts)
        finally:
            rig.stop()

    table = Table(title=f"fleetbus fault soak ({args.vehicles} vehicles, 3 brokers)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "fault" else "right")
    for r in results:
        row = r.as_dict()
        table.add_row(*(str(row[c]) for c in COLUMNS))
    console.print(table)
    console.print(f"burst: {results[-1].extra}")
    # Lost = not executed; a 503 qkd_unavailable from the edge unit is visible but still a loss
    # of execution (docs/reliability.md, "Known limits"); only silent losses and repeats fail.
    bad = [
        r.fault
        for r in results
        if r.executed_twice or r.lost_to_vehicles or r.lost != r.failed_qkd_unavailable
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {"python": platform.python_version(), "cpus": _cpus()},
                "params": {k: str(v) for k, v in vars(args).items()},
                "elapsed_s": round(time.monotonic() - started, 1),
                "runs": [r.as_dict() for r in results],
                "ok": not bad,
            },
            indent=2,
        )
        + "\n"
    )
    console.print(f"wrote {args.out}; " + ("OK" if not bad else f"FAILED: {bad}"))
    return 0 if not bad else 1


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    raise SystemExit(main())
