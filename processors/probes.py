"""The worker's health endpoints, served next to ``/metrics`` on the metrics port.

- ``/healthz`` (liveness): every running stage loop came round within ``stall_after_s``. A stage
  that cannot reach Kafka is still live (it retries; restarting the pod would not help), only
  not ready.
- ``/readyz`` (readiness): the worker does what it was deployed for. With the command pipeline:
  every stage's consumer is a member of its group and holds a started transactional producer
  for each input partition it was assigned (an assignment may be empty when there are more
  workers than partitions: such a worker is a ready standby). Without a pipeline: only when it
  was switched off on purpose (``pipeline=off``); ``pipeline=auto`` that found no key directory
  is *not ready*, with the reason in the body and in the log, so that a deployment whose key
  Secret is empty never looks healthy.

Both answer 200 or 503 with a JSON body that says why.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from http.server import ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from fleetbus.observability.metrics import set_build_info
from fleetbus.processors.eos import StageHealth

__all__ = ["STALL_AFTER_S", "WorkerProbes", "WorkerStateCollector", "serve_probes"]

#: A stage loop polls at least every 0.5 s; a minute without coming round is a hang (a blocked
#: event loop, a deadlock), not load.
STALL_AFTER_S = 60.0


class HasHealth(Protocol):
    def health(self) -> StageHealth: ...


class WorkerProbes:
    """Liveness and readiness of one worker from its stages' ``health()`` snapshots."""

    def __init__(
        self,
        *,
        stages: Sequence[HasHealth] = (),
        not_ready_reason: str | None = None,
        stall_after_s: float = STALL_AFTER_S,
    ) -> None:
        self.stages = list(stages)
        self.not_ready_reason = not_ready_reason
        self.stall_after_s = stall_after_s

    def live(self) -> tuple[bool, dict[str, Any]]:
        stalled = [
            h.stage
            for h in (s.health() for s in self.stages)
            if h.running and h.since_poll_s > self.stall_after_s
        ]
        return not stalled, {"live": not stalled, "stalled_stages": stalled}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        if self.not_ready_reason is not None:
            return False, {"ready": False, "reason": self.not_ready_reason}
        health = [s.health() for s in self.stages]
        waiting = [h.stage for h in health if not h.ready]
        body: dict[str, Any] = {
            "ready": not waiting,
            "stages": [asdict(h) for h in health],
        }
        if waiting:
            body["reason"] = "stages not assigned or producers not up: " + ", ".join(waiting)
        return not waiting, body


class WorkerStateCollector(Collector):
    """Readiness as metrics, computed at scrape time, so that alerts see what the probes see:
    ``fleetbus_worker_ready`` (0/1) and ``fleetbus_stage_assigned_partitions{stage}``."""

    def __init__(self, probes: WorkerProbes) -> None:
        self.probes = probes

    def collect(self) -> Any:
        ready = GaugeMetricFamily(
            "fleetbus_worker_ready",
            "1 when this worker's /readyz answers 200 (every stage in its group with its "
            "producers up), else 0.",
        )
        ready.add_metric([], 1.0 if self.probes.ready()[0] else 0.0)
        yield ready
        assigned = GaugeMetricFamily(
            "fleetbus_stage_assigned_partitions",
            "Input partitions of each stage assigned to this worker (sum over workers: a stage "
            "with none anywhere processes nothing).",
            labels=["stage"],
        )
        for stage in self.probes.stages:
            health = stage.health()
            assigned.add_metric([health.stage], float(len(health.assigned)))
        yield assigned


def _handler(probes: WorkerProbes) -> type[MetricsHandler]:
    routes: dict[str, Callable[[], tuple[bool, dict[str, Any]]]] = {
        "/healthz": probes.live,
        "/readyz": probes.ready,
    }

    class Handler(MetricsHandler):
        registry = REGISTRY

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            check = routes.get(path)
            if check is None:
                if path == "/metrics":
                    super().do_GET()
                else:
                    self.send_error(404)
                return
            ok, body = check()
            data = json.dumps(body).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the log

    return Handler


def serve_probes(probes: WorkerProbes, port: int, addr: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on a daemon thread; returns the server
    (``server.server_address`` has the port when ``port`` was 0)."""
    set_build_info()
    REGISTRY.register(WorkerStateCollector(probes))
    server = ThreadingHTTPServer((addr, port), _handler(probes))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fleetbus-probes", daemon=True).start()
    return server
