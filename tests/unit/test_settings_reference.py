"""The settings reference (docs/settings.md) is generated from the settings model and current;
the CLI says its version and lists the worker's variables."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from typer.testing import CliRunner

from fleetbus.bus.settings import FleetbusSettings
from fleetbus.bus.settings_env import settings_reference, settings_rows
from fleetbus.cli.main import app

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_docs_settings_md_is_the_generated_reference() -> None:
    assert DOC.read_text() == settings_reference(), (
        "docs/settings.md is stale: regenerate it with `fleetbus settings > docs/settings.md`"
    )


def test_every_setting_is_in_the_reference_with_a_meaning() -> None:
    rows = {row[0]: row for row in settings_rows()}
    top_level = {f"FLEETBUS_{name.upper()}" for name in FleetbusSettings.model_fields}
    nested = {name for name in top_level if not any(row.startswith(name) for row in rows)}
    assert not nested, f"settings missing from the reference: {nested}"
    assert "FLEETBUS_KEYS_DIR" in rows
    assert "FLEETBUS_TOPICS__PREFIX" in rows
    assert [name for name, row in rows.items() if not row[4]] == [], "settings without meaning"


def test_fleetbus_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"fleetbus {version('fleetbus')}"


def test_worker_help_lists_every_variable() -> None:
    result = CliRunner().invoke(app, ["worker", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    missing = [row[0] for row in settings_rows() if row[0] not in result.stdout]
    assert not missing
