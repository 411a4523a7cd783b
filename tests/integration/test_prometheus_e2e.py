"""A real Prometheus scrapes a running fleetbus deployment; every dashboard query and every alert
rule is evaluated against what it scraped.

The deployment, all real and on loopback, set up once for this module:
- Apache Kafka (the session's ``kafka`` broker) and ``fleetbus kme serve`` (``kme_pair``: two
  ETSI 014 KMEs joined by a simulated QKD link; Prometheus scrapes its admin ``/metrics``);
- ``python -m fleetbus.cli.main worker`` (authorize, seal, track, telemetry) with
  ``FLEETBUS_METRICS_PORT`` and the KME pair's master SAE as its QKD provider;
- a ``VehicleAgent`` in this process for two PQC vehicles and an edge unit behind KME-B (its
  ``qkd_sae_id`` is the pair's slave SAE, so the worker's ``standard`` and ``enclave``
  profiles use ``qkd-etsi014+xwing`` for it); this process's registry is served as a third
  target, for the vehicle-side series (``role="vehicle"`` envelope rejects).

Traffic comes from ``CommandPublisher``: routine commands that succeed, an approved enclave
command over QKD, a high-criticality command left pending, an intruder, an expired command,
junk bytes and a tampered envelope injected on ``commands.outbound``. Then the QKD link goes
down (KME admin switch): a routine command to the edge unit fails over to ``xwing`` and two
approved enclave commands are rejected with ``key_path_exhausted``.

Bounded: one worker and one Prometheus for the module; about a minute (< 150 s) in all.

Over 500 lines because one deployment, set up once for the module, is scraped for every
dashboard query and alert rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import REGISTRY

from fleetbus.bus.commands import Command, CommandState, SignedCommand, StatusEvent, Target
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.devtools.kafka import free_port
from fleetbus.devtools.process import WorkerProcess
from fleetbus.sdk.dispatch import CommandHandle, CommandPublisher
from fleetbus.sdk.vehicle import HandlerResult, VehicleAgent
from tests.support.pipeline import (
    APPROVER,
    DAY_S,
    DISPATCHER,
    INTRUDER,
    TestFleet,
    make_test_fleet,
    qkd_worker_env,
    worker_env,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "observability" / "grafana" / "fleetbus.json"
RULES = ROOT / "observability" / "prometheus" / "rules.yml"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
EDGE = "E-0001"
QKD_PATH = "qkd-etsi014+xwing"
FINAL = [CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED, CommandState.EXPIRED]
#: The first command also waits for the worker to start (faust, one producer per partition).
FIRST_COMMAND_TIMEOUT_S = 90.0
COMMAND_TIMEOUT_S = 30.0
#: Dashboard variables as Grafana would substitute them with "All" selected.
DASHBOARD_VARIABLES = {
    "$__rate_interval": "20s",
    "$__interval": "5s",
    "$__range": "5m",
    "$namespace": ".*",
    "$job": ".*",
    "$instance": ".*",
    "$kme_job": ".*",
}
VEHICLE_REJECTS = "fleetbus_envelope_rejects_total"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: run ./scripts/install-tools.sh (Debian package prometheus)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with variables substituted) for every target of the dashboard."""
    doc = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(DASHBOARD_VARIABLES, key=len, reverse=True):
                expr = expr.replace(name, DASHBOARD_VARIABLES[name])
            assert "$" not in expr, f"unsubstituted variable in {panel['title']}: {expr}"
            out.append((panel["title"], expr))
    return out


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    data = http_json(prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def wait_for(what: str, check: Callable[[], tuple[bool, Any]], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        ok, last = check()
        if ok:
            return last
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}: {last}")


# --- the deployment ------------------------------------------------------------------------


class Prometheus:
    """``prometheus`` on a free loopback port with its own TSDB, scraping ``targets`` every
    second and evaluating ``rules.yml`` every second."""

    def __init__(self, binary: str, targets: dict[str, str], workdir: Path) -> None:
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()
            ],
        }
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start:\n{self.log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


@dataclass
class Deployment:
    """What the module's tests look at: Prometheus, and what the traffic did."""

    prometheus: str
    worker: WorkerProcess
    #: ``fleetbus_envelope_rejects_total{role="vehicle"}`` of this process before the tamper
    #: (other tests in this pytest process may have counted some already), by reason.
    vehicle_rejects_before: dict[str, float]
    outcomes: dict[str, StatusEvent] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    #: job -> the /metrics URL Prometheus scrapes
    scrape_urls: dict[str, str] = field(default_factory=dict)


def vehicle_rejects() -> dict[str, float]:
    """This process's vehicle-side envelope rejects by reason (from the default registry)."""
    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == VEHICLE_REJECTS and sample.labels.get("role") == "vehicle":
                out[sample.labels["reason"]] = sample.value
    return out


class Traffic:
    """The dispatchers and the waits of the scenario."""

    def __init__(self, settings: FleetbusSettings, fleet: TestFleet, worker: WorkerProcess):
        self.settings = settings
        self.worker = worker
        self.dispatch = CommandPublisher(
            settings, principal_id=DISPATCHER, private_key_file=fleet.key_file_path(DISPATCHER)
        )
        self.approver = CommandPublisher(
            settings, principal_id=APPROVER, private_key_file=fleet.key_file_path(APPROVER)
        )
        self.intruder = CommandPublisher(
            settings, principal_id=INTRUDER, signer=fleet.signer(INTRUDER)
        )

    def close(self) -> None:
        for publisher in (self.dispatch, self.approver, self.intruder):
            publisher.close()

    def final(self, handle: CommandHandle, timeout_s: float = COMMAND_TIMEOUT_S) -> StatusEvent:
        try:
            return handle.wait(timeout_s, until=FINAL)
        except Exception as exc:
            pytest.fail(
                f"{handle.command.action} to {handle.command.target}: no final status ({exc}); "
                f"events {handle.events}; worker log:\n{self.worker.output()[-3000:]}"
            )

    def approved(self, target: str, action: str = "unlock_doors") -> CommandHandle:
        handle = self.dispatch.send(Target(vehicle=target), action)
        self.approver.approve(handle.signed)
        return handle

    def expired(self, target: str) -> CommandHandle:
        old = Command.create(
            issuer=DISPATCHER,
            target=Target(vehicle=target),
            action="ping",
            ttl_s=30,
            now=time.time() - 3600,
        )
        return self.dispatch.publish(SignedCommand.sign(old, self.dispatch.signer))

    def produce(self, topic_name: str, key: bytes, value: bytes) -> None:
        producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap)
        try:
            producer.send(self.settings.topics.full(topic_name), key=key, value=value).get(10)
        finally:
            producer.close()

    def outbound_envelope(self, command_id: str) -> tuple[bytes, bytes]:
        """(key, value) of the envelope the worker sealed for ``command_id``."""
        consumer = KafkaConsumer(
            self.settings.topics.full(self.settings.topics.commands_outbound),
            bootstrap_servers=self.settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",
            consumer_timeout_ms=3000,
        )
        try:
            for record in consumer:
                if dict(record.headers).get("fleetbus-command-id") == command_id.encode():
                    return record.key, record.value
        finally:
            consumer.close()
        pytest.fail(f"no outbound envelope for {command_id}")


