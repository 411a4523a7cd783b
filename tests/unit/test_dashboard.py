"""The Grafana dashboard tells releases and instances apart and says what each panel shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "observability/grafana/fleetbus.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def selectors() -> list[tuple[str, str]]:
    """(panel title, label selector) of every fleetbus metric in every query."""
    found = []
    for panel in PANELS:
        for target in panel.get("targets", []):
            for match in re.finditer(r"(fleetbus_\w+)(\{[^}]*\})?", target["expr"]):
                found.append((panel["title"], match.group(2) or ""))
    return found


def test_every_panel_has_a_description() -> None:
    assert [p["title"] for p in PANELS if not p.get("description", "").strip()] == []


def test_namespace_and_instance_variables_exist() -> None:
    names = [v["name"] for v in DASHBOARD["templating"]["list"]]
    assert names == ["datasource", "namespace", "job", "instance", "kme_job"]


def test_every_query_is_scoped_to_the_selected_namespace_and_job() -> None:
    # Two releases in two namespaces both export job="worker": without the namespace every
    # panel would add them up.
    unscoped = [
        (title, sel)
        for title, sel in selectors()
        if 'namespace=~"$namespace"' not in sel
        or not ('job=~"$job"' in sel or 'job=~"$kme_job"' in sel)
    ]
    assert unscoped == []
    workers = [(t, s) for t, s in selectors() if 'job=~"$job"' in s]
    assert workers
    assert [(t, s) for t, s in workers if 'instance=~"$instance"' not in s] == []


def test_the_slo_panel_uses_the_bus_latency_and_end_to_end_stays_a_view() -> None:
    by_title = {p["title"]: p for p in PANELS}
    slo = by_title["Answered commands within the bus latency SLO (2.5 s)"]
    assert all("fleetbus_command_bus_latency_seconds" in t["expr"] for t in slo["targets"])
    end_to_end = [t for t in by_title if t.startswith("End-to-end command latency")]
    assert len(end_to_end) == 1
