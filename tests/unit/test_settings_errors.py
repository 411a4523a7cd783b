"""A bad FLEETBUS_* value stops a process with one line per variable naming the variable, the
value and what is allowed, never a traceback; a misspelt variable stops the worker."""

from __future__ import annotations

import sys

import pytest

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.settings_env import load_settings, unknown_variables
from fleetbus.cli import main as cli


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("FLEETBUS_PARTITIONS", "abc", "(allowed: int, >= 1)"),
        ("FLEETBUS_METRICS_PORT", "99999", "(allowed: int, >= 0, <= 65535)"),
        ("FLEETBUS_KAFKA_SECURITY_PROTOCOL", "TLS", "(allowed: PLAINTEXT | SSL)"),
        ("FLEETBUS_PIPELINE", "yes", "(allowed: auto | on | off)"),
        ("FLEETBUS_PROFILES", "{not json", "not valid JSON (allowed: JSON)"),
        ("FLEETBUS_KAFKA_BOOTSTRAP", "kafka://broker:9092", "is not host:port"),
        ("FLEETBUS_KAFKA_BOOTSTRAP", "broker", "is not host:port"),
        ("FLEETBUS_KAFKA_BOOTSTRAP", "a:9092,b:70000", "is not host:port (port 1..65535)"),
    ],
)
def test_one_line_names_variable_value_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, allowed: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    (line,) = str(info.value).splitlines()
    assert line.startswith(f"{variable}={value!r}: ")
    assert allowed in line


def test_nested_json_errors_name_the_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETBUS_PROFILES", '{"x": {"key_paths": "xwing"}}')
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).splitlines() == [
        "FLEETBUS_PROFILES (at x.key_paths)='xwing': Input should be a valid list (allowed: JSON)",
        "FLEETBUS_PROFILES (at x.minimum_path): Field required (allowed: JSON)",
    ]


def test_good_bootstrap_lists_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETBUS_KAFKA_BOOTSTRAP", "kafka-0.kafka:9093, 10.0.0.7:9092,[::1]:9092")
    assert load_settings().kafka_bootstrap.startswith("kafka-0.kafka:9093")


def test_strict_refuses_a_misspelt_variable_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETBUS_KAFKA_BOOTSTAP", "kafka:9092")
    assert load_settings().kafka_bootstrap == "127.0.0.1:19092"  # not strict: ignored
    with pytest.raises(
        ConfigError, match=r"FLEETBUS_KAFKA_BOOTSTAP \(did you mean FLEETBUS_KAFKA_BOOTSTRAP\?\)"
    ):
        load_settings(strict=True)


def test_variables_read_elsewhere_are_not_unknown() -> None:
    environ = {
        "FLEETBUS_LOG_FORMAT": "text",
        "FLEETBUS_KME_PORT_A": "8443",
        "FLEETBUS_TOPICS__PREFIX": "acme.",
        "FLEETBUS_TOPICS__NOPE": "x",
        "OTHER": "y",
    }
    assert unknown_variables(environ) == ["FLEETBUS_TOPICS__NOPE"]


def test_cli_prints_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEETBUS_PARTITIONS", "abc")
    monkeypatch.setattr(sys, "argv", ["fleetbus", "dev", "kafka", "acls", "--worker", "w"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "FLEETBUS_PARTITIONS='abc'" in err
    assert "Traceback" not in err
