"""The Prometheus rules pass `promtool check rules` and their `promtool test rules` unit tests,
and every alert has a unit test that fires it and one that shows it silent."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "observability" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "observability" / "prometheus" / "rules_test.yml"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_tool(name: str) -> str:
    """The tool's path; under CI=true a missing tool fails the test, locally it skips."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: run ./scripts/install-tools.sh (Debian package prometheus)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def _alert_names() -> set[str]:
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULES_TEST.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_catches_a_broken_threshold(tmp_path: Path) -> None:
    """The unit tests are sharp: raising one threshold makes `promtool test rules` fail."""
    promtool = require_tool("promtool")
    rules = RULES.read_text()
    broken = rules.replace("fleetbus_qkd_link_up == 0", "fleetbus_qkd_link_up == 2")
    assert broken != rules
    (tmp_path / "rules.yml").write_text(broken)
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    result = subprocess.run(
        [promtool, "test", "rules", "rules_test.yml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "FleetbusQKDLinkDown" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    doc: dict[str, Any] = yaml.safe_load(RULES_TEST.read_text())
    assert doc["rule_files"] == ["rules.yml"]
    firing: set[str] = set()
    silent: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = _alert_names()
    assert len(alerts) >= 7
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown silent"
    assert (firing | silent) - alerts == set(), "tests for alerts that do not exist"


def test_every_alert_has_severity_summary_and_a_runbook_in_the_docs() -> None:
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    runbooks = (ROOT / "docs" / "observability.md").read_text().lower()
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            # Absolute: Alertmanager and Grafana link it as is (the chart swaps the base).
            url = rule["annotations"]["runbook_url"]
            assert url.startswith("https://"), rule["alert"]
            assert url.split("#", 1)[0].endswith("/docs/observability.md"), rule["alert"]
            anchor = url.split("#", 1)[1]
            assert anchor == rule["alert"].lower()
            assert f"### {rule['alert'].lower()}" in runbooks, f"no runbook for {rule['alert']}"
