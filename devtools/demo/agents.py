"""The simulated fleet process (``python -m fleetbus.devtools.demo fleet SPEC``): vehicle agents
for the PQC vehicles, the legacy vehicles and each edge unit, with a journal of every handler
run so the demo can count executions."""

from __future__ import annotations

import json
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetbus.bus.commands import Command
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.devtools.demo.fleet import FLEET_READY, SEALER


class ExecutionJournal:
    """One line per handler run (command id, vehicle id, action), flushed at once, so the demo
    can count executions per command per vehicle — independently of the agent's own store."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self.current = threading.local()

    def record(self, command: Command) -> None:
        vid = getattr(self.current, "vehicle_id", "?")
        with self._lock:
            self._file.write(f"{command.id} {vid} {command.action}\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    @staticmethod
    def read(path: Path) -> Counter[tuple[str, str]]:
        counts: Counter[tuple[str, str]] = Counter()
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3:
                    counts[(parts[0], parts[1])] += 1
        return counts


def _journaled_handlers(journal: ExecutionJournal) -> dict[str, Any]:
    from fleetbus.devtools.handlers import default_handlers
    from fleetbus.sdk.vehicle import HandlerResult

    def wrap(handler: Callable[[Command], HandlerResult | None]) -> Any:
        def run(command: Command) -> HandlerResult | None:
            journal.record(command)
            return handler(command)

        return run

    handlers: dict[str, Any] = dict(default_handlers())
    handlers["ping"] = lambda command: HandlerResult(200, "pong")
    return {action: wrap(h) for action, h in handlers.items()}


def run_fleet(spec_path: Path) -> int:
    """The simulated fleet: one VehicleAgent for the PQC vehicles, one for the legacy vehicles,
    one per QKD edge unit (each with its own SAE at KME-B). Runs until SIGTERM."""
    from fleetbus.providers.qkd import QKDProvider
    from fleetbus.sdk.vehicle import (
        Handler,
        HandlerResult,
        VehicleAgent,
        VehicleHandler,
        VehicleIdentity,
        load_key_directory,
    )

    def journaled(handler: Handler) -> VehicleHandler:
        """Tells the journal which vehicle a handler runs for (the handler sees the command)."""

        def run(vid: str, command: Command) -> HandlerResult | None:
            journal.current.vehicle_id = vid
            return handler(command)

        return VehicleHandler(run)

    spec = json.loads(spec_path.read_text())
    keys_dir = Path(spec["keys_dir"])
    store_dir = Path(spec["store_dir"])
    settings = FleetbusSettings()
    journal = ExecutionJournal(Path(spec["journal"]))
    handlers = {action: journaled(h) for action, h in _journaled_handlers(journal).items()}

    def agent(name: str, ids: list[str], minimum: str, **extra: Any) -> VehicleAgent:
        return VehicleAgent(
            settings=settings,
            vehicles=[VehicleIdentity.load(keys_dir, v) for v in ids],
            # Its own directory (set 0 and its vehicles), which its own thread updates from the
            # key topic: a revocation reaches the demo's vehicles without a restart.
            directory=load_key_directory(keys_dir, vehicles=ids),
            follow_key_topic=True,
            minimum_path=minimum,
            handlers=handlers,
            store_path=store_dir / f"{name}.sqlite",
            sealer_principal=SEALER,
            **extra,
        )

    agents = [agent("pqc", spec["pqc"], "xwing")]
    if spec["legacy"]:
        agents.append(agent("legacy", spec["legacy"], "x25519", uplink_paths=["x25519"]))
    for eid, qkd in spec["edge"].items():
        agents.append(agent(eid, [eid], "xwing", qkd_provider=QKDProvider(**qkd)))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        for a in agents:
            a.start()
        print(FLEET_READY, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for a in agents:
            a.close()
        journal.close()
        stats = {
            "executed": sum(a.stats.executed for a in agents),
            "answered": sum(a.stats.answered for a in agents),
            "redeliveries": sum(a.stats.duplicates for a in agents),
            "envelope_rejects": sum(a.stats.rejected for a in agents),
            "errors": sum(a.stats.errors for a in agents),
        }
        Path(spec["stats"]).write_text(json.dumps(stats))
    return 0