def play(traffic: Traffic, fleet: TestFleet, kme_pair: Any, prom: str) -> dict[str, StatusEvent]:
    """The scenario (see the module docstring); returns the final status of each case."""
    pqc, other = fleet.vehicle_ids[0], fleet.vehicle_ids[1]
    send = traffic.dispatch.send
    out: dict[str, StatusEvent] = {}

    # QKD link up. The first command also waits for the worker to come up.
    out["routine"] = traffic.final(send(Target(vehicle=pqc), "ping"), FIRST_COMMAND_TIMEOUT_S)
    routine_id = out["routine"].command_id
    edge_ping = send(Target(vehicle=EDGE), "ping")
    enclave = traffic.approved(EDGE)
    # Left waiting for a second person: a "pending" policy decision.
    traffic.dispatch.send(Target(vehicle=other), "unlock_doors")
    intruder = traffic.intruder.send(Target(vehicle=pqc), "ping")
    expired = traffic.expired(pqc)
    traffic.produce(traffic.settings.topics.commands_requested, b"junk", b"\xff\x00 not a command")
    for name, handle in [
        ("edge routine, link up", edge_ping),
        ("enclave, link up", enclave),
        ("intruder", intruder),
        ("expired", expired),
    ]:
        out[name] = traffic.final(handle)
    # An attacker on the vehicle topic: one flipped byte in a real envelope's signature block.
    key, envelope = traffic.outbound_envelope(routine_id)
    tampered = envelope[:-20] + bytes([envelope[-20] ^ 1]) + envelope[-19:]
    traffic.produce(traffic.settings.topics.commands_outbound, key, tampered)

    # QKD link down: no QKD-keyed envelope is in flight any more (all answered above).
    kme_pair.admin("POST", "/admin/link", {"up": False})
    edge_failover = send(Target(vehicle=EDGE), "ping")
    out["edge routine, link down"] = traffic.final(edge_failover)
    out["enclave, link down"] = traffic.final(traffic.approved(EDGE))
    # A second exhaustion once Prometheus has scraped the first: increase() sees the step.
    wait_for(
        "the first key_path_exhausted scraped",
        lambda: (bool(q := query(prom, 'fleetbus_keypath_failover_total{to_path="none"}')), q),
        20,
    )
    time.sleep(1.5)
    out["enclave again, link down"] = traffic.final(traffic.approved(EDGE))
    out["routine, link down"] = traffic.final(send(Target(vehicle=pqc), "ping"))
    return out


