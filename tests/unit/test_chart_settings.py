"""The chart's ``settings`` map is validated against the settings model: values.schema.json lists
every settable field (generated from ``FleetbusSettings``, and this test keeps it current), and
not the fields the chart sets itself, so a typo or a duplicate key fails ``helm install``.

Regenerate after a settings change: ``python tests/unit/test_chart_settings.py``.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal

from fleetbus.bus.settings import FleetbusSettings
from fleetbus.bus.settings_env import settings_rows

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "helm" / "fleetbus" / "values.schema.json"
#: Set by templates/configmap-settings.yaml from other values (volumes, ports, kafkaTls): in
#: ``settings`` they would be a second key of the same name in the ConfigMap.
CHART_MANAGED = (
    "keys_dir",
    "data_dir",
    "policy_dir",
    "metrics_port",
    "metrics_bind",
    "qkd_ca_file",
    "qkd_cert_file",
    "qkd_key_file",
    "kafka_security_protocol",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
)


def expected_settings_schema() -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for variable, name, _kind, _default, meaning in settings_rows():
        key = variable.removeprefix("FLEETBUS_").lower()
        if key in CHART_MANAGED:
            continue
        prop: dict[str, Any] = {"description": meaning, "type": ["string", "number", "boolean"]}
        field = FleetbusSettings.model_fields.get(name)
        if field is not None and typing.get_origin(field.annotation) is Literal:
            prop = {"description": meaning, "enum": list(typing.get_args(field.annotation))}
        properties[key] = prop
    return {
        "description": "FleetbusSettings fields (nested with __) rendered as FLEETBUS_<NAME>; "
        "generated from the settings model (tests/unit/test_chart_settings.py). Fields the "
        "chart sets itself are not allowed here.",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }


def test_values_schema_settings_are_the_settings_model() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert schema["properties"]["settings"] == expected_settings_schema(), (
        "helm/fleetbus/values.schema.json is stale: python tests/unit/test_chart_settings.py"
    )


def test_chart_managed_settings_are_real_fields() -> None:
    variables = {row[0].removeprefix("FLEETBUS_").lower() for row in settings_rows()}
    assert set(CHART_MANAGED) <= variables


if __name__ == "__main__":
    document = json.loads(SCHEMA.read_text())
    document["properties"]["settings"] = expected_settings_schema()
    SCHEMA.write_text(json.dumps(document, indent=2) + "\n")
