"""Profile the secure command path in one process, without Kafka: the production authorize and
seal stage logic (with their audit chains, as ``TransactionalStage`` runs them) and the
``VehicleAgent``'s open → verify → execute (claimed and recorded per batch, as its poll loop
does) → sealed answer, over the same test fleet as
bench/bench_pipeline.py. Prints the pyinstrument tree and a table of the top costs (own time of
the hottest functions), and writes bench/results/profile_secure.{txt,json}.

    .venv/bin/python bench/profile_secure.py [--commands 400] [--epochs] [--batch 50]

``--epochs`` turns key epochs and batch signing on (the ``secure-epochs`` benchmark mode);
``--batch`` is the number of records handed to a stage at once (``stage_batch_size``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_measure import VEHICLES, settings_from

RESULTS = Path(__file__).parent / "results"


class _Runner:
    """The parts of ``TransactionalStage`` that run per batch, minus Kafka."""

    def __init__(self, stage: Any) -> None:
        from fleetbus.processors.eos import PartitionState

        self.stage = stage
        self.part = type(
            "Part",
            (),
            {"number": 0, "state": PartitionState(), "chain": self._chain(stage)},
        )()

    @staticmethod
    def _chain(stage: Any) -> Any:
        from fleetbus.processors.audit import AuditChain

        return AuditChain(
            f"{stage.stage}-0",
            signer=stage._signer,
            signer_principal=stage._signer_principal,
            checkpoint_every=stage._checkpoint_every,
        )

    def batch(self, records: Sequence[Any]) -> list[Any]:
        result = self.stage._compute(self.part, records)
        outputs = result.outputs + self.stage._audit_outputs(self.part, result.audit)
        outputs += self.stage._changelog(self.part)
        self.part.state.commit()
        return list(outputs)


class _Raw:
    """What aiokafka hands the runner."""

    def __init__(self, topic: str, offset: int, key: bytes | None, value: bytes | None) -> None:
        self.topic, self.partition, self.offset = topic, 0, offset
        self.key, self.value, self.timestamp, self.headers = key, value, 0, ()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commands", type=int, default=400)
    parser.add_argument("--epochs", action="store_true", help="key epochs + batch signing on")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-profile", action="store_true", help="time only (CPU ms/command)")
    args = parser.parse_args(argv)

    from pyinstrument import Profiler

    from fleetbus.bus.commands import Command, SignedCommand, Target
    from fleetbus.devtools.fleet import DISPATCHER, make_test_fleet, vehicle_id
    from fleetbus.processors.app import build_pipeline
    from fleetbus.providers.sealing import EpochPolicy
    from fleetbus.sdk import MemoryTransport, VehicleAgent

    with tempfile.TemporaryDirectory() as tmp:
        fleet = make_test_fleet(Path(tmp), vehicles=VEHICLES)
        mode = "secure-epochs" if args.epochs else "secure"
        config = {
            "bootstrap": "127.0.0.1:1",
            "app_id": "profile",
            "prefix": "p.",
            "partitions": 1,
            "keys_dir": str(fleet.keys_dir),
            "mode": mode,
        }
        settings = settings_from(config)
        stages = {s.stage: s for s in build_pipeline(settings).stages}
        authorize, seal = _Runner(stages["authorize"]), _Runner(stages["seal"])
        transport = MemoryTransport()  # outbound records fed in memory; answers kept there
        agent = VehicleAgent(
            settings,
            vehicles=fleet.vehicles(),
            directory=fleet.directory,
            minimum_path="xwing",
            handlers={"ping": lambda command: None},
            store_path=Path(tmp) / "agent.sqlite",
            uplink_epochs=EpochPolicy() if args.epochs else None,
            transport=transport,
        )
        signer = fleet.signer(DISPATCHER)
        t = settings.topics
        requested, authorized = t.full(t.commands_requested), t.full(t.commands_authorized)
        outbound = t.full(t.commands_outbound)
        commands = []
        for i in range(args.commands):
            command = Command.create(
                issuer=DISPATCHER,
                target=Target(vehicle=vehicle_id(i % VEHICLES + 1)),
                action="ping",
                params={"seq": i, "note": "benchmark"},
                ttl_s=600.0,
            )
            commands.append(
                _Raw(
                    requested,
                    i,
                    command.id.encode(),
                    SignedCommand.sign(command, signer).encode(),
                )
            )

        profiler = Profiler(interval=0.0005)
        started, cpu_started = time.perf_counter(), time.process_time()
        if not args.no_profile:
            profiler.start()
        for lo in range(0, len(commands), args.batch):
            outs = authorize.batch(commands[lo : lo + args.batch])
            auth = [_Raw(authorized, i, o.key, o.value) for i, o in enumerate(outs)]
            auth = [r for r, o in zip(auth, outs, strict=True) if o.topic == authorized]
            outs = seal.batch(auth)
            # The agent's poll loop: open and check the batch's records, then claim, execute,
            # record and answer them together (sdk/execution.py).
            for o in (o for o in outs if o.topic == outbound):
                transport.feed(outbound, o.key, o.value)
            while agent.poll_once(0):
                pass
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        if not args.no_profile:
            profiler.stop()
        agent.close()

    answered = len(transport.sent)
    print(
        f"{mode}, batch {args.batch}: {answered} of {len(commands)} answered; "
        f"{1000 * elapsed / max(1, answered):.2f} ms/command wall, "
        f"{1000 * cpu / max(1, answered):.2f} ms/command CPU"
        + ("" if args.no_profile else " (profiler on)")
    )
    if args.no_profile:
        return 0 if answered == len(commands) else 1
    print(profiler.output_text(unicode=True, color=False, show_all=False))
    session = profiler.last_session
    assert session is not None
    own: dict[str, float] = {}

    def walk(frame: Any) -> None:
        if frame is None:
            return
        real = [c for c in frame.children if not c.is_synthetic]
        if not frame.is_synthetic:
            name = f"{frame.function} ({Path(frame.file_path_short or '').name}:{frame.line_no})"
            own[name] = own.get(name, 0.0) + frame.time - sum(c.time for c in real)
        for child in real:
            walk(child)

    walk(session.root_frame())
    top = sorted(own.items(), key=lambda kv: -kv[1])[:25]
    print("top own time:")
    for name, seconds in top:
        print(f"  {1000 * seconds / max(1, answered):7.3f} ms/command  {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_{mode}.txt").write_text(
        profiler.output_text(unicode=True, color=False, show_all=False)
    )
    (args.out / f"profile_{mode}.json").write_text(
        json.dumps(
            {
                "mode": mode,
                "commands": len(commands),
                "answered": answered,
                "ms_per_command": round(1000 * elapsed / max(1, answered), 3),
                "top_own_ms_per_command": {
                    n: round(1000 * s / max(1, answered), 4) for n, s in top
                },
            },
            indent=2,
        )
        + "\n"
    )
    return 0 if answered == len(commands) else 1


if __name__ == "__main__":
    sys.exit(main())
