"""What security costs: the command pipeline (authorize → seal → vehicle) against the real Kafka
broker, secure and in plaintext, side by side in one run. Not a test: numbers depend on the
machine and its load (the load average is recorded with every measurement).

    .venv/bin/python bench/bench_pipeline.py --quick            # 1 partition, 3 interleaved rounds
    .venv/bin/python bench/bench_pipeline.py                    # 1, 2 and 4 partitions
    .venv/bin/python bench/bench_pipeline.py --bootstrap 127.0.0.1:9092

Without ``--bootstrap`` the benchmark starts its own ``LocalKafka`` (a KRaft broker in a
temporary folder) and stops it at the end.

Modes, each the same topology — a worker process (or several) running the ``authorize`` and
``seal`` stages in ``processors.eos.TransactionalStage`` (the same runner, transactions, batch
size and Kafka path in every mode) and a ``VehicleAgent`` process answering on
``commands.responses``; the secure modes also run the ``responses`` stage, which verifies each
answer and writes it keyed by command id to ``commands.responses.verified``, where the load
generator sees it (v2 answers are keyed by vehicle id; plaintext has no such hop and is seen on
``commands.responses``):

- ``raw``: aiokafka produce → consume on one topic with the command's record size: the ceiling
  of this client stack (one hop, no transactions).
- ``plaintext``: benchmark-only stage logic (``PlainAuthorize`` / ``PlainSeal``, below) on the
  same topics: strict CBOR decode of the signed command, routing by target vehicle, the
  authorized / outbound / status records. No signature check, no Cedar, no replay state, no
  audit chain, no envelope. The vehicle (``VehicleAgent`` with a ``PlaintextCodec``) decodes the
  command, records it in the same execute-once SQLite store and answers with the plain response.
- ``secure``: the production stages from ``processors.app.build_pipeline`` with key epochs and
  batch signing off: per-message X-Wing KEM and composite ML-DSA-65+Ed25519 signature.
- ``secure-epochs``: the same with ``seal_epochs`` and ``batch_signing`` on (and the vehicles'
  answers on key epochs: ``VehicleAgent(uplink_epochs=...)``).

All modes of a partition count run side by side; ``--rounds`` saturation rounds are interleaved
mode by mode so that the machine's changing load hits every mode alike, and each mode reports
the median of its rounds and their spread (see bench/README.md).

Measured per (mode, partitions): sustained throughput at saturation (a backlog of commands,
completion rate between the 10th and 90th percentile of answers; a round counts as saturated
when the whole backlog was on the broker before that window opened), end-to-end latency
(publish → response record read; scheduled send time, so no coordinated omission) at 25/50/80%
of the plaintext ceiling of the same partition count (open-loop offered load), CPU seconds per
command of the worker + vehicle processes (``/proc/<pid>/stat``) and bytes per command on every
topic. Writes bench/results/pipeline.{json,md} and, with matplotlib (the bench extra), latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline_bench import Bench
from pipeline_measure import (
    MODES,
    RESULTS,
    STAGES,
    TARGET_RATIO,
    VEHICLES,
    ModeRun,
    load_average,
    round_or_none,
    settings_from,
)
from pipeline_report import markdown, plot, print_table

# --- benchmark-only plaintext stage logic (same runner, same topics) -----------------------


def plain_stages(settings: Any) -> list[Any]:
    """authorize + seal without crypto and policy, run by the production TransactionalStage."""
    from fleetbus.bus.commands import CommandState, SignedCommand
    from fleetbus.bus.errors import FleetbusError, ReasonCode
    from fleetbus.processors.app import stage_runner
    from fleetbus.processors.eos import InputRecord, Output, PartitionState, StageResult
    from fleetbus.processors.stages import AuthorizedCommand, PipelineTopics
    from fleetbus.processors.stages import status_output as _status

    topics = PipelineTopics.from_settings(settings.topics)

    class PlainAuthorize:
        name = "authorize"

        def input_topics(self) -> Sequence[str]:
            return [topics.requested, topics.approvals]

        def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
            signed = SignedCommand.decode(record.value or b"", max_size=settings.max_message_bytes)
            command = signed.command
            vehicle = command.target.vehicle
            if vehicle is None:
                raise FleetbusError(
                    "plaintext bench: vehicle targets only", reason=ReasonCode.MALFORMED
                )
            auth = AuthorizedCommand(
                command_id=command.id,
                vehicle_id=vehicle,
                issuer=command.issuer,
                action=command.action,
                criticality="routine",
                issued_at=command.issued_at,
                expires_at=command.expires_at,
                signed_command=record.value or b"",
                decision="plaintext",
                authorized_at=now,
            )
            return StageResult(
                outputs=[
                    Output(topics.authorized, command.id.encode(), auth.encode()),
                    _status(topics, command.id, CommandState.AUTHORIZED, now, vehicle_id=vehicle),
                ]
            )

        def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
            return StageResult()

    class PlainSeal:
        name = "seal"

        def input_topics(self) -> Sequence[str]:
            return [topics.authorized]

        def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
            auth = AuthorizedCommand.decode(record.value)
            return StageResult(
                outputs=[
                    Output(
                        topics.outbound,
                        auth.vehicle_id.encode(),
                        auth.signed_command,
                        headers=(("fleetbus-command-id", auth.command_id.encode()),),
                    ),
                    _status(
                        topics,
                        auth.command_id,
                        CommandState.SEALED,
                        now,
                        detail="plaintext",
                        vehicle_id=auth.vehicle_id,
                    ),
                ]
            )

        def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
            return StageResult()

    return [stage_runner(settings, logic) for logic in (PlainAuthorize(), PlainSeal())]


def run_worker(config: dict[str, Any]) -> None:
    """Subprocess: the authorize and seal stages (secure modes: and the response stage) of one
    worker until SIGTERM."""
    settings = settings_from(config)
    if config["mode"] == "plaintext":
        stages = plain_stages(settings)
    else:
        from fleetbus.processors.app import build_pipeline

        # The response stage too: v2 answers are keyed by vehicle id, and the measured answer
        # is its verified record, keyed by command id (Bench.topics).
        wanted = (*STAGES, "responses")
        stages = [s for s in build_pipeline(settings).stages if s.stage in wanted]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: [loop.create_task(s.stop()) for s in stages])
        await asyncio.gather(*(s.run() for s in stages))

    asyncio.run(main())


def run_vehicle(config: dict[str, Any]) -> None:
    """Subprocess: a VehicleAgent (plaintext: with a PlaintextCodec) for the fleet until
    SIGTERM."""
    import threading

    from fleetbus.bus.directory import load_key_file
    from fleetbus.bus.keyfolder import KeyFolder
    from fleetbus.devtools.fleet import vehicle_id
    from fleetbus.providers.sealing import EpochPolicy
    from fleetbus.sdk import PlaintextCodec, VehicleAgent, load_key_directory

    settings = settings_from(config)
    keys_dir = Path(config["keys_dir"])

    # Plaintext: the same consumer/producer loop and execute-once store; no envelope, no
    # signature (the codec reads bare SignedCommands and writes bare Responses).
    agent = VehicleAgent(
        settings,
        vehicles=[
            load_key_file(KeyFolder(keys_dir).private_key(vehicle_id(n)))
            for n in range(1, VEHICLES + 1)
        ],
        directory=load_key_directory(keys_dir),
        minimum_path="xwing",
        handlers={"ping": lambda command: None},
        store_path=Path(config["store"]),
        group_id=f"{config['app_id']}.vehicles",
        uplink_epochs=EpochPolicy(settings.epoch_max_age_s, settings.epoch_max_messages)
        if settings.seal_epochs
        else None,
        codec=PlaintextCodec() if config["mode"] == "plaintext" else None,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        agent.run(stop, poll_s=0.2)
    finally:
        agent.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 partition, short runs")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting a LocalKafka")
    parser.add_argument("--partitions", type=int, nargs="*", help="default: 1 2 4 (quick: 1)")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--rounds",
        type=int,
        help="saturation rounds per mode, interleaved mode by mode (default 3; full run 5)",
    )
    parser.add_argument("--backlog", type=int, help="commands per saturation round")
    parser.add_argument(
        "--wire2",
        action="store_true",
        help="vehicles and the bus sealer announce wire2: v2 commands and v2 answers",
    )
    args = parser.parse_args(argv)
    args.partitions = args.partitions or ([1] if args.quick else [1, 2, 4])
    args.rounds = args.rounds or (3 if args.quick else 5)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.backlog = args.backlog or (2500 if args.quick else 6000)
    args.raw_backlog = 5000 if args.quick else 30000
    args.duration_s = 4.0 if args.quick else 10.0
    args.drain_s = 5.0 if args.quick else 10.0
    if "plaintext" not in args.modes:
        parser.error("the plaintext mode is the reference; keep it in --modes")

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = load_average()
    print(f"load average {load_before} on {os.cpu_count()} CPU(s)", flush=True)
    cluster = None
    with tempfile.TemporaryDirectory(prefix="fleetbus-bench-") as tmp:
        work = Path(tmp)
        bootstrap = args.bootstrap
        if bootstrap is None:
            from fleetbus.devtools.kafka import LocalKafka, find_free_base_port

            cluster = LocalKafka(home=work / "kafka", base_port=find_free_base_port(2), heap_mb=768)
            print("starting LocalKafka ...", flush=True)
            cluster.up()
            bootstrap = cluster.bootstrap
        try:
            broker_pids = (
                [n["pid"] for n in cluster.status()["nodes"] if n["pid"]]  # type: ignore[index]
                if cluster is not None
                else []
            )
            bench = Bench(args, bootstrap, work, broker_pids)
            runs: list[ModeRun] = []
            order = [m for m in ("plaintext", "secure-epochs", "secure", "raw") if m in args.modes]
            for p in args.partitions:
                runs += bench.run_partitions(order, p, min(p, args.max_workers))
        finally:
            if cluster is not None:
                cluster.down()
    all_rows = [run.row() for run in runs]
    failed = [row for row in all_rows if "error" in row]
    rows = [row for row in all_rows if "error" not in row]
    for row in rows:
        plain = next(
            (r for r in rows if r["mode"] == "plaintext" and r["partitions"] == row["partitions"]),
            None,
        )
        mine, ref = row["saturation"]["throughput"], plain and plain["saturation"]["throughput"]
        row["ratio"] = round(mine / ref, 3) if mine and ref else None
        # Paired by round: the two modes measured back to back, under nearly the same load.
        paired = [
            mr["throughput"] / pr["throughput"]
            for mr, pr in zip(row["rounds"], plain["rounds"] if plain else [], strict=False)
            if mr["throughput"] and pr["throughput"]
        ]
        row["ratio_paired"] = {
            "median": round_or_none(statistics.median(paired), 3) if paired else None,
            "min": round_or_none(min(paired), 3) if paired else None,
            "max": round_or_none(max(paired), 3) if paired else None,
        }
        mine_cpu = row["saturation"]["cpu_ms_per_command"]
        ref_cpu = plain and plain["saturation"]["cpu_ms_per_command"]
        row["ratio_cpu"] = round(ref_cpu / mine_cpu, 3) if mine_cpu and ref_cpu else None
    report = {
        "started": started,
        "quick": args.quick,
        "rounds": args.rounds,
        "backlog": args.backlog,
        "kafka": "LocalKafka (started by the benchmark)" if cluster else args.bootstrap,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "load_before": load_before,
        "load_after": load_average(),
        "rows": rows,
        "failed": failed,
        "notes": [
            "ratio: median saturation throughput of the mode over the rounds / the plaintext "
            "median, same partitions and workers; ratio_paired: the same per round (the two "
            "modes measured back to back), median and range; ratio_cpu: plaintext CPU ms per "
            "command / the mode's (medians).",
            f"rounds: {args.rounds} saturation rounds per mode of {args.backlog} commands each, "
            "interleaved (plaintext, secure-epochs, ... then again), every mode's processes "
            "running for the whole partition count; the idle modes' processes only poll.",
            "saturated: the whole backlog was acknowledged by the broker before the 10th "
            "percentile of answers (the measuring window opens), and the window is >= 2 s.",
            "workers: worker processes (authorize + seal) and as many VehicleAgent processes; "
            f"capped at --max-workers={args.max_workers} (CPUs) — more processes than cores "
            "measure contention, not scaling.",
            "CPU ms/command: user+system time of the worker and vehicle processes over the run "
            "divided by answered commands (the broker and the load generator are not included); "
            "machine CPU ms/command: every CPU's busy time over the run (/proc/stat), broker "
            "and load generator included, divided by answered commands.",
            "raw: aiokafka produce → consume on commands.requested with the same records; one "
            "hop, no transactions: the client stack's ceiling.",
            "The broker, the load generator and the processes share the machine's CPUs.",
        ],
    }
    if "secure-epochs" in args.modes and "plaintext" in args.modes:
        import bench_floor

        print("== floor: the primitives of one secure-epochs command, timed alone", flush=True)
        report["floor"] = bench_floor.floor_report(report, target=TARGET_RATIO)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "pipeline.md").write_text(markdown(report))
    written = ["pipeline.md"]
    try:
        plot(report, args.out / "latency.png")
        written.append("latency.png")
    except ModuleNotFoundError as exc:
        print(
            f"latency.png not written: {exc.name} is missing (the bench extra: "
            "pip install -e '.[bench]')",
            flush=True,
        )
    print_table(report)
    if "floor" in report:
        bench_floor.print_report(report["floor"])
    print(f"wrote {args.out / 'pipeline.json'}, {', '.join(written)}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] in ("_worker", "_vehicle"):
        role_config = json.loads(sys.argv[2])
        (run_worker if sys.argv[1] == "_worker" else run_vehicle)(role_config)
        sys.exit(0)
    sys.exit(main())
