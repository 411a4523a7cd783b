"""A real Prometheus scrapes a real KME and a real fleetbus process; every dashboard query and
every alert rule is evaluated against what it scraped.

Targets:
- ``fleetbus kme serve`` (the session ``kme_pair`` fixture): its admin ``/metrics``.
- The *metrics exerciser* at the bottom of this file, started as its own process. The command
  pipeline's worker does not serve ``/metrics`` yet (``FleetbusSettings`` has no metrics port),
  so the exerciser runs the real code paths the worker will run and records the metrics the
  worker will record, then serves them with ``prometheus_client``: it seals envelopes with
  ``EnvelopeSealer`` through ``ProfileSealer`` over a ``qkd-etsi014+xwing`` path against the
  real KME (which the test switches off, so the sealer fails over to ``xwing`` and an
  ``enclave`` profile without fallback is exhausted), opens them with ``EnvelopeOpener``
  (plus tampered copies that are rejected), decides with a Cedar policy, produces every
  envelope to a real Kafka topic with W3C trace headers and consumes half of them to measure
  consumer lag. Swap it for ``python -m fleetbus.bus.cli worker`` once the worker serves
  ``/metrics``.

Bounded: the exerciser exits on its own after EXERCISER_LIFETIME_S; the test takes < 90 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "observability" / "grafana" / "fleetbus.json"
RULES = ROOT / "observability" / "prometheus" / "rules.yml"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
EXERCISER_LIFETIME_S = 120.0
DEADLINE_S = 60.0
#: Dashboard variables as Grafana would substitute them with "All" selected.
DASHBOARD_VARIABLES = {
    "$__rate_interval": "20s",
    "$__interval": "5s",
    "$__range": "5m",
    "$job": ".*",
    "$kme_job": ".*",
}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: run ./scripts/install-tools.sh (Debian package prometheus)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, data: bytes | None = None) -> Any:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=5) as resp:
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


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture
def exerciser(
    kme_pair: Any, kafka_bootstrap: str, make_topics: Any, tmp_path: Path
) -> Iterator[int]:
    (topic,) = make_topics("e2e.outbound")
    port = free_port()
    pki = kme_pair.pki
    config = {
        "port": port,
        "lifetime_s": EXERCISER_LIFETIME_S,
        "kafka_bootstrap": kafka_bootstrap,
        "topic": topic,
        "kme_a_url": kme_pair.kme_a_url,
        "kme_b_url": kme_pair.kme_b_url,
        "ca_file": str(pki.ca_cert),
        "master_sae": kme_pair.master_sae,
        "master_cert": str(pki.saes[kme_pair.master_sae].cert),
        "master_key": str(pki.saes[kme_pair.master_sae].key),
        "slave_sae": kme_pair.slave_sae,
        "slave_cert": str(pki.saes[kme_pair.slave_sae].cert),
        "slave_key": str(pki.saes[kme_pair.slave_sae].key),
    }
    log = (tmp_path / "exerciser.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, __file__, "exercise", json.dumps(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    log.close()
    kme_pair.reset()
    try:
        yield port
    finally:
        stop(proc)
        kme_pair.reset()
        print((tmp_path / "exerciser.log").read_text()[-3000:])


@pytest.fixture
def prometheus(kme_pair: Any, exerciser: int, tmp_path: Path) -> Iterator[str]:
    binary = require_tool("prometheus")
    port = free_port()
    admin = urllib.parse.urlsplit(kme_pair.admin_url)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "kme", "static_configs": [{"targets": [admin.netloc]}]},
            {
                "job_name": "fleetbus-worker",
                "static_configs": [{"targets": [f"127.0.0.1:{exerciser}"]}],
            },
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"prometheus did not start:\n{(tmp_path / 'prometheus.log').read_text()}"
                )
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    data = http_json(prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def wait_for(what: str, check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        ok, last = check()
        if ok:
            return last
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}: {last}")


def test_prometheus_scrapes_and_every_dashboard_query_has_data(
    prometheus: str, kme_pair: Any
) -> None:
    start = time.monotonic()

    def targets_up() -> tuple[bool, Any]:
        active = http_json(prometheus + "/api/v1/targets")["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in active}
        return health == {"kme": "up", "fleetbus-worker": "up"}, health

    wait_for("both targets up", targets_up, 40)
    # A few healthy rounds on the QKD path, then the link goes down: failovers from now on.
    wait_for(
        "QKD path used",
        lambda: (
            bool(
                q := query(prometheus, 'fleetbus_keypath_selected_total{path="qkd-etsi014+xwing"}')
            ),
            q,
        ),
        20,
    )
    kme_pair.admin("POST", "/admin/link", {"up": False})

    queries = dashboard_queries()
    assert len(queries) >= 20

    def all_have_data() -> tuple[bool, Any]:
        empty = [(title, expr) for title, expr in queries if not query(prometheus, expr)]
        return not empty, empty

    remaining = DEADLINE_S - (time.monotonic() - start)
    wait_for("data for every dashboard query", all_have_data, max(remaining, 10))

    # Values that must reflect what happened, not just exist.
    assert query(prometheus, "fleetbus_qkd_link_up == 0"), "link-down not scraped from the KME"
    failovers = query(
        prometheus,
        'sum by (from_path, to_path) (fleetbus_keypath_failover_total{profile="standard"})',
    )
    assert {(r["metric"]["from_path"], r["metric"]["to_path"]) for r in failovers} == {
        ("qkd-etsi014+xwing", "xwing")
    }
    assert query(prometheus, 'fleetbus_keypath_selected_total{profile="standard",path="xwing"} > 0')
    rejects = query(prometheus, 'fleetbus_envelope_rejects_total{role="vehicle"} > 0')
    # A flipped byte in the signature block; every copy is rejected, never opened.
    assert {r["metric"]["reason"] for r in rejects} == {"bad_signature"}
    assert query(prometheus, 'fleetbus_dlq_records_total{reason="key_path_exhausted"} > 0')
    assert query(prometheus, "fleetbus_consumer_lag_records > 0")


def test_alert_rules_load_and_evaluate_against_scraped_data(prometheus: str, kme_pair: Any) -> None:
    def rules_evaluated() -> tuple[bool, Any]:
        groups = http_json(prometheus + "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        return bool(rules) and not bad, bad or len(rules)

    count = wait_for("every rule evaluated without error", rules_evaluated, 40)
    doc = yaml.safe_load(RULES.read_text())
    assert count == sum(len(g["rules"]) for g in doc["groups"])

    wait_for(
        "QKD path used",
        lambda: (
            bool(
                q := query(prometheus, 'fleetbus_keypath_selected_total{path="qkd-etsi014+xwing"}')
            ),
            q,
        ),
        30,
    )
    kme_pair.admin("POST", "/admin/link", {"up": False})

    def alerts_active() -> tuple[bool, Any]:
        alerts = http_json(prometheus + "/api/v1/alerts")["data"]["alerts"]
        states = {a["labels"]["alertname"]: a["state"] for a in alerts}
        wanted = {"FleetbusQKDLinkDown", "FleetbusKeyPathExhausted", "FleetbusProviderDown"}
        return wanted <= set(states), states

    states = wait_for("alerts for the link that went down", alerts_active, 40)
    assert states["FleetbusKeyPathExhausted"] == "firing"  # no `for:`
    assert states["FleetbusQKDLinkDown"] in {"pending", "firing"}
    assert "FleetbusKeysExpiringSoon" in states  # the sealer key expires in 3 days
    assert "FleetbusCommandLatencySLOBurnFast" not in states


def test_dashboard_variables_cover_every_placeholder() -> None:
    """Unit-level guard, runs without Prometheus: every $var in a query is one we substitute."""
    doc = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            used |= set(re.findall(r"\$\{?\w+", target["expr"]))
    assert used <= set(DASHBOARD_VARIABLES)


# ============================================================================================
# The metrics exerciser (runs as `python test_prometheus_e2e.py exercise '<json>'`)


def _exercise(config: dict[str, Any]) -> None:
    import cedarpy
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from fleetbus.bus.errors import FleetbusError, ReasonCode
    from fleetbus.bus.keys import (
        KeyPath,
        KeyProvider,
        PrivateKeySet,
        RecipientKeys,
        SecurityProfile,
        Verifier,
    )
    from fleetbus.observability import metrics as m
    from fleetbus.observability.tracing import get_tracer, inject_headers, setup_tracing
    from fleetbus.providers.hpke import MLKEM768Provider, X25519Provider, XWingProvider
    from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
    from fleetbus.providers.qkd import QKDProvider
    from fleetbus.providers.sealing import EnvelopeOpener, EnvelopeSealer
    from fleetbus.providers.signers import Ed25519Suite

    deadline = time.monotonic() + float(config["lifetime_s"])
    running = True

    def on_term(*_: Any) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, on_term)
    tracer = get_tracer(setup_tracing("fleetbus-exerciser", environ={}))

    def qkd(side: str) -> QKDProvider:
        kwargs: dict[str, Any] = {
            "kme_url": config["kme_a_url"] if side == "a" else config["kme_b_url"],
            "sae_id": config["master_sae"] if side == "a" else config["slave_sae"],
            "ca_file": config["ca_file"],
            "cert_file": config["master_cert"] if side == "a" else config["slave_cert"],
            "key_file": config["master_key"] if side == "a" else config["slave_key"],
            "timeout_s": 1.0,
        }
        if side == "b":
            kwargs["master_sae_id"] = config["master_sae"]
        return QKDProvider(**kwargs)

    hpke: dict[str, KeyProvider] = {
        "x25519": X25519Provider(),
        "mlkem768": MLKEM768Provider(),
        "xwing": XWingProvider(),
    }
    qkd_sender = qkd("a")
    sender_runner = KeyPathRunner({**hpke, "qkd-etsi014": qkd_sender})
    vehicle_runner = KeyPathRunner({**hpke, "qkd-etsi014": qkd("b")})
    private: dict[str, bytes] = {}
    public: dict[str, bytes] = {}
    ids: dict[str, str] = {}
    for name, provider in hpke.items():
        private[name], public[name] = provider.generate_keypair()
        ids[name] = f"V-17/{name}/1"
    slave = config["slave_sae"]
    own = PrivateKeySet("V-17", private, ids, qkd_sae_id=slave)
    recipient = RecipientKeys(
        "V-17", public, ids, qkd_sae_id=slave, capabilities=frozenset({"pqc"})
    )

    suite = Ed25519Suite()
    sig_private, sig_public = suite.generate()
    signer = suite.signer(sig_private, "bus-sealer-1/sig/1")
    now = time.time()
    validity = {"bus-sealer-1": now + 3 * 86400}

    class Directory:
        def verifier_for(self, principal_id: str, key_id: str, *, at: float) -> Verifier:
            if (principal_id, key_id) != ("bus-sealer-1", signer.key_id):
                raise FleetbusError("unknown signer", reason=ReasonCode.UNKNOWN_SIGNER)
            return suite.verifier(sig_public)

    profile_sealer = ProfileSealer(
        sender_runner,
        listeners=[m.record_failover],
        provider_timeout_s=2.0,
        retries=0,
        reset_timeout_s=5.0,
    )
    sealer = EnvelopeSealer("bus-sealer-1", signer, profile_sealer)
    qkd_xwing, xwing = KeyPath.parse("qkd-etsi014+xwing"), KeyPath.parse("xwing")
    standard = SecurityProfile("standard", [qkd_xwing, xwing], suite.name, True, xwing)
    enclave = SecurityProfile("enclave", [qkd_xwing], suite.name, False, qkd_xwing)
    opener = EnvelopeOpener(own, Directory(), vehicle_runner, xwing)

    # Parsed once and reused, as the authorize stage will (re-parsing per call is slow).
    policies = cedarpy.PolicySet.from_str(
        'permit(principal == User::"dispatch-1", action == Action::"doors.unlock", resource);'
    )
    entities = cedarpy.Entities.from_json_str("[]")

    producer = KafkaProducer(bootstrap_servers=config["kafka_bootstrap"], acks="all")
    tp = TopicPartition(config["topic"], 0)
    consumer = KafkaConsumer(
        bootstrap_servers=config["kafka_bootstrap"],
        group_id="fleetbus-exerciser-vehicle",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    consumer.assign([tp])
    for stage in ("seal", "open"):
        m.PRODUCE_RETRIES.labels(stage=stage)
        m.PRODUCE_ERRORS.labels(stage=stage)
    for name in ("xwing", "qkd-etsi014"):
        m.PROVIDER_UP.labels(provider=name).set(1)
        m.set_circuit_state(name, "closed")

    m.serve_metrics(int(config["port"]), addr="127.0.0.1")
    print("exerciser serving on", config["port"], flush=True)
    rounds = 0
    while running and time.monotonic() < deadline:
        rounds += 1
        issued = time.time()
        for profile in (standard, enclave):
            with tracer.start_as_current_span(f"seal {profile.name}"):
                try:
                    with m.observe_stage("seal"):
                        envelope = sealer.seal(
                            "cmd", config["topic"], recipient, f"cmd-{rounds}-{profile.name}",
                            "doors.unlock", b"unlock", issued, issued + 60, profile,
                        )  # fmt: skip
                except FleetbusError as exc:
                    m.RECORDS.labels(stage="seal", outcome="dlq").inc()
                    m.DLQ_RECORDS.labels(stage="seal", reason=str(exc.reason)).inc()
                    m.AUDIT_RECORDS.labels(event="rejected").inc()
                    continue
                m.RECORDS.labels(stage="seal", outcome="ok").inc()
                m.AUDIT_RECORDS.labels(event="sealed").inc()
                headers = list(inject_headers([]))
                producer.send(config["topic"], envelope, key=b"V-17", headers=headers)
                # The vehicle side: open the real envelope and a tampered copy.
                try:
                    with m.observe_stage("open"):
                        opened = opener.open(envelope, topic=config["topic"])
                    m.KEYPATH_SELECTED.labels(profile=profile.name, path=opened.key_path.name).inc()
                    m.RECORDS.labels(stage="open", outcome="ok").inc()
                    m.COMMAND_LATENCY.labels(outcome="succeeded").observe(time.time() - issued)
                except FleetbusError as exc:
                    m.ENVELOPE_REJECTS.labels(role="vehicle", reason=str(exc.reason)).inc()
                tampered = envelope[:-20] + bytes([envelope[-20] ^ 1]) + envelope[-19:]
                try:
                    opener.open(tampered, topic=config["topic"])
                except FleetbusError as exc:
                    m.ENVELOPE_REJECTS.labels(role="vehicle", reason=str(exc.reason)).inc()
                    m.RECORDS.labels(stage="open", outcome="dlq").inc()
                    m.DLQ_RECORDS.labels(stage="open", reason=str(exc.reason)).inc()
        producer.flush(timeout=5)
        # Policy decisions from Cedar.
        for principal in ("dispatch-1", "dispatch-2"):
            request = {
                "principal": f'User::"{principal}"',
                "action": 'Action::"doors.unlock"',
                "resource": 'Vehicle::"V-17"',
                "context": {},
            }
            with m.observe_stage("authorize"):
                result = cedarpy.is_authorized(request, policies, entities)
            allowed = result.decision == cedarpy.Decision.Allow
            m.POLICY_DECISIONS.labels(
                outcome="allow" if allowed else "deny",
                reason="ok" if allowed else ReasonCode.POLICY_DENIED.value,
            ).inc()
            m.RECORDS.labels(stage="authorize", outcome="ok" if allowed else "rejected").inc()
        # Provider health, breakers and the QKD pool as the bus sees it.
        try:
            status = qkd_sender.status(slave)
            m.QKD_KEY_POOL.labels(slave_sae=slave).set(int(status["stored_key_count"]))
            m.PROVIDER_UP.labels(provider="qkd-etsi014").set(1)
        except FleetbusError:
            m.PROVIDER_UP.labels(provider="qkd-etsi014").set(0)
        for name in ("xwing", "qkd-etsi014"):
            m.set_circuit_state(name, profile_sealer.breaker(name).state.value)
        # Key expiry from the directory's validity windows.
        for principal, not_after in validity.items():
            m.KEY_EXPIRY.labels(kind="sealer" if principal.startswith("bus") else "vehicle").set(
                not_after - time.time()
            )
        # The vehicle consumes every other round: a real, growing lag.
        if rounds % 2 == 0:
            consumer.poll(timeout_ms=200, max_records=1)
            consumer.commit()
        end = consumer.end_offsets([tp])[tp]
        committed = consumer.committed(tp) or 0
        m.CONSUMER_LAG.labels(stage="vehicle", topic=config["topic"]).set(end - committed)
        time.sleep(0.3)
    consumer.close()
    producer.close(timeout=5)
    print(f"exerciser done after {rounds} rounds", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "exercise":
        _exercise(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: test_prometheus_e2e.py exercise '<json config>'")
