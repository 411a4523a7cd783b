"""The demo's verdict: the report filled from status events, topics, the execution journal and
metrics (one ``Check`` per expectation), and the summary tables."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table

from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.devtools.demo.fleet import DemoFleet
from fleetbus.devtools.demo.observe import read_topic
from fleetbus.devtools.demo.scenario import QKD_PATH, Scenario


@dataclass
class Check:
    """One line of the scenario verdict."""

    name: str
    expected: str
    observed: str
    ok: bool


@dataclass
class DemoReport:
    """Everything the summary shows; ``ok`` is the exit status."""

    fleet: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    dlq_by_reason: dict[str, int] = field(default_factory=dict)
    envelopes_by_path: dict[str, int] = field(default_factory=dict)
    edge_paths_by_phase: dict[str, dict[str, int]] = field(default_factory=dict)
    failovers: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_split_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)
    workdir: str = ""
    kafka: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> str:
        data = asdict(self)
        data["ok"] = self.ok
        return json.dumps(data, indent=2, sort_keys=True)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        index = min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))
        return round(ordered[index] * 1000, 1)

    return {
        "p50": round(statistics.median(ordered) * 1000, 1),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": round(ordered[-1] * 1000, 1),
    }


def evaluate(
    scenario: Scenario,
    fleet: DemoFleet,
    settings: FleetbusSettings,
    executions: Counter[tuple[str, str]],
    fleet_stats: Mapping[str, int],
    failovers: list[dict[str, Any]],
    report: DemoReport,
) -> None:
    """Fill ``report`` from the status events, topics, journal and metrics; one Check per
    expectation of the scenario."""
    from fleetbus.bus.envelope import decode_envelope
    from fleetbus.processors.audit import verify_entries
    from fleetbus.processors.eos import DeadLetter
    from fleetbus.sdk.vehicle import load_key_directory

    bootstrap = settings.kafka_bootstrap
    t = settings.topics
    exps = scenario.expectations
    routine = [e for e in exps if e.routine]
    cases = [e for e in exps if not e.routine]
    checks = report.checks

    # Envelopes actually sent to vehicles, with their key paths.
    paths: dict[tuple[str, str], str] = {}
    for r in read_topic(bootstrap, t.full(t.commands_outbound)):
        cid = dict(r.headers or []).get("fleetbus-command-id", b"").decode()
        paths[(cid, r.key.decode())] = decode_envelope(r.value).header.key_path
    report.envelopes_by_path = dict(Counter(paths.values()).most_common())
    edge = set(fleet.edge)
    by_phase: dict[str, Counter[str]] = {}
    for (cid, vid), path in paths.items():
        if vid in edge:
            by_phase.setdefault(scenario.phase_of.get(cid, "?"), Counter())[path] += 1
    order = {phase: i for i, phase in enumerate(scenario.phases)}
    report.edge_paths_by_phase = {
        k: dict(v) for k, v in sorted(by_phase.items(), key=lambda kv: order.get(kv[0], 99))
    }

    # Outcomes.
    succeeded = [e for e in exps if e.outcome is not None and str(e.outcome.state) == "succeeded"]
    failed = [e for e in exps if e.outcome is not None and str(e.outcome.state) == "failed"]
    rejected = Counter(
        e.outcome.reason.value if e.outcome.reason else "?"
        for e in exps
        if e.outcome is not None and str(e.outcome.state) in ("rejected", "expired")
    )
    report.rejected_by_reason = dict(rejected.most_common())
    letters = [DeadLetter.decode(r.value) for r in read_topic(bootstrap, t.full(t.dlq))]
    report.dlq_by_reason = dict(Counter(d.reason.value for d in letters).most_common())
    duplicates = sum(n - 1 for n in executions.values() if n > 1)
    routine_pairs = {(e.command_id, e.vehicle_id or "") for e in routine}
    once = sum(1 for pair in routine_pairs if executions[pair] == 1)
    rejected_ids = {e.command_id for e in cases if e.state != "succeeded"}
    replayed_ids = {e.command_id for e in cases if e.reason == ReasonCode.REPLAYED.value}
    bad_runs = sum(n for (cid, _), n in executions.items() if cid in rejected_ids - replayed_ids)
    report.sent = dict(sorted(scenario.sent.items()))
    report.counts = {
        "routine deliveries expected (command x vehicle)": len(routine_pairs),
        "envelopes sealed to vehicles": len(paths),
        "delivered (answered by the vehicle)": len(succeeded) + len(failed),
        "succeeded": len(succeeded),
        "failed": len(failed),
        "executed exactly once (routine)": once,
        "duplicate executions": duplicates,
        "executions of rejected commands": bad_runs,
        "redeliveries answered from the store": int(fleet_stats.get("redeliveries", 0)),
        "vehicle-side envelope rejects": int(fleet_stats.get("envelope_rejects", 0)),
    }
    report.failovers = failovers
    timed = [e for e in routine if e.case != "warm-up" and e.held and e.outcome is not None]
    report.latency_ms = percentiles([e.outcome.at - e.sent_at for e in timed if e.outcome])
    fan_out = Counter(e.command_id for e in routine)
    singles = [e for e in timed if fan_out[e.command_id] == 1]
    to_sealed: list[float] = []
    sealed_to_done: list[float] = []
    for e in timed:
        sealed = next(
            (x.at for x in scenario.follower.events(e.command_id)
             if str(x.state) == "sealed" and x.vehicle_id == e.vehicle_id),
            None,
        )  # fmt: skip
        if sealed is not None and e.outcome is not None:
            to_sealed.append(sealed - e.sent_at)
            sealed_to_done.append(e.outcome.at - sealed)
    report.latency_split_ms = {
        "single-vehicle commands": percentiles(
            [e.outcome.at - e.sent_at for e in singles if e.outcome]
        ),
        "dispatch → sealed": percentiles(to_sealed),
        "sealed → succeeded (vehicle and back)": percentiles(sealed_to_done),
    }

    # --- checks ---------------------------------------------------------------------------
    ok_routine = [e for e in routine if e.held]
    checks.append(Check("routine commands succeeded", f"{len(routine)} of {len(routine)}",
                        f"{len(ok_routine)} of {len(routine)}",
                        len(ok_routine) == len(routine)))  # fmt: skip
    checks.append(Check("each routine command executed exactly once per vehicle",
                        f"{len(routine_pairs)}", f"{once} (duplicates {duplicates})",
                        once == len(routine_pairs) and duplicates == 0))  # fmt: skip
    checks.append(Check("rejected commands never executed", "0", str(bad_runs), bad_runs == 0))
    for e in cases:
        expected = e.state + (f" ({e.reason})" if e.reason else "")
        checks.append(Check(e.case, expected, e.observed, e.held))
    checks.append(Check("junk bytes on commands.requested", "DLQ (malformed)",
                        f"DLQ malformed: {report.dlq_by_reason.get('malformed', 0)}",
                        report.dlq_by_reason.get("malformed", 0) >= 1))  # fmt: skip
    legacy = set(fleet.legacy)
    legacy_paths = Counter(p for (_, v), p in paths.items() if v in legacy)
    pqc_paths = Counter(p for (_, v), p in paths.items() if v not in legacy and v not in edge)
    checks.append(Check("legacy vehicles (no PQC) sealed on x25519, visibly", "x25519 only",
                        _fmt(legacy_paths), set(legacy_paths) <= {"x25519"}))  # fmt: skip
    checks.append(Check("PQC vehicles never downgraded", "xwing only", _fmt(pqc_paths),
                        set(pqc_paths) == {"xwing"}))  # fmt: skip
    p1 = by_phase.get("1 QKD link up", Counter())
    p2 = by_phase.get("2 QKD link DOWN", Counter())
    checks.append(Check("edge units before the outage", f"{QKD_PATH} only", _fmt(p1),
                        bool(p1) and set(p1) == {QKD_PATH}))  # fmt: skip
    checks.append(Check("edge units during the outage: failover to xwing", "xwing only",
                        _fmt(p2), bool(p2) and set(p2) == {"xwing"}))  # fmt: skip
    standard = sum(
        r["count"] for r in failovers
        if r.get("profile") == "standard" and r.get("to_path") == "xwing"
    )  # fmt: skip
    checks.append(Check("failover metric (standard → xwing)", ">= 1", str(standard),
                        standard >= 1))  # fmt: skip
    restored = scenario.qkd_restored_after_s
    checks.append(Check("QKD key path back after the link came up",
                        f"within {scenario.options.qkd_recovery_timeout_s:.0f} s",
                        f"after {restored:.1f} s" if restored is not None else "not seen",
                        restored is not None))  # fmt: skip
    enclave_path = paths.get((scenario.enclave_ok, fleet.edge[0]))
    checks.append(Check("enclave command keyed by QKD", QKD_PATH, str(enclave_path),
                        enclave_path == QKD_PATH))  # fmt: skip
    audit = read_topic(bootstrap, t.full(t.audit))
    verdict = verify_entries(
        [(r.offset, r.key, r.value) for r in audit],
        load_key_directory(fleet.keys_dir),
        checkpoint_signer=settings.sealer_principal,
        max_checkpoint_every=settings.audit_checkpoint_every,
    )
    records = sum(verdict.records.values())
    checkpoints = sum(verdict.checkpoints.values())
    unsigned = sum(verdict.unsigned_tail.values())
    checks.append(Check("audit trail verifies (hash chain + signed checkpoints)", "OK",
                        f"{'OK' if verdict.ok else 'BROKEN'}: {records} records, "
                        f"{checkpoints} checkpoints, {unsigned} not yet signed",
                        verdict.ok and records > 0 and checkpoints > 0))  # fmt: skip


def _fmt(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


def summary_tables(report: DemoReport) -> list[Table]:
    """The summary (counts, reasons, key paths, failovers, latency) and the verdict."""
    summary = Table(title="fleetbus demo — summary", title_justify="left")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    f = report.fleet
    summary.add_row(
        "fleet",
        f"{f.get('vehicles', 0)} vehicles ({f.get('pqc', 0)} PQC, {f.get('legacy', 0)} legacy) "
        f"+ {f.get('edge', 0)} QKD edge units",
    )
    summary.add_row("commands sent", str(sum(report.sent.values())))
    for kind, n in report.sent.items():
        summary.add_row(f"  {kind}", str(n))
    for key, value in report.counts.items():
        summary.add_row(key, str(value))
    summary.add_row("rejected by reason", _fmt(report.rejected_by_reason))
    summary.add_row("DLQ records by reason", _fmt(report.dlq_by_reason))
    summary.add_row("envelopes by key path", _fmt(report.envelopes_by_path))
    for phase, paths in report.edge_paths_by_phase.items():
        summary.add_row(f"  edge units, phase {phase}", _fmt(paths))
    for row in report.failovers:
        summary.add_row(
            f"failover {row.get('profile')}: {row.get('from_path')} → {row.get('to_path')}",
            f"{row['count']} ({row.get('reason')})",
        )
    lat = report.latency_ms
    if lat:
        summary.add_row(
            "end-to-end latency (dispatch → succeeded)",
            f"p50 {lat['p50']:.0f} ms  p95 {lat['p95']:.0f} ms  p99 {lat['p99']:.0f} ms",
        )
    for what, split in report.latency_split_ms.items():
        if split:
            summary.add_row(
                f"  {what}",
                f"p50 {split['p50']:.0f} ms  p95 {split['p95']:.0f} ms  p99 {split['p99']:.0f} ms",
            )
    for what, seconds in report.timings_s.items():
        summary.add_row(what, f"{seconds:.1f} s")
    verdict = Table(title="scenario expectations", title_justify="left")
    verdict.add_column("case")
    verdict.add_column("expected")
    verdict.add_column("observed")
    verdict.add_column("", justify="center")
    for c in report.checks:
        verdict.add_row(c.name, c.expected, c.observed, "✔" if c.ok else "[red]✘[/red]")
    return [summary, verdict]
