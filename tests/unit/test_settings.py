"""Settings come from FLEETBUS_* variables and are validated with clear errors."""

from __future__ import annotations

import ssl
from pathlib import Path

import pydantic
import pytest

from fleetbus.bus.settings import FleetbusSettings
from fleetbus.devtools.kafka import LocalKafka
from fleetbus.processors.app import faust_config


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETBUS_KAFKA_BOOTSTRAP", "127.0.0.1:1,127.0.0.1:2")
    monkeypatch.setenv("FLEETBUS_TOPICS__PREFIX", "acme.")
    settings = FleetbusSettings()
    assert settings.topics.full(settings.topics.commands_requested) == "acme.commands.requested"
    config = faust_config(settings)
    assert config["broker"] == ["kafka://127.0.0.1:1", "kafka://127.0.0.1:2"]
    assert config["processing_guarantee"] == "exactly_once"


def test_invalid_guarantee_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETBUS_PROCESSING_GUARANTEE", "at_most_once")
    with pytest.raises(pydantic.ValidationError, match="processing_guarantee"):
        FleetbusSettings()


def test_web_port_zero_disables_the_web_server() -> None:
    assert faust_config(FleetbusSettings(web_port=0))["web_enabled"] is False


def test_kafka_plaintext_is_the_default_and_adds_no_client_options() -> None:
    settings = FleetbusSettings()
    assert settings.kafka_client_config() == {}
    assert settings.aiokafka_client_config() == {}
    assert "broker_credentials" not in faust_config(settings)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kafka_security_protocol": "SSL"}, "needs kafka_ssl_cafile"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "ca", "kafka_ssl_certfile": "c"},
            "both kafka_ssl_certfile and kafka_ssl_keyfile",
        ),
        ({"kafka_ssl_cafile": "ca"}, "kafka_security_protocol is PLAINTEXT"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "kafka_security_protocol"),
    ],
)
def test_incomplete_kafka_tls_settings_are_refused(fields: dict[str, str], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        FleetbusSettings(**fields)  # type: ignore[arg-type]


def test_kafka_mtls_settings_reach_every_client_kind(tmp_path: Path) -> None:
    """kafka-python options, an aiokafka SSL context holding our certificate, faust
    credentials: all from the same FLEETBUS_KAFKA_SSL_* files."""
    cluster = LocalKafka(home=tmp_path, security="mtls")
    config = cluster.client_config("worker-1")
    settings = FleetbusSettings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=config["ssl_cafile"],
        kafka_ssl_certfile=config["ssl_certfile"],
        kafka_ssl_keyfile=config["ssl_keyfile"],
    )
    assert settings.kafka_client_config() == {**config, "ssl_check_hostname": True}
    aio = settings.aiokafka_client_config()
    assert aio["security_protocol"] == "SSL"
    context = aio["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert len(context.get_ca_certs()) == 1
    credentials = faust_config(settings)["broker_credentials"]
    assert isinstance(credentials.context, ssl.SSLContext)
    # A key that does not belong to the certificate is an error at start, not at first use.
    other = cluster.client_config("someone-else")
    with pytest.raises(ssl.SSLError):
        FleetbusSettings(
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=config["ssl_cafile"],
            kafka_ssl_certfile=config["ssl_certfile"],
            kafka_ssl_keyfile=other["ssl_keyfile"],
        ).kafka_ssl_context()