@pytest.fixture(scope="module")
def deployment(
    kafka: Any, kme_pair: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    binary = require_tool("prometheus")
    started = time.monotonic()
    workdir = tmp_path_factory.mktemp("prometheus-e2e")
    kme_pair.reset()
    fleet = make_test_fleet(workdir, vehicles=2)
    # Expires in 3 days: FleetbusKeysExpiringSoon (7 days) must pick it up.
    fleet.add_edge_unit(EDGE, qkd_sae_id=kme_pair.slave_sae, not_after=time.time() + 3 * DAY_S)
    settings = fleet.settings_for(kafka.bootstrap)
    worker_port, vehicle_port = free_port(), free_port()
    env = worker_env(
        settings,
        workdir,
        FLEETBUS_METRICS_PORT=str(worker_port),
        FLEETBUS_APPROVAL_WINDOW_S="60",
        **qkd_worker_env(kme_pair),
    )
    targets = {
        "kme": urllib.parse.urlsplit(kme_pair.admin_url).netloc,
        "fleetbus-worker": f"127.0.0.1:{worker_port}",
        "fleetbus-vehicle": f"127.0.0.1:{vehicle_port}",
    }
    prometheus = Prometheus(binary, targets, workdir)
    worker = WorkerProcess(env, workdir / "worker.log")
    agent: VehicleAgent | None = None
    traffic: Traffic | None = None
    try:
        prometheus.wait_ready()
        agent = VehicleAgent(
            settings,
            vehicles=fleet.vehicles([*fleet.vehicle_ids, EDGE]),
            directory=fleet.directory,
            minimum_path="xwing",
            handlers={a: lambda c: HandlerResult(200, "ok") for a in ("ping", "unlock_doors")},
            store_path=workdir / "agent.sqlite",
            qkd_provider=kme_pair.provider("b"),
            # The agent's own endpoint: vehicle-side rejects become scrapeable.
            metrics_port=vehicle_port,
        ).start()
        traffic = Traffic(settings, fleet, worker)
        before = vehicle_rejects()
        outcomes = play(traffic, fleet, kme_pair, prometheus.url)
        urls = {job: f"http://{target}/metrics" for job, target in targets.items()}
        yield Deployment(prometheus.url, worker, before, outcomes, started, urls)
        assert worker.running(), worker.output()[-3000:]
    finally:
        if traffic is not None:
            traffic.close()
        if agent is not None:
            agent.close()
        worker.stop()
        prometheus.stop()
        kme_pair.reset()
        print(f"prometheus e2e module: {time.monotonic() - started:.1f} s")


# --- the tests -----------------------------------------------------------------------------


def test_scenario_outcomes_are_the_expected_ones(deployment: Deployment) -> None:
    """The traffic did what the metrics below claim (otherwise they would prove little)."""
    outcomes = {name: (str(e.state), e.reason.value if e.reason else None)
                for name, e in deployment.outcomes.items()}  # fmt: skip
    assert outcomes == {
        "routine": ("succeeded", None),
        "edge routine, link up": ("succeeded", None),
        "enclave, link up": ("succeeded", None),
        "intruder": ("rejected", "unknown_signer"),
        "expired": ("rejected", "expired"),
        "edge routine, link down": ("succeeded", None),
        "enclave, link down": ("rejected", "key_path_exhausted"),
        "enclave again, link down": ("rejected", "key_path_exhausted"),
        "routine, link down": ("succeeded", None),
    }


def test_prometheus_scrapes_and_every_dashboard_query_has_data(deployment: Deployment) -> None:
    prom = deployment.prometheus

    def targets_up() -> tuple[bool, Any]:
        active = http_json(prom + "/api/v1/targets")["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in active}
        return health == dict.fromkeys(["kme", "fleetbus-worker", "fleetbus-vehicle"], "up"), health

    wait_for("every target up", targets_up, 20)
    queries = dashboard_queries()
    assert len(queries) >= 20

    def all_have_data() -> tuple[bool, Any]:
        empty = [(title, expr) for title, expr in queries if not query(prom, expr)]
        return not empty, empty

    wait_for("data for every dashboard query", all_have_data, 30)

    # Values that must reflect what happened, not just exist.
    assert query(prom, "fleetbus_qkd_link_up == 0"), "link-down not scraped from the KME"
    failovers = query(
        prom, 'sum by (from_path, to_path) (fleetbus_keypath_failover_total{profile="standard"})'
    )
    assert {(r["metric"]["from_path"], r["metric"]["to_path"]) for r in failovers} == {
        (QKD_PATH, "xwing")
    }
    worker = '{job="fleetbus-worker"'
    assert query(prom, f'fleetbus_keypath_selected_total{worker},path="{QKD_PATH}"}} > 0')
    assert query(prom, f'fleetbus_keypath_selected_total{worker},profile="enclave"}} > 0')
    assert query(prom, f'fleetbus_keypath_selected_total{worker},path="xwing"}} > 0')
    exhausted_query = f'fleetbus_dlq_records_total{worker},reason="key_path_exhausted"}}'

    def both_exhausted_scraped() -> tuple[bool, Any]:
        # The second one may land just after the last scrape: wait for the next.
        values = [float(r["value"][1]) for r in query(prom, exhausted_query)]
        return values == [2.0], values

    wait_for("both key_path_exhausted records scraped", both_exhausted_scraped, 30)
    for reason in ("unknown_signer", "expired", "malformed"):
        assert query(prom, f'fleetbus_dlq_records_total{worker},reason="{reason}"}} > 0'), reason
    assert query(prom, f'fleetbus_policy_decisions_total{worker},outcome="pending"}} > 0')
    # The worker's own health probe: QKD down, the KME's pool as the bus last saw it.
    assert query(prom, f'fleetbus_provider_up{worker},provider="qkd-etsi014"}} == 0')
    assert query(prom, f'fleetbus_provider_up{worker},provider="xwing"}} == 1')
    assert query(prom, f"fleetbus_qkd_stored_keys{worker}}} > 0")
    assert query(prom, f'fleetbus_key_expiry_seconds{worker},kind="edge"}} < 7 * 86400')
    # Vehicle side: the tampered envelope, counted by the VehicleAgent in this process.
    scraped = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in query(prom, f'{VEHICLE_REJECTS}{{job="fleetbus-vehicle",role="vehicle"}}')
    }
    grown = {
        reason
        for reason, value in scraped.items()
        if value > deployment.vehicle_rejects_before.get(reason, 0.0)
    }
    assert grown == {"bad_signature"}, (scraped, deployment.vehicle_rejects_before)


def test_alert_rules_load_and_evaluate_against_scraped_data(deployment: Deployment) -> None:
    prom = deployment.prometheus

    def rules_evaluated() -> tuple[bool, Any]:
        groups = http_json(prom + "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        return bool(rules) and not bad, bad or len(rules)

    count = wait_for("every rule evaluated without error", rules_evaluated, 20)
    doc = yaml.safe_load(RULES.read_text())
    assert count == sum(len(g["rules"]) for g in doc["groups"])
    # The SLO recording rules compute a ratio from the worker's latency histogram.
    assert query(prom, "fleetbus:command_latency_slo_errors:ratio_rate5m")

    def alerts_active() -> tuple[bool, Any]:
        alerts = http_json(prom + "/api/v1/alerts")["data"]["alerts"]
        states = {a["labels"]["alertname"]: a["state"] for a in alerts}
        wanted = {
            "FleetbusQKDLinkDown",
            "FleetbusKeyPathExhausted",
            "FleetbusProviderDown",
            "FleetbusKeysExpiringSoon",
        }
        return wanted <= set(states), states

    states = wait_for("alerts for the link that went down", alerts_active, 30)
    assert states["FleetbusKeyPathExhausted"] == "firing"  # no `for:`
    assert states["FleetbusQKDLinkDown"] in {"pending", "firing"}
    assert states["FleetbusProviderDown"] in {"pending", "firing"}
    assert "FleetbusKeyExpired" not in states
    assert "FleetbusQKDQBERAboveThreshold" not in states
    runtime = time.monotonic() - deployment.started
    print(f"prometheus e2e: scenario and checks after {runtime:.1f} s")


def test_promtool_check_metrics_passes_on_every_live_scrape(deployment: Deployment) -> None:
    """Names, units and help of what each process really exports (worker, KME, vehicle agent),
    not of a list kept beside the code."""
    promtool = require_tool("promtool")
    assert set(deployment.scrape_urls) == {"kme", "fleetbus-worker", "fleetbus-vehicle"}
    for job, url in deployment.scrape_urls.items():
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read()
        assert b"fleetbus_" in text, job
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60
        )
        assert result.returncode == 0, (job, result.stdout + result.stderr)
    worker = urllib.request.urlopen(deployment.scrape_urls["fleetbus-worker"], timeout=10)
    assert re.search(
        rb'^fleetbus_build_info\{version="[^"]+"(,\w+="[^"]*")*\} 1', worker.read(), re.MULTILINE
    )


def test_dashboard_variables_cover_every_placeholder() -> None:
    """Unit-level guard, runs without Prometheus: every $var in a query is one we substitute."""
    doc = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            used |= set(re.findall(r"\$\{?\w+", target["expr"]))
    assert used <= set(DASHBOARD_VARIABLES)
